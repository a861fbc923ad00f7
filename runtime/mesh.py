"""Parallel degrees -> a DeviceMesh laid out in the plan's mesh order."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise LayoutError(
                f"the plan's degrees dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x cp={self.cp} "
                f"x tp={self.tp} = {product}, but {self.world_size} processes were started "
                f"(run with --nproc-per-node {product} or re-plan for {self.world_size})")

    def degree(self, name: str) -> int:
        return getattr(self, name)


def build_mesh(dims: ParallelDims, device_type: str, mesh_order: list[str] | tuple[str, ...]):
    """A 4-D mesh in ``mesh_order`` (outermost first) with flattened submeshes:
    dp_shard_cp (FSDP), dp (data loading), dp_cp (loss averaging)."""
    from torch.distributed.device_mesh import init_device_mesh

    order = tuple(mesh_order)
    if sorted(order) != sorted(MESH_DIMS):
        raise LayoutError(f"mesh_order {list(order)} must name each of {', '.join(MESH_DIMS)} once")
    mesh = init_device_mesh(device_type, tuple(dims.degree(n) for n in order), mesh_dim_names=order)
    mesh[_in_order(order, ("dp_shard", "cp"))]._flatten("dp_shard_cp")
    mesh[_in_order(order, ("dp_replicate", "dp_shard"))]._flatten("dp")
    mesh[_in_order(order, ("dp_replicate", "dp_shard", "cp"))]._flatten("dp_cp")
    return mesh


def _in_order(order: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in order if n in names)
