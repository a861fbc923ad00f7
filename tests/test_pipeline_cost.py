"""Pipeline parallelism in the cost model, against numbers derived by hand in this file.

Bubble and in-flight counts follow Narayanan et al. 2021 (sec. 2.2) and torch 2.13's
schedules; P2P seconds are alpha-beta with the H100 preset's datasheet constants written
out below; per-stage memory is counted parameter by parameter for a small model.
"""

from dataclasses import replace

import pytest

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.pipeline import (
    bubble_fraction,
    estimate_pipeline,
    in_flight_microbatches,
    p2p_seconds_per_microbatch,
    rank_layers,
    schedule_slots,
    stage_layers,
)
from cost_models.rules import degree_violations, layout_violations, schedule_violation
from cost_models.specs import MODEL_PRESETS, ClusterSpec, ModelSpec, SpecError, resolve_gpu
from cost_models.step import estimate_step

H100 = resolve_gpu("h100")
SMALL = ModelSpec("small", vocab_size=1024, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128)


@pytest.mark.parametrize("n_layers", [2, 3, 7, 16, 32, 80, 126])
@pytest.mark.parametrize("pp, virtual", [(2, 1), (4, 1), (3, 1), (8, 1), (16, 1), (2, 2), (4, 2), (4, 3), (8, 4)])
def test_stage_split_is_the_runtimes(n_layers, pp, virtual):
    runtime = pytest.importorskip("runtime.pipeline")
    if n_layers < pp * virtual:
        with pytest.raises(ValueError):
            stage_layers(n_layers, pp * virtual)
        return
    assert stage_layers(n_layers, pp * virtual) == runtime.stage_layers(n_layers, pp * virtual)
    split = runtime.stage_layers(n_layers, pp * virtual)
    for rank in range(pp):
        expected = [i for s in runtime.stages_of_rank(rank, pp, virtual) for i in split[s]]
        assert rank_layers(n_layers, pp, virtual)[rank] == expected


