"""FLOP counts and collective times against numbers worked out by hand in the test.

Each expected value is arithmetic written here from the formula's definition (GEMM shapes
of a Llama block, 2 M N K per GEMM, FA2's 2.5x backward, ring volumes (n - 1)/n, NCCL's
per-step latencies), on a GPU whose link numbers are set to round values so the
arithmetic is easy to follow. Written to kill the mutants `benchmarks/mutation.py
--group cost_core` found alive.
"""

import pytest

from cost_models import flops
from cost_models.comm import collective_link_bytes, collective_seconds, collective_time_s, make_collective
from cost_models.config import Parallelism
from cost_models.specs import MODEL_PRESETS, ClusterSpec, resolve_gpu

L8B = MODEL_PRESETS["llama3-8b"]  # d 4096, 32 heads of 128 (dq 4096), 8 kv heads (dkv 1024), ffn 14336
GPU = resolve_gpu("h100").with_overrides(
    intra_node_bytes_per_s=400e9, inter_node_bytes_per_s=50e9, intra_node_bus_efficiency=0.5,
    inter_node_bus_efficiency=0.5, collective_base_latency_s=10e-6, intra_node_latency_s=1e-6,
    inter_node_latency_s=5e-6)
NVLINK = 400e9 * 0.5  # 200 GB/s
NIC = 50e9 * 0.5  # 25 GB/s
GiB = 2**30


def test_block_gemm_shapes_under_tensor_parallel():
    assert flops.layer_gemms(L8B, 8192, 2) == (
        ("wq", 8192, 2048, 4096), ("wk", 8192, 512, 4096), ("wv", 8192, 512, 4096),
        ("wo", 8192, 4096, 2048), ("w1", 8192, 7168, 4096), ("w3", 8192, 7168, 4096), ("w2", 8192, 4096, 7168))
    # 8 kv heads of 128 split over tp 16: 64 columns each (still a real GEMM, never 0).
    assert flops.layer_gemms(L8B, 100, 16)[1] == ("wk", 100, 64, 4096)
    tiny = MODEL_PRESETS["debug"]  # dkv 32: over tp 64 it would be 0 columns; kept at 1
    assert flops.layer_gemms(tiny, 10, 64)[1] == ("wk", 10, 1, 64)


def test_matmul_params_and_forward_flops_by_hand():
    per_block = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # wq, wo; wk, wv; w1, w2, w3
    assert flops.layer_matmul_params(L8B) == per_block == 218_103_808
    gemm_flops = sum(2 * m * n * k for _, m, n, k in flops.layer_gemms(L8B, 8192, 2))
    layer = flops.layer_forward_flops(L8B, tokens_per_gpu=8192, seq_len=32768, cp=4, tp=2)
    assert layer.linear == gemm_flops == 2 * per_block * 8192 / 2
    # Causal: each query sees seq/2 keys on average; 4 x dq x keys x tokens (QK^T and PV).
    assert layer.attention == 4 * 4096 * (32768 / 2) * 8192 / 2
    full = flops.layer_forward_flops(L8B, 8192, 32768, 4, 2, causal_skip=False)
    assert full.attention == 2 * layer.attention and full.linear == layer.linear
    assert layer.total == layer.linear + layer.attention


def test_output_and_step_flops_by_hand():
    assert flops.output_forward_flops(L8B, 8192, 2) == 2 * 4096 * 128256 * 8192 / 2
    step = flops.step_forward_backward_flops(L8B, tokens_per_gpu=8192, seq_len=8192, cp=1, tp=1)
    linear_fwd = 32 * 2 * 218_103_808 * 8192 + 2 * 4096 * 128256 * 8192
    attention_fwd = 32 * 4 * 4096 * 4096 * 8192
    assert step["linear"] == pytest.approx(3 * linear_fwd, rel=1e-12)  # backward = 2 x forward
    assert step["attention"] == pytest.approx(3.5 * attention_fwd, rel=1e-12)  # FA2: 2.5 x forward


def test_link_bytes_per_collective_kind():
    assert collective_link_bytes("all_gather", 800.0, 8) == 700.0
    assert collective_link_bytes("reduce_scatter", 800.0, 8) == 700.0
    assert collective_link_bytes("all_reduce", 800.0, 8) == 1400.0
    assert collective_link_bytes("all_to_all", 800.0, 8) == 700.0
    assert collective_link_bytes("send_recv", 800.0, 8) == 800.0
    assert collective_link_bytes("all_reduce", 800.0, 1) == 0.0
    assert collective_link_bytes("send_recv", 800.0, 1) == 0.0  # no peer: nothing sent


def test_collective_time_inside_a_node_by_hand():
    cluster = ClusterSpec(GPU, 8)
    # all-gather of 1 GiB over 8 GPUs: base + 7 NVLink hops, 7/8 GiB at 200 GB/s.
    expected = 10e-6 + 7 * 1e-6 + 7 / 8 * GiB / NVLINK
    assert collective_time_s(cluster, "all_gather", GiB, 8, "intra-node") == pytest.approx(expected, rel=1e-12)
    # all-reduce: twice the steps and twice the bytes.
    expected = 10e-6 + 14 * 1e-6 + 2 * 7 / 8 * GiB / NVLINK
    assert collective_time_s(cluster, "all_reduce", GiB, 8, "intra-node") == pytest.approx(expected, rel=1e-12)
    # all-to-all: one step, 7/8 of the buffer, NVLink.
    expected = 10e-6 + 1e-6 + 7 / 8 * GiB / NVLINK
    assert collective_time_s(cluster, "all_to_all", GiB, 8, "intra-node") == pytest.approx(expected, rel=1e-12)
    assert collective_time_s(cluster, "all_gather", GiB, 1, "intra-node") == 0.0
    assert collective_time_s(cluster, "all_gather", 0.0, 8, "intra-node") == 0.0


