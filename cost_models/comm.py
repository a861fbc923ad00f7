"""Collective communication: volumes, which links they cross, and alpha-beta time as NCCL runs it.

Volumes. Ring collectives over ``n`` ranks move ``(n - 1) / n`` of the full buffer through
every rank's link for all-gather and reduce-scatter, and twice that for all-reduce
(Patarasuk & Yuan 2009; nccl-tests' "bus bandwidth" is defined the same way, see
nccl-tests doc/PERFORMANCE.md). All-to-all sends ``(n - 1) / n`` of the buffer too, but
each piece goes straight to its destination. Send/recv moves the whole buffer once.

Where the group sits. The device mesh lays ranks out in ``mesh_order`` (outermost
first); a dimension's group is the set of ranks that differ only in that dimension. The
group spans ``nodes`` nodes with ``ranks_per_node`` members in each.

Bandwidth inside a node: NVLink, per GPU and direction, times the bus efficiency.

Bandwidth across nodes, as NCCL builds it:

- all-gather / reduce-scatter / all-reduce: NCCL builds several rings (channels) and
  stripes them over all the NICs its GPUs reach ("AllReduce ... will form multiple rings
  so that it can utilize all the available NICs", nccl-tests issue #277). Derivation: in
  a ring every hop carries the same bytes ``V = (n - 1)/n x buffer``; a ring leaves each
  node once, so a node's network egress is ``V`` in total over all channels, spread over
  the ``g = ranks_per_node`` NICs next to its group members, while each GPU still sends
  ``V`` over NVLink. Hence ``time = V / min(NVLink, g x NIC)``: the bus bandwidth per GPU
  is ``min(NVLink, g x NIC)``, not one NIC. Check: NCCL issue #812 measures ~192 GB/s
  all-reduce bus bandwidth across DGX A100 nodes with 8 x 200 Gb/s HDR (min(300,
  8 x 25) = 200 GB/s x 0.96). When ``g`` is smaller than the node, the other GPUs of the
  node run their own groups of the same dimension at the same time on their own NICs,
  so ``g`` NICs per group is also what concurrency leaves it.
- send/recv (ring context parallel) is one ring: one NIC.
- all-to-all: every rank talks to every other rank through its own NIC: one NIC.

Latency (NCCL src/graph/tuning.cc, Ring/Simple): a fixed ``collective_base_latency_s``
plus, per ring step, the NVLink hop latency for steps that stay in a node and the
network hop latency for the ``nodes - 1`` steps (twice that for all-reduce) that cross.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import Parallelism
from .specs import ClusterSpec

RING_FACTOR: dict[str, float | None] = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0,
                                        "all_to_all": 1.0, "send_recv": None}


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step, with its total count and time."""

    name: str  # what it is for, e.g. "fsdp all-gather (forward)"
    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all | send_recv
    group: str  # mesh dims the group spans, e.g. "dp_shard+cp"
    group_size: int
    tier: str  # "intra-node" | "inter-node"
    bytes_per_call: float  # full (unsharded) buffer size of one call
    calls: float
    time_s: float  # total over all calls
    ranks_per_node: int = 1  # group members in one node

    @property
    def link_bytes(self) -> float:
        return collective_link_bytes(self.kind, self.bytes_per_call, self.group_size) * self.calls


def collective_link_bytes(kind: str, buffer_bytes: float, group_size: int) -> float:
    """Bytes each rank sends over its link for one call on a buffer of ``buffer_bytes``."""
    if group_size <= 1:
        return 0.0
    if kind == "send_recv":
        return buffer_bytes
    factor = RING_FACTOR[kind]
    assert factor is not None
    return factor * (group_size - 1) / group_size * buffer_bytes


def group_tier(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...],
               dims: tuple[str, ...]) -> str:
    return group_layout(cluster, parallelism, mesh_order, dims)[0]


def group_layout(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...],
                 dims: tuple[str, ...]) -> tuple[str, int, int]:
    """(tier, ranks_per_node, nodes) of the group of rank 0 along ``dims``."""
    return _layout(cluster.gpus_per_node, (parallelism.dp_replicate, parallelism.dp_shard, parallelism.cp,
                                           parallelism.tp), tuple(mesh_order), tuple(dims))


