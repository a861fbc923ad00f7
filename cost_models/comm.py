"""Collective communication: volumes, which link they cross, and alpha-beta time.

Ring collectives over ``n`` ranks move ``(n - 1) / n`` of the full buffer through every
rank's link for all-gather and reduce-scatter, and twice that for all-reduce
(Patarasuk & Yuan 2009; nccl-tests' "bus bandwidth" is defined the same way). Time is
``(n - 1) x latency + bytes_on_link / (link_bandwidth x bus_efficiency)``.

Which link: the device mesh lays ranks out in ``mesh_order`` (outermost first), so a
dimension's group is the set of ranks that differ only in that dimension. If all of
them sit in one node the group runs over NVLink; otherwise the ring crosses the network
and each GPU's NIC bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import Parallelism
from .specs import ClusterSpec

RING_FACTOR = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0, "send_recv": None}


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step, with its total count and time."""

    name: str  # what it is for, e.g. "fsdp all-gather (forward)"
    kind: str  # all_gather | reduce_scatter | all_reduce | send_recv
    group: str  # mesh dims the group spans, e.g. "dp_shard+cp"
    group_size: int
    tier: str  # "intra-node" | "inter-node"
    bytes_per_call: float  # full (unsharded) buffer size of one call
    calls: float
    time_s: float  # total over all calls

    @property
    def link_bytes(self) -> float:
        return collective_link_bytes(self.kind, self.bytes_per_call, self.group_size) * self.calls


def collective_link_bytes(kind: str, buffer_bytes: float, group_size: int) -> float:
    """Bytes each rank sends over its link for one call on a buffer of ``buffer_bytes``."""
    if group_size <= 1:
        return 0.0
    if kind == "send_recv":
        return buffer_bytes
    return RING_FACTOR[kind] * (group_size - 1) / group_size * buffer_bytes


def group_tier(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...],
               dims: tuple[str, ...]) -> str:
    return _tier(cluster.gpus_per_node, (parallelism.dp_replicate, parallelism.dp_shard, parallelism.cp,
                                         parallelism.tp), tuple(mesh_order), tuple(dims))


@lru_cache(maxsize=65536)
def _tier(gpus_per_node: int, degrees: tuple[int, int, int, int], mesh_order: tuple[str, ...],
          dims: tuple[str, ...]) -> str:
    """'intra-node' when the group of rank 0 along ``dims`` fits in node 0.

    Ranks are row-major in ``mesh_order``: a dim's stride is the product of the degrees
    inside it, and the group's largest rank is sum(stride x (degree - 1)). Nodes hold
    consecutive ranks, so the group stays in node 0 exactly when that rank does; the
    same holds for every other group when degrees divide the node size.
    """
    by_name = dict(zip(("dp_replicate", "dp_shard", "cp", "tp"), degrees))
    stride = 1
    last_rank = 0
    for name in reversed(mesh_order):
        degree = by_name[name]
        if name in dims:
            last_rank += stride * (degree - 1)
        stride *= degree
    return "intra-node" if last_rank < gpus_per_node else "inter-node"


def collective_time_s(cluster: ClusterSpec, kind: str, buffer_bytes: float, group_size: int,
                      tier: str) -> float:
    """Alpha-beta time of one ring collective (or one point-to-point transfer)."""
    if group_size <= 1 or buffer_bytes <= 0:
        return 0.0
    gpu = cluster.gpu
    if tier == "intra-node":
        bandwidth = gpu.intra_node_bytes_per_s * gpu.intra_node_bus_efficiency
        latency = gpu.intra_node_latency_s
    else:
        bandwidth = gpu.inter_node_bytes_per_s * gpu.inter_node_bus_efficiency
        latency = gpu.inter_node_latency_s
    steps = 1 if kind == "send_recv" else (group_size - 1) * (2 if kind == "all_reduce" else 1)
    return steps * latency + collective_link_bytes(kind, buffer_bytes, group_size) / bandwidth


def make_collective(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...],
                    name: str, kind: str, dims: tuple[str, ...], bytes_per_call: float,
                    calls: float) -> Collective:
    size = 1
    for dim in dims:
        size *= parallelism.degree(dim)
    tier = group_tier(cluster, parallelism, mesh_order, dims) if size > 1 else "intra-node"
    one = collective_time_s(cluster, kind, bytes_per_call, size, tier)
    return Collective(name=name, kind=kind, group="+".join(dims), group_size=size, tier=tier,
                      bytes_per_call=bytes_per_call, calls=calls, time_s=one * calls)


def collective_seconds(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...], kind: str,
                       dims: tuple[str, ...], bytes_per_call: float) -> float:
    """Time of one call, without building a ``Collective`` record (the planner's hot path)."""
    size = 1
    for dim in dims:
        size *= parallelism.degree(dim)
    if size <= 1:
        return 0.0
    return collective_time_s(cluster, kind, bytes_per_call, size, group_tier(cluster, parallelism, mesh_order, dims))
