"""Collectives as NCCL runs them, against numbers derived by hand."""

import pytest

from cost_models.comm import collective_time_s, group_layout, make_collective
from cost_models.config import Parallelism
from cost_models.specs import ClusterSpec, resolve_gpu

H100 = resolve_gpu("h100")  # NVLink 450 GB/s, NIC 50 GB/s, bus efficiencies 0.8
US = 1e-6
ORDER = ("dp_replicate", "dp_shard", "cp", "tp")


def test_group_layout_counts_members_per_node():
    cluster = ClusterSpec(H100, 64)
    assert group_layout(cluster, Parallelism(dp_shard=64), ORDER, ("dp_shard", "cp")) == ("inter-node", 8, 8)
    # tp=8 innermost: the FSDP group has one member per node
    assert group_layout(cluster, Parallelism(dp_shard=8, tp=8), ORDER, ("dp_shard", "cp")) == ("inter-node", 1, 8)
    # tp=2 innermost: ranks 0, 2, 4, 6 of each node
    assert group_layout(cluster, Parallelism(dp_shard=32, tp=2), ORDER, ("dp_shard", "cp")) == ("inter-node", 4, 8)
    # dp_shard x cp with cp=2 inside tp=2: strides 4 and 2 -> ranks 0, 2, 4, 6 in node 0
    assert group_layout(cluster, Parallelism(dp_shard=16, cp=2, tp=2), ORDER,
                        ("dp_shard", "cp")) == ("inter-node", 4, 8)
    assert group_layout(cluster, Parallelism(dp_shard=8, tp=8), ORDER, ("tp",)) == ("intra-node", 8, 1)


def test_all_gather_over_whole_nodes_by_hand():
    # 64 ranks, 8 per node, 1 GB buffer. Bus bandwidth min(NVLink 450 x 0.8, 8 NICs x 50 x 0.8)
    # = min(360, 320) = 320 GB/s. Ring steps 63: 7 cross nodes (14 us), 56 stay (3.4 us),
    # plus NCCL's base 8.4 us.
    cluster = ClusterSpec(H100, 64)
    t = collective_time_s(cluster, "all_gather", 1e9, 64, "inter-node", ranks_per_node=8)
    latency = 8.4 * US + 56 * 3.4 * US + 7 * 14 * US  # 296.8 us
    assert t == pytest.approx(latency + (63 / 64) * 1e9 / 320e9)
    assert t == pytest.approx(3.3730e-3, rel=1e-4)


def test_all_gather_with_one_gpu_per_node_uses_one_nic():
    # 8 ranks on 8 nodes: every step crosses the network; one NIC at 50 x 0.8 = 40 GB/s.
    cluster = ClusterSpec(H100, 64)
    t = collective_time_s(cluster, "all_gather", 1e9, 8, "inter-node", ranks_per_node=1)
    assert t == pytest.approx(8.4 * US + 7 * 14 * US + (7 / 8) * 1e9 / 40e9)


def test_fsdp_over_whole_nodes_is_faster_than_one_gpu_per_node():
    # Same 64 GPUs, same per-rank shard traffic: FSDP over all 64 (8 per node) versus FSDP
    # over dp_shard=8 with tp=8 inside each node (1 per node) moving the same bytes.
    cluster = ClusterSpec(H100, 64)
    whole = make_collective(cluster, Parallelism(dp_shard=64), ORDER, "fsdp", "all_gather",
                            ("dp_shard", "cp"), 1e9, 1)
    one = make_collective(cluster, Parallelism(dp_shard=8, tp=8), ORDER, "fsdp", "all_gather",
                          ("dp_shard", "cp"), 1e9, 1)
    assert whole.tier == one.tier == "inter-node"
    assert whole.time_s < one.time_s / 6  # 320 vs 40 GB/s, ~7x


def test_nccl_issue_812_dgx_a100_all_reduce_bus_bandwidth():
    # NCCL issue #812: ~192 GB/s all-reduce bus bandwidth across DGX A100 nodes (8 x 200 Gb/s
    # HDR = 8 x 25 GB/s per node). With a 0.96 network efficiency the model gives
    # min(300 x 0.8, 8 x 25 x 0.96) = 192 GB/s.
    a100 = resolve_gpu("a100").with_overrides(inter_node_bus_efficiency=0.96)
    cluster = ClusterSpec(a100, 64)
    size = 8e9
    t = collective_time_s(cluster, "all_reduce", size, 64, "inter-node", ranks_per_node=8)
    latency = 8.4 * US + 2 * 56 * 3.4 * US + 2 * 7 * 14 * US
    bus_bandwidth = 2 * 63 / 64 * size / (t - latency)
    assert bus_bandwidth == pytest.approx(192e9, rel=1e-9)


def test_send_recv_and_all_to_all_across_nodes_use_one_nic():
    cluster = ClusterSpec(H100, 64)
    # One ring / one's own NIC, whatever the members per node.
    for kind, link in (("send_recv", 1e9), ("all_to_all", 7 / 8 * 1e9)):
        t = collective_time_s(cluster, kind, 1e9, 8, "inter-node", ranks_per_node=8)
        assert t == pytest.approx(8.4 * US + 14 * US + link / 40e9)


def test_intra_node_uses_nvlink_latency_and_bandwidth():
    cluster = ClusterSpec(H100, 8)
    t = collective_time_s(cluster, "reduce_scatter", 8e8, 8, "intra-node")
    assert t == pytest.approx(8.4 * US + 7 * 3.4 * US + 7 / 8 * 8e8 / 360e9)
