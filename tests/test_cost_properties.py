"""Physical sanity of the cost models under random inputs (hypothesis)."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.specs import GPU_PRESETS, MODEL_PRESETS, ClusterSpec
from cost_models.step import estimate_step

MODELS = [m for name, m in MODEL_PRESETS.items() if name != "debug"]
powers = st.sampled_from([1, 2, 4, 8])


def _estimate(model, gpu, dp_shard, cp, tp, seq, ac, batch=1, executor="autoplan"):
    par = Parallelism(dp_shard=dp_shard, cp=cp, tp=tp)
    cfg = TrainConfig(par, seq_len=seq, local_batch_size=batch, ac=ACPolicy.uniform(ac, model.n_layers))
    return estimate_step(model, ClusterSpec(gpu, par.world_size), cfg, executor)



common = dict(model=st.sampled_from(MODELS), gpu=st.sampled_from(list(GPU_PRESETS.values())),
              cp=powers, tp=st.sampled_from([1, 2, 4, 8]), ac=st.sampled_from(["none", "selective", "full"]),
              seq_k=st.sampled_from([4, 8, 32, 128, 512]), executor=st.sampled_from(["autoplan", "torchtitan"]))


@given(dp_shard=powers, **common)
def test_terms_are_finite_and_non_negative(model, gpu, dp_shard, cp, tp, ac, seq_k, executor):
    est = _estimate(model, gpu, dp_shard, cp, tp, seq_k * 1024, ac, executor=executor)
    values = list(est.memory_breakdown_bytes.values()) + list(est.time_breakdown_s.values())
    values += [est.peak_memory_bytes, est.step_time_s, est.mfu, est.tokens_per_second_per_gpu]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert 0 < est.mfu < 1


@given(dp_shard=powers, **common)
def test_memory_never_grows_with_more_fsdp_shards(model, gpu, dp_shard, cp, tp, ac, seq_k, executor):
    small = _estimate(model, gpu, dp_shard, cp, tp, seq_k * 1024, ac, executor=executor)
    big = _estimate(model, gpu, dp_shard * 2, cp, tp, seq_k * 1024, ac, executor=executor)
    assert big.peak_memory_bytes <= small.peak_memory_bytes * (1 + 1e-9)


@given(dp_shard=powers, **common)
def test_more_cp_or_tp_never_needs_more_memory_at_fixed_sequence(model, gpu, dp_shard, cp, tp, ac, seq_k, executor):
    seq = seq_k * 1024
    base = _estimate(model, gpu, dp_shard, cp, tp, seq, ac, executor=executor)
    more_cp = _estimate(model, gpu, dp_shard, cp * 2, tp, seq, ac, executor=executor)
    assert more_cp.peak_memory_bytes <= base.peak_memory_bytes * (1 + 1e-9)
    # From tp=2 up (tp=1 -> 2 also switches the runtime's loss from chunked to loss_parallel).
    if 2 <= tp < 8 or (executor == "torchtitan" and tp < 8):
        more_tp = _estimate(model, gpu, dp_shard, cp, tp * 2, seq, ac, executor=executor)
        assert more_tp.peak_memory_bytes <= base.peak_memory_bytes * (1 + 1e-9)


@given(dp_shard=powers, **common)
def test_time_and_memory_grow_with_sequence_length(model, gpu, dp_shard, cp, tp, ac, seq_k, executor):
    short = _estimate(model, gpu, dp_shard, cp, tp, seq_k * 1024, ac, executor=executor)
    long = _estimate(model, gpu, dp_shard, cp, tp, seq_k * 2048, ac, executor=executor)
    assert long.step_time_s > short.step_time_s
    assert long.peak_memory_bytes >= short.peak_memory_bytes
    # Attention is quadratic: executed FLOPs per token grow too.
    assert long.executed_flops_per_step / (2 * seq_k) > short.executed_flops_per_step / seq_k


@given(dp_shard=powers, **common)
def test_checkpointing_trades_time_for_memory(model, gpu, dp_shard, cp, tp, ac, seq_k, executor):
    seq = seq_k * 1024
    none = _estimate(model, gpu, dp_shard, cp, tp, seq, "none", executor=executor)
    sel = _estimate(model, gpu, dp_shard, cp, tp, seq, "selective", executor=executor)
    full = _estimate(model, gpu, dp_shard, cp, tp, seq, "full", executor=executor)
    assert full.peak_memory_bytes <= sel.peak_memory_bytes * (1 + 1e-9) <= none.peak_memory_bytes * (1 + 1e-9)
    # Recompute can hide behind exposed communication, so time may stay flat, never drop.
    assert none.step_time_s <= sel.step_time_s * (1 + 1e-9) <= full.step_time_s * (1 + 1e-9)
    assert none.time_breakdown_s["recompute"] <= sel.time_breakdown_s["recompute"] <= full.time_breakdown_s["recompute"]
