"""Parallel degrees -> a DeviceMesh laid out in the plan's mesh order."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

# torch 2.13 warns on every slice of a flattened dim (mesh["dp_shard_cp"]); slicing is
# still the documented way to get the 2-D (dp_replicate, dp_shard_cp) mesh for HSDP.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


class LayoutError(ValueError):
    """The plan's degrees do not match the processes that were started."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    pp: int = 1

    def __post_init__(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp
        if product != self.world_size:
            pp = f" x pp={self.pp}" if self.pp > 1 else ""
            raise LayoutError(
                f"the plan's degrees dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x cp={self.cp} "
                f"x tp={self.tp}{pp} = {product}, but {self.world_size} processes were started "
                f"(run with --nproc-per-node {product} or re-plan for {self.world_size})")

    def degree(self, name: str) -> int:
        return getattr(self, name)


def build_mesh(dims: ParallelDims, device_type: str, mesh_order: list[str] | tuple[str, ...]):
    """A 4-D mesh in ``mesh_order`` (outermost first) with flattened submeshes:
    dp_shard_cp (FSDP), dp (data loading), dp_cp (loss averaging).

    With pipeline parallelism a "pp" dim goes outermost (stages exchange one activation
    per micro-batch, the least traffic of any dim, so it can cross the slowest links);
    without it the mesh stays 4-D, exactly as before."""
    from torch.distributed.device_mesh import init_device_mesh

    order = tuple(mesh_order)
    if sorted(order) != sorted(MESH_DIMS):
        raise LayoutError(f"mesh_order {list(order)} must name each of {', '.join(MESH_DIMS)} once")
    if dims.pp > 1:
        order = ("pp", *order)
    mesh = init_device_mesh(device_type, tuple(dims.degree(n) for n in order), mesh_dim_names=order)
    mesh[_in_order(order, ("dp_shard", "cp"))]._flatten("dp_shard_cp")
    mesh[_in_order(order, ("dp_replicate", "dp_shard"))]._flatten("dp")
    mesh[_in_order(order, ("dp_replicate", "dp_shard", "cp"))]._flatten("dp_cp")
    return mesh


def _in_order(order: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in order if n in names)


def replicate_shard_mesh(mesh, shard_dims: tuple[str, ...] = ("dp_shard", "cp")):
    """The 2-D (dp_replicate, dp_shard_cp) mesh HSDP needs, for any mesh order.

    Slicing it from the root works only when dp_replicate is outside the sharded dims
    in ``mesh_order``; otherwise the same ranks are regrouped into a new mesh (all ranks
    call this in the same order, so the new process groups agree).
    """
    from torch.distributed.device_mesh import DeviceMesh

    shard_name = "dp_shard_cp" if len(shard_dims) > 1 else shard_dims[0]
    try:
        return mesh[("dp_replicate", shard_name)]
    except (KeyError, RuntimeError, ValueError):
        pass
    order = mesh.mesh_dim_names
    # Keep every dim's ranks increasing (process groups order ranks by global rank and
    # DTensor places shards by mesh coordinate; they agree only then): merged and
    # remaining dims follow the root's order.
    shard_dims = tuple(n for n in order if n in shard_dims)
    rest = tuple(n for n in order if n != "dp_replicate" and n not in shard_dims)
    ranks = mesh.mesh.permute([order.index(n) for n in ("dp_replicate", *shard_dims, *rest)])
    replicate = ranks.shape[0]
    shard = 1
    for size in ranks.shape[1:1 + len(shard_dims)]:
        shard *= size
    ranks = ranks.reshape(replicate, shard, -1).contiguous()
    regrouped = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("dp_replicate", shard_name, "rest"))
    return regrouped[("dp_replicate", shard_name)]