def test_collective_time_across_nodes_by_hand():
    cluster = ClusterSpec(GPU, 16)
    # all-reduce over 16 GPUs, 8 per node, 2 nodes: 2 x 15 steps of which 2 x 1 cross the
    # network; rings striped over the 8 NICs of a node: min(200, 8 x 25) = 200 GB/s.
    expected = 10e-6 + 28 * 1e-6 + 2 * 5e-6 + 2 * 15 / 16 * GiB / min(NVLINK, 8 * NIC)
    got = collective_time_s(cluster, "all_reduce", GiB, 16, "inter-node", ranks_per_node=8)
    assert got == pytest.approx(expected, rel=1e-12)
    # One member per node (the default across nodes): 16 nodes, one NIC.
    expected = 10e-6 + 15 * 5e-6 + 15 / 16 * GiB / NIC
    assert collective_time_s(cluster, "all_gather", GiB, 16, "inter-node") == pytest.approx(expected, rel=1e-12)
    # 2 members per node: 8 nodes, 2 NICs.
    expected = 10e-6 + 8 * 1e-6 + 7 * 5e-6 + 15 / 16 * GiB / (2 * NIC)
    got = collective_time_s(cluster, "reduce_scatter", GiB, 16, "inter-node", ranks_per_node=2)
    assert got == pytest.approx(expected, rel=1e-12)
    # send/recv across nodes: one hop, the whole buffer, one NIC.
    expected = 10e-6 + 5e-6 + GiB / NIC
    got = collective_time_s(cluster, "send_recv", GiB, 2, "inter-node", ranks_per_node=1)
    assert got == pytest.approx(expected, rel=1e-12)


def test_make_collective_and_collective_seconds_place_the_group():
    cluster = ClusterSpec(GPU, 32)
    par = Parallelism(dp_shard=4, cp=8)
    order = ("dp_replicate", "dp_shard", "cp", "tp")
    # cp (innermost but tp): 8 consecutive ranks, one node. dp_shard: stride 8, 4 nodes, 1 per node.
    cp = make_collective(cluster, par, order, "cp gather", "all_gather", ("cp",), GiB, calls=3)
    assert (cp.group, cp.group_size, cp.tier, cp.ranks_per_node, cp.calls) == ("cp", 8, "intra-node", 8, 3)
    one = 10e-6 + 7 * 1e-6 + 7 / 8 * GiB / NVLINK
    assert cp.time_s == pytest.approx(3 * one, rel=1e-12)
    assert collective_seconds(cluster, par, order, "all_gather", ("cp",), GiB) == pytest.approx(one, rel=1e-12)
    dp = make_collective(cluster, par, order, "fsdp", "reduce_scatter", ("dp_shard", "cp"), GiB, calls=1)
    assert (dp.group, dp.group_size, dp.tier, dp.ranks_per_node) == ("dp_shard+cp", 32, "inter-node", 8)
    one = 10e-6 + 28 * 1e-6 + 3 * 5e-6 + 31 / 32 * GiB / min(NVLINK, 8 * NIC)
    assert dp.time_s == pytest.approx(one, rel=1e-12)
    assert collective_seconds(cluster, par, order, "reduce_scatter", ("dp_shard", "cp"), GiB) == pytest.approx(
        one, rel=1e-12)
    assert dp.bytes_per_call == GiB and dp.kind == "reduce_scatter" and dp.name == "fsdp"
    # A group of one moves nothing.
    solo = make_collective(cluster, par, order, "tp", "all_gather", ("tp",), GiB, calls=5)
    assert (solo.group_size, solo.time_s, solo.tier) == (1, 0.0, "intra-node")
    assert collective_seconds(cluster, par, order, "all_gather", ("tp",), GiB) == 0.0


def test_collective_records_at_their_edges():
    from cost_models.config import DEFAULT_MESH_ORDER

    cluster = ClusterSpec(GPU, 16, 8)
    par = Parallelism(dp_replicate=2, dp_shard=8)
    # A group of two across nodes is inter-node (each replica sits on its own node).
    pair = make_collective(cluster, par, DEFAULT_MESH_ORDER, "grads", "all_reduce", ("dp_replicate",), 1e9, 1)
    assert (pair.group_size, pair.tier) == (2, "inter-node")
    # A group of one: nothing to send, one rank on its node.
    alone = make_collective(cluster, par, DEFAULT_MESH_ORDER, "none", "all_gather", ("cp",), 1e9, 3)
    assert (alone.group_size, alone.tier, alone.ranks_per_node, alone.time_s) == (1, "intra-node", 1, 0.0)
    # One byte still pays the latency.
    assert collective_time_s(cluster, "all_reduce", 1.0, 8, "intra-node", 8) > 0.0
    assert collective_time_s(cluster, "all_reduce", 0.0, 8, "intra-node", 8) == 0.0
