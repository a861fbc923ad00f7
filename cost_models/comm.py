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

import itertools
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


@lru_cache(maxsize=4096)
def _group_nodes(mesh_order: tuple[str, ...], degrees: tuple[int, ...], dims: frozenset[str],
                 gpus_per_node: int) -> int:
    """Nodes spanned by rank 0's group along ``dims`` (rank = row-major in mesh_order)."""
    strides = {}
    stride = 1
    for name, degree in zip(reversed(mesh_order), reversed(degrees)):
        strides[name] = stride
        stride *= degree
    sizes = dict(zip(mesh_order, degrees))
    ranges = [range(sizes[name]) for name in mesh_order if name in dims]
    names = [name for name in mesh_order if name in dims]
    nodes = set()
    for coords in itertools.product(*ranges):
        rank = sum(strides[name] * c for name, c in zip(names, coords))
        nodes.add(rank // gpus_per_node)
    return len(nodes)


def group_tier(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...],
               dims: tuple[str, ...]) -> str:
    degrees = tuple(parallelism.degree(name) for name in mesh_order)
    nodes = _group_nodes(tuple(mesh_order), degrees, frozenset(dims), cluster.gpus_per_node)
    return "intra-node" if nodes == 1 else "inter-node"


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