@lru_cache(maxsize=65536)
def _layout(gpus_per_node: int, degrees: tuple[int, int, int, int], mesh_order: tuple[str, ...],
            dims: tuple[str, ...]) -> tuple[str, int, int]:
    """Where the group of rank 0 along ``dims`` sits.

    Ranks are row-major in ``mesh_order``: a dim's stride is the product of the degrees
    inside it. Nodes hold consecutive ranks, so the group stays in node 0 exactly when
    its largest rank, sum(stride x (degree - 1)), does. Members in node 0: count, dim by
    dim from the innermost, how many of its coordinates keep the rank below the node
    size (exact when degrees and node size are powers of two, as the planner's are).
    """
    by_name = dict(zip(("dp_replicate", "dp_shard", "cp", "tp"), degrees))
    stride = 1
    last_rank = 0
    size = 1
    in_node = 1
    for name in reversed(mesh_order):
        degree = by_name[name]
        if name in dims and degree > 1:
            last_rank += stride * (degree - 1)
            size *= degree
            fit = max(1, min(degree, -(-gpus_per_node // stride)))  # coordinates with stride*k < node
            in_node *= fit if stride < gpus_per_node else 1
        stride *= degree
    if last_rank < gpus_per_node:
        return "intra-node", size, 1
    in_node = max(1, min(in_node, size))
    return "inter-node", in_node, max(1, size // in_node)


def _bus_bytes_per_s(cluster: ClusterSpec, kind: str, tier: str, ranks_per_node: int) -> float:
    gpu = cluster.gpu
    nvlink = gpu.intra_node_bytes_per_s * gpu.intra_node_bus_efficiency
    if tier == "intra-node":
        return nvlink
    nic = gpu.inter_node_bytes_per_s * gpu.inter_node_bus_efficiency
    if kind in ("send_recv", "all_to_all"):
        return nic  # one ring / each GPU's own NIC (nccl-tests #277)
    # Rings striped over the NICs of the group's members in a node (derivation above).
    return min(nvlink, ranks_per_node * nic)


def collective_time_s(cluster: ClusterSpec, kind: str, buffer_bytes: float, group_size: int,
                      tier: str, ranks_per_node: int | None = None) -> float:
    """Alpha-beta time of one collective (or one point-to-point transfer).

    ``ranks_per_node`` defaults to 1 across nodes (one member per node: one NIC) and to
    the whole group inside a node.
    """
    if group_size <= 1 or buffer_bytes <= 0:
        return 0.0
    gpu = cluster.gpu
    if ranks_per_node is None:
        ranks_per_node = group_size if tier == "intra-node" else 1
    nodes = 1 if tier == "intra-node" else max(2, group_size // max(1, ranks_per_node))
    if kind in ("send_recv", "all_to_all"):
        steps, inter_steps = 1, (1 if tier == "inter-node" else 0)
    else:
        factor = 2 if kind == "all_reduce" else 1
        steps = factor * (group_size - 1)
        inter_steps = factor * (nodes - 1) if tier == "inter-node" else 0
    latency = (gpu.collective_base_latency_s + (steps - inter_steps) * gpu.intra_node_latency_s
               + inter_steps * gpu.inter_node_latency_s)
    bandwidth = _bus_bytes_per_s(cluster, kind, tier, ranks_per_node)
    return latency + collective_link_bytes(kind, buffer_bytes, group_size) / bandwidth


def make_collective(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...],
                    name: str, kind: str, dims: tuple[str, ...], bytes_per_call: float,
                    calls: float) -> Collective:
    size = 1
    for dim in dims:
        size *= parallelism.degree(dim)
    if size > 1:
        tier, per_node, _ = group_layout(cluster, parallelism, mesh_order, dims)
    else:
        tier, per_node = "intra-node", 1
    one = collective_time_s(cluster, kind, bytes_per_call, size, tier, per_node)
    return Collective(name=name, kind=kind, group="+".join(dims), group_size=size, tier=tier,
                      bytes_per_call=bytes_per_call, calls=calls, time_s=one * calls, ranks_per_node=per_node)


def collective_seconds(cluster: ClusterSpec, parallelism: Parallelism, mesh_order: tuple[str, ...], kind: str,
                       dims: tuple[str, ...], bytes_per_call: float) -> float:
    """Time of one call, without building a ``Collective`` record (the planner's hot path)."""
    size = 1
    for dim in dims:
        size *= parallelism.degree(dim)
    if size <= 1:
        return 0.0
    tier, per_node, _ = group_layout(cluster, parallelism, mesh_order, dims)
    return collective_time_s(cluster, kind, bytes_per_call, size, tier, per_node)