def test_uneven_split_by_hand():
    # 126 layers over 16 stages: 126 = 16 x 7 + 14, so the first 14 stages hold 8, the last two 7.
    sizes = [len(s) for s in stage_layers(126, 16)]
    assert sizes == [8] * 14 + [7] * 2
    # Interleaved, 2 chunks per rank: 32 stages of 4 (the first 30) and 3; rank 15 holds stages 15 and 31.
    assert [len(r) for r in rank_layers(126, 16, 2)] == [8] * 14 + [7, 7]
    assert rank_layers(8, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("pp, m, v, slots, bubble", [
    (4, 8, 1, 11.0, 3 / 11),        # (m + p - 1) t; bubble (p - 1) / (m + p - 1)
    (4, 8, 2, 9.5, 1.5 / 9.5),      # interleaved: (m + (p - 1) / v) t
    (16, 16, 1, 31.0, 15 / 31),
    (16, 16, 4, 19.75, 3.75 / 19.75),
    (2, 2, 1, 3.0, 1 / 3),
])
def test_bubble_by_hand(pp, m, v, slots, bubble):
    assert schedule_slots(pp, m, v) == pytest.approx(slots, rel=1e-12)
    assert bubble_fraction(pp, m, v) == pytest.approx(bubble, rel=1e-12)


def test_in_flight_by_hand():
    # 1F1B: rank r warms up with min(m, pp - r) forwards; GPipe keeps all m.
    assert [in_flight_microbatches("1f1b", r, 4, 8) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight_microbatches("1f1b", r, 4, 2) for r in range(4)] == [2, 2, 2, 1]
    assert [in_flight_microbatches("gpipe", r, 4, 8) for r in range(4)] == [8] * 4
    # Interleaved, pp 4, v 2, m 8: 2 rounds of 4; warm-up (v-1) x 4 + 2 (pp-1-r), + 1 chunk, / v.
    assert [in_flight_microbatches("interleaved-1f1b", r, 4, 8, 2) for r in range(4)] == [5.5, 4.5, 3.5, 2.5]
    # m = 4: the cap m x v = 8 chunks binds on rank 0 (4 + 6 + 1 = 11).
    assert in_flight_microbatches("interleaved-1f1b", 0, 4, 4, 2) == 4.0
    # Rank 0 holds pp + (pp - 1) / v micro-batches' worth (Korthikanti et al. 2022, 4.2.3) when m is large.
    assert in_flight_microbatches("interleaved-1f1b", 0, 16, 32, 2) == pytest.approx(16 + 15 / 2)


def _cfg(par, seq, batch, m, schedule="1f1b", v=1, ac="full", n_layers=4, **kw):
    return TrainConfig(par, seq, batch, 1, ACPolicy.uniform(ac, n_layers), "allgather-kv" if par.cp > 1 else "none",
                       pp_schedule=schedule, pp_microbatches=m, pp_virtual_stages=v, **kw)


def test_p2p_seconds_by_hand():
    model = MODEL_PRESETS["llama3-8b"]  # d = 4096
    # 16 GPUs on two nodes of 8, pp 2 (outermost): stage neighbours are 8 ranks apart, across the network.
    cfg = _cfg(Parallelism(dp_shard=8, pp=2), 8192, 4, 4, n_layers=32)
    # One micro-batch of one sequence: 8192 tokens x 4096 x 2 bytes = 67,108,864 bytes.
    # One send/recv across nodes: 8.4 us base + 14 us network hop + bytes / (50 GB/s x 0.8).
    one = 8.4e-6 + 1.4e-5 + 67_108_864 / 40e9
    assert p2p_seconds_per_microbatch(model, ClusterSpec(H100, 16), cfg) == pytest.approx(2 * one, rel=1e-12)
    est = estimate_pipeline(model, ClusterSpec(H100, 16), cfg, resolve_executor(None), cfg.ac.layer_modes)
    assert est.p2p_s == pytest.approx(4 * 2 * one, rel=1e-12)  # 4 micro-batches per step
    # One node of 8, pp 2: NVLink, 8.4 us + 3.4 us + bytes / (450 GB/s x 0.8).
    cfg8 = _cfg(Parallelism(dp_shard=4, pp=2), 8192, 4, 4, n_layers=32)
    one8 = 8.4e-6 + 3.4e-6 + 67_108_864 / 360e9
    assert p2p_seconds_per_microbatch(model, ClusterSpec(H100, 8), cfg8) == pytest.approx(2 * one8, rel=1e-12)
    # Interleaved with 2 chunks per rank: twice the boundaries per micro-batch.
    cfg_v = _cfg(Parallelism(dp_shard=8, pp=2), 8192, 4, 4, "interleaved-1f1b", 2, n_layers=32)
    assert p2p_seconds_per_microbatch(model, ClusterSpec(H100, 16), cfg_v) == pytest.approx(4 * one, rel=1e-12)
    # TP 2 with sequence parallel: each rank sends half the tokens.
    cfg_tp = _cfg(Parallelism(dp_shard=4, tp=2, pp=2), 8192, 4, 4, n_layers=32)
    half = 8.4e-6 + 1.4e-5 + 33_554_432 / 40e9
    assert p2p_seconds_per_microbatch(model, ClusterSpec(H100, 16), cfg_tp) == pytest.approx(2 * half, rel=1e-12)


def test_schedule_time_is_slots_times_the_slowest_stage():
    model = MODEL_PRESETS["llama3-8b"]
    cluster = ClusterSpec(H100, 16)
    for schedule, v, m in (("1f1b", 1, 4), ("gpipe", 1, 8), ("interleaved-1f1b", 2, 4)):
        cfg = _cfg(Parallelism(dp_shard=4, pp=4), 8192, 8, m, schedule, v, n_layers=32)
        est = estimate_pipeline(model, cluster, cfg, resolve_executor(None), cfg.ac.layer_modes)
        slowest = max(s.microbatch_s for s in est.stages)
        assert est.schedule_s == pytest.approx((m + 3 / v) * slowest, rel=1e-12)
        assert est.bubble_s == pytest.approx(3 / v * slowest, rel=1e-12)
        # The last stage carries the output projection and the 128k-vocabulary loss: slowest here.
        assert est.slowest_stage.rank == 3
        # The same layers on every rank (32 / 4): the last stage's extra time is the root's alone.
        assert est.stages[3].parts_s["compute"] > est.stages[1].parts_s["compute"] == est.stages[2].parts_s["compute"]


def test_per_stage_memory_by_hand():
    """SMALL on 4 GPUs: pp 2 x FSDP 2, seq 256, local batch 4 in 2 micro-batches (512 tokens
    each), full AC, 1F1B. Parameters per block: wq 64x64 + wk, wv 2 x 64x32 + wo 64x64 +
    w1, w2, w3 3 x 64x128 + 2 norms x 64 = 36,992; embedding and output 1024 x 64 = 65,536
    each; final norm 64."""
    cfg = _cfg(Parallelism(dp_shard=2, pp=2), 256, 4, 2)
    est = estimate_step(SMALL, ClusterSpec(H100, 4), cfg)
    # The layer-backward phase (cost_models.pipeline.stage_memory_phases); the peak is the largest phase.
    first, last = (s.phases["layer_backward"] for s in est.pipeline.stages)
    assert all(s.tensor_bytes >= max(s.phase_tensor_bytes.values()) for s in est.pipeline.stages)
    block = 36_992
    stage0 = 2 * block + 65_536  # layers 0, 1 + embedding
    stage1 = 2 * block + 65_536 + 64  # layers 2, 3 + output + final norm
    assert first["params"] == stage0 / 2 * 4  # fp32 master shard
    assert first["optimizer"] == stage0 / 2 * 8  # AdamW's two fp32 states
    assert last["params"] == stage1 / 2 * 4
    # FSDP under the schedule: gathered bf16 params stay after backward, grads accumulate unsharded in fp32.
    assert first["fsdp_unsharded"] == stage0 * (2 + 4)
    assert last["fsdp_unsharded"] == stage1 * (2 + 4)
    # Saved with full AC: each block's bf16 input, 512 x 64 x 2 = 65,536 bytes per micro-batch.
    # Rank 0 holds 2 micro-batches (min(m, pp - 0)) x 2 layers; its worst block is block 0
    # (every block gathered, above): the other micro-batch's 2 layers, block 0's own input
    # (in its moment, recompute_working), + the local batch's int64 ids and labels (2 x 8 x 512
    # per micro-batch), + a grad receive buffer per micro-batch (512 x 64 x 2).
    assert first["activations"] == 1 * 2 * 65_536 + 2 * 8192 + 2 * 65_536
    # Rank 1 holds one micro-batch (min(2, 2 - 1)): at block 0 nothing else; the ids and an
    # activation receive buffer per micro-batch.
    assert last["activations"] == 2 * 8192 + 2 * 65_536
    assert est.peak_memory_bytes == max(s.peak_bytes for s in est.pipeline.stages)
    assert est.stage_peak_bytes == tuple(s.peak_bytes for s in est.pipeline.stages)
    # GPipe keeps all m micro-batches on every rank: more activation memory on the last rank.
    gpipe = estimate_step(SMALL, ClusterSpec(H100, 4), replace(cfg, pp_schedule="gpipe"))
    # (its worst block is the top one, every block staying gathered: block 0's input is saved too)
    assert gpipe.pipeline.stages[1].phases["layer_backward"]["activations"] == (1 * 2 * 65_536 + 65_536 + 2 * 8192
                                                                                + 2 * 65_536)


def test_pp_one_summary_and_breakdown_unchanged_keys():
    """pp = 1 estimates carry no pipeline fields (their output is what it was)."""
    model = MODEL_PRESETS["llama3-8b"]
    est = estimate_step(model, ClusterSpec(H100, 8), TrainConfig(Parallelism(dp_shard=8), 8192))
    assert est.pipeline is None and "pipeline_bubble_fraction" not in est.summary()
    assert "pipeline_bubble" not in est.time_breakdown_s


def test_rules_give_reasons():
    assert "pp_microbatches=2 < pp=4" in schedule_violation(4, "1f1b", 2, 1, 4)
    assert "does not divide local_batch_size=6" in schedule_violation(2, "1f1b", 4, 1, 6)
    assert "use pp_virtual_stages >= 2 with interleaved-1f1b" in schedule_violation(2, "interleaved-1f1b", 2, 1, 2)
    assert "use pp_virtual_stages >= 2" in schedule_violation(2, "1f1b", 2, 2, 2)
    assert "use one of" in schedule_violation(2, "zero-bubble", 2, 1, 2)
    assert "belong to pipeline parallelism" in schedule_violation(1, "1f1b", 2, 1, 2)
    assert schedule_violation(4, "interleaved-1f1b", 8, 2, 8) is None
    assert schedule_violation(1, "1f1b", 1, 1, 3) is None
    with pytest.raises(SpecError, match="pp_microbatches=2 < pp=4"):
        TrainConfig(Parallelism(dp_shard=2, pp=4), 1024, 2, pp_microbatches=2)
    cluster = ClusterSpec(H100, 16)
    reasons = layout_violations(SMALL, _cfg(Parallelism(dp_shard=4, pp=4), 256, 4, 4, "interleaved-1f1b", 2), cluster)
    assert any("8 stages exceed n_layers=4" in r for r in reasons)
    ring = replace(_cfg(Parallelism(dp_shard=2, cp=2, pp=4), 256, 4, 4), cp_impl="ring-allgather")
    assert any("cp_impl=ring-allgather with pp=4" in r for r in layout_violations(SMALL, ring, cluster))
    assert any("pp=8 exceeds n_layers=4" in r for r in degree_violations(SMALL, Parallelism(dp_shard=2, pp=8)))
    tied = MODEL_PRESETS["llama3.2-1b"]
    assert any("tied embeddings" in r for r in degree_violations(tied, Parallelism(dp_shard=2, pp=2)))
    assert any("degrees multiply to 8" in r for r in degree_violations(SMALL, Parallelism(dp_shard=2, pp=4), cluster))


@pytest.mark.parametrize("schedule, v, m, ac", [("1f1b", 1, 4, "full"), ("gpipe", 1, 8, "selective"),
                                                ("interleaved-1f1b", 2, 8, "none")])
def test_time_breakdown_adds_up_to_the_step(schedule, v, m, ac):
    """compute + recompute + exposed comm + bubble + optimizer = step (per step, slowest rank)."""
    model = MODEL_PRESETS["llama3-8b"]
    cfg = _cfg(Parallelism(dp_shard=2, cp=2, tp=2, pp=4), 16384, 8, m, schedule, v, ac=ac, n_layers=32)
    est = estimate_step(model, ClusterSpec(H100, 32), cfg)
    t = est.time_breakdown_s
    parts = t["compute"] + t["recompute"] + t["exposed_comm"] + t["pipeline_bubble"] + t["optimizer"]
    assert parts == pytest.approx(est.step_time_s, rel=1e-12)
    assert t["exposed_comm"] == pytest.approx(t["pipeline_p2p"] + t["exposed_fsdp_comm"] + t["exposed_tp_comm"]
                                              + t["exposed_cp_comm"],
                                              rel=1e-12)
    assert t["pipeline_bubble"] / est.pipeline.schedule_s == pytest.approx(bubble_fraction(4, m, v), rel=1e-12)
    # Tokens per GPU per step are the global batch over all 32 GPUs (a pp rank runs 1 / pp of the layers).
    assert est.tokens_per_second_per_gpu == pytest.approx(16384 * 8 * 2 / 32 / est.step_time_s, rel=1e-12)
