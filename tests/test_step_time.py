"""Step-time mechanisms, each pinned by a hand-derived number or a monotone property."""

import pytest

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.kernels import (
    attention_rate_per_s,
    elementwise_bytes_per_token,
    gemm_shape_efficiency,
    gemm_time_s,
    optimizer_time_s,
)
from cost_models.specs import MODEL_PRESETS, ClusterSpec, resolve_gpu
from cost_models.step import estimate_step, layer_time, time_terms

L8B = MODEL_PRESETS["llama3-8b"]
L70B = MODEL_PRESETS["llama3-70b"]
H100 = resolve_gpu("h100")
TT = resolve_executor("torchtitan")


def _cfg(seq=8192, cp=1, tp=1, dp_shard=8, impl=None, batch=1, ac="none", layers=32):
    par = Parallelism(dp_shard=dp_shard, cp=cp, tp=tp)
    return TrainConfig(par, seq_len=seq, local_batch_size=batch, ac=ACPolicy.uniform(ac, layers),
                       cp_impl=impl or ("none" if cp == 1 else "ring-allgather"))


# --------------------------------------------------------------------------- GEMMs / power


def test_power_cap_scales_clock_by_cube_root():
    capped = resolve_gpu("h100-96gb-500w")
    assert capped.clock_fraction == pytest.approx((500 / 700) ** (1 / 3), abs=1e-4)
    assert capped.clock_fraction == pytest.approx(0.8939, abs=1e-4)
    derived = capped.with_overrides(clock_fraction_at_limit=None, power_limit_w=400.0)
    assert derived.clock_fraction == pytest.approx((400 / 700) ** (1 / 3))
    full = capped.with_overrides(power_limit_w=None)
    assert full.clock_fraction == 1.0
    big = (16384, 14336, 4096)
    assert gemm_time_s(capped, *big) / gemm_time_s(full, *big) == pytest.approx(1 / 0.8939, rel=1e-4)
    # Attention kernels slow down with the clock too; HBM-bound work does not.
    assert attention_rate_per_s(capped, "flash", False, 16384) / attention_rate_per_s(full, "flash", False, 16384) \
        == pytest.approx(0.8939)


def test_gemm_shape_efficiency_by_hand():
    # M=8192, N=512, K=4096 on 132 SMs: tiles ceil(8192/128) x ceil(512/256) = 64 x 2 = 128,
    # one wave of 132 SMs -> 128/132; fill/drain 4096 / (4096 + 128).
    assert gemm_shape_efficiency(8192, 512, 4096, 132) == pytest.approx(128 / 132 * 4096 / 4224)
    # 133 tiles need two waves: 133 / 264.
    assert gemm_shape_efficiency(133 * 128, 256, 4096, 133 - 0 - 1) == pytest.approx(133 / 264 * 4096 / 4224)


def test_small_tp_shards_lose_matmul_efficiency():
    # Per-GPU matmul seconds x tp = the whole block's matmul work at that sharding: grows
    # as the per-GPU dims shrink (tp=8 leaves wk/wv 128 columns and wo's K at 512).
    cluster = ClusterSpec(H100, 8)
    per_work = []
    for tp in (1, 2, 4, 8):
        lt = layer_time(L8B, cluster, _cfg(tp=tp, dp_shard=8 // tp, batch=1), TT)
        per_work.append(lt.matmul_s * tp)
    assert per_work == sorted(per_work)
    assert per_work[-1] > per_work[0] * 1.03


# --------------------------------------------------------------------------- attention


def test_cudnn_vs_flash_follow_the_published_tables():
    # Hopper forward: 631 vs 329 TFLOP/s (pytorch #142132); Ampere: cuDNN 0.82x flash
    # (transformers PR #48163).
    for backward in (False, True):
        flash = attention_rate_per_s(H100, "flash", backward, 16384)
        cudnn = attention_rate_per_s(H100, "cudnn", backward, 16384)
        assert cudnn > 1.5 * flash
    assert attention_rate_per_s(H100, "cudnn", False, 16384) / attention_rate_per_s(H100, "flash", False, 16384) \
        == pytest.approx(631 / 329)
    a100 = resolve_gpu("a100")
    assert attention_rate_per_s(a100, "cudnn", False, 16384) / attention_rate_per_s(a100, "flash", False, 16384) \
        == pytest.approx(0.82)
    # FA2 at 16k keys runs at attention_efficiency of peak forward, 63/73 of that backward.
    assert attention_rate_per_s(H100, "flash", False, 16384) == pytest.approx(989e12 * 0.35)
    assert attention_rate_per_s(H100, "flash", True, 16384) == pytest.approx(989e12 * 0.35 * 0.86)


def test_backend_is_an_executor_field_and_changes_step_time():
    cluster = ClusterSpec(H100, 8)
    cfg = _cfg(seq=65536, ac="full")
    flash = estimate_step(L8B, cluster, cfg, TT)
    cudnn = estimate_step(L8B, cluster, cfg, TT.with_overrides(attention_backend="cudnn"))
    assert cudnn.time_breakdown_s["attention"] < 0.6 * flash.time_breakdown_s["attention"]
    assert cudnn.step_time_s < flash.step_time_s


def test_portable_allgather_cp_runs_flash_even_when_cudnn_is_asked():
    # Lower-right causal masks dispatch to flash (torch/nn/attention/bias.py), never cuDNN.
    cluster = ClusterSpec(H100, 8)
    cfg = _cfg(seq=65536, cp=4, dp_shard=2, impl="allgather-kv")
    ex = resolve_executor("autoplan")
    a = layer_time(L8B, cluster, cfg, ex)
    b = layer_time(L8B, cluster, cfg, ex.with_overrides(attention_backend="cudnn"))
    assert a.attention_s == b.attention_s


def test_native_gqa_runs_flash_whatever_backend_is_preferred():
    # SDPA's enable_gqa=True works only on flash and math (torch 2.13 docstring).
    cluster = ClusterSpec(H100, 8)
    runtime = resolve_executor("autoplan")
    a = layer_time(L8B, cluster, _cfg(), runtime)
    b = layer_time(L8B, cluster, _cfg(), runtime.with_overrides(attention_backend="cudnn"))
    assert a.attention_s == b.attention_s
    mha = MODEL_PRESETS["llama2-13b"]  # 40 kv heads: no GQA, the preference holds
    a = layer_time(mha, cluster, _cfg(layers=40), runtime)
    b = layer_time(mha, cluster, _cfg(layers=40), runtime.with_overrides(attention_backend="cudnn"))
    assert b.attention_s < a.attention_s


def test_attention_ramps_with_keys_per_call():
    # rate(L) ~ L / (L + 512), normalized at 16k: half of the 16k rate at 512 keys (x 16896/16384).
    ratio = attention_rate_per_s(H100, "flash", False, 512) / attention_rate_per_s(H100, "flash", False, 16384)
    assert ratio == pytest.approx(0.5 * 16896 / 16384)


# --------------------------------------------------------------------------- context parallel


def test_cp_cost_per_token_rises_as_tokens_per_gpu_fall():
    seq = 131072
    for impl in ("ring-allgather", "ring-alltoall", "allgather-kv"):
        per_token = []
        for cp in (2, 4, 8):
            cluster = ClusterSpec(H100, 8)
            cfg = _cfg(seq=seq, cp=cp, dp_shard=8 // cp, impl=impl)
            lt = layer_time(L8B, cluster, cfg, TT)
            cp_overhead = lt.cp_elementwise_s + lt.cp_comm_s
            per_token.append(cp_overhead / cfg.tokens_per_gpu)
        assert per_token == sorted(per_token), impl
    # Relative to the attention it serves, the ring merge grows with cp too.
    rel = []
    for cp in (2, 4, 8):
        lt = layer_time(L8B, ClusterSpec(H100, 8), _cfg(seq=seq, cp=cp, dp_shard=8 // cp), TT)
        rel.append(lt.cp_elementwise_s / lt.attention_s)
    assert rel == sorted(rel)


def test_ring_merge_bytes_by_hand():
    # cp=4 ring on 8B, 32768 local tokens, d_q = 4096, d_kv = 1024, HBM 3.35 TB/s.
    # forward: 3 merge steps x (3/4 x 40 B x d_q + 4 B x 2 d_kv) + once 12 B x d_q per token
    # backward: 3 steps x (3/4 x 10 B x d_q + 18 B x 2 d_kv + 4 B x 2 d_kv)
    tokens = 32768
    fwd = tokens * (3 * (0.75 * 40 * 4096 + 4 * 2 * 1024) + 12 * 4096)
    bwd = tokens * 3 * (0.75 * 10 * 4096 + 18 * 2 * 1024 + 4 * 2 * 1024)
    lt = layer_time(L8B, ClusterSpec(H100, 8), _cfg(seq=131072, cp=4, dp_shard=2), TT)
    assert lt.cp_elementwise_s == pytest.approx((fwd + bwd) / 3.35e12)


def test_ring_allgather_forward_exposes_the_gather_beyond_the_diagonal_step():
    # 8B, cp=8 in one node, seq 16384: 2048 local tokens. K+V of the whole sequence:
    # 2 B x 16384 x 2 x 1024 = 67,108,864 B; all-gather 8.4 + 7 x 3.4 us + 7/8 x that / 360 GB/s.
    gather = 8.4e-6 + 7 * 3.4e-6 + 7 / 8 * 67_108_864 / 360e9
    # Attention forward: 4 x 32 heads x 128 x (16384 / 2 keys) x 2048 queries FLOPs at
    # 989 TFLOP/s x 0.35 x ramp(1536 keys per call: 1.5 chunks of 1024) = (1536/2048) / (16384/16896).
    flops = 4 * 32 * 128 * 8192 * 2048
    rate = 989e12 * 0.35 * (1536 / 2048) / (16384 / 16896)
    diagonal_step = flops / rate / 8
    lt = layer_time(L8B, ClusterSpec(H100, 8), _cfg(seq=16384, cp=8, dp_shard=1), TT)
    assert lt.cp_recompute_comm_s == pytest.approx(gather - diagonal_step)  # forward exposure
    assert gather - diagonal_step == pytest.approx(66.9e-6, rel=0.02)
    # ring-alltoall: each of the 7 bf16 hops (1/8 of the buffer, 8.4 + 3.4 us latency)
    # hides behind one step's attention.
    a2a = layer_time(L8B, ClusterSpec(H100, 8), _cfg(seq=16384, cp=8, dp_shard=1, impl="ring-alltoall"), TT)
    hop = 8.4e-6 + 3.4e-6 + 67_108_864 / 8 / 360e9
    assert hop < diagonal_step
    assert a2a.cp_recompute_comm_s == 0.0


def test_cp_and_fsdp_share_the_nic():
    # CP across nodes, FSDP across nodes: CP traffic hidden behind attention still occupies
    # the links FSDP would hide in, so FSDP's hideable traffic grows by it.
    cluster = ClusterSpec(H100, 64)
    cfg = TrainConfig(Parallelism(dp_shard=8, cp=8), seq_len=131072, cp_impl="ring-alltoall",
                      mesh_order=("dp_replicate", "cp", "dp_shard", "tp"))
    lt = layer_time(L8B, cluster, cfg, TT)
    terms = time_terms(L8B, cluster, cfg, TT)
    assert lt.cp_hidden_comm_s > 0
    assert terms.fsdp_comm_s == pytest.approx(32 * lt.fsdp_comm_s - lt.fsdp_first_gather_s
                                              - lt.fsdp_last_scatter_s + 32 * lt.cp_hidden_comm_s)


# --------------------------------------------------------------------------- root, loss, optimizer


def test_root_unit_comm_appears():
    cluster = ClusterSpec(H100, 8)
    cfg = _cfg()
    est = estimate_step(L8B, cluster, cfg, TT)
    names = [c.name for c in est.collectives]
    assert any("root unit all-gather" in n for n in names)
    # By hand: root = embedding + output + norm = 2 x 128256 x 4096 + 4096 params.
    root = 2 * 128256 * 4096 + 4096
    gather = 8.4e-6 + 7 * 3.4e-6 + 7 / 8 * 2 * root / 360e9
    scatter = 8.4e-6 + 7 * 3.4e-6 + 7 / 8 * 4 * root / 360e9
    lt = layer_time(L8B, cluster, cfg, TT)
    tail = time_terms(L8B, cluster, cfg, TT).fsdp_tail_s
    assert tail == pytest.approx(gather + scatter + lt.fsdp_first_gather_s + lt.fsdp_last_scatter_s)
    assert est.time_breakdown_s["exposed_fsdp_comm"] >= gather + scatter


def test_chunked_loss_recompute_is_charged_under_tp():
    cluster = ClusterSpec(H100, 8)
    runtime = resolve_executor("autoplan")
    for tp in (1, 2):
        terms = time_terms(L8B, cluster, _cfg(tp=tp, dp_shard=8 // tp), runtime)
        assert terms.root_recompute_s > 0
    assert time_terms(L8B, cluster, _cfg(tp=2, dp_shard=4), TT).root_recompute_s == 0.0


def test_optimizer_foreach_false_is_dispatch_bound():
    # 8B: 32 x 9 + 3 = 291 parameter tensors x ((8 AdamW + 2 clipping) DTensor ops x 30 us
    # + the step count increment, a plain op, 10 us) = 90.2 ms.
    cfg = _cfg()
    runtime = resolve_executor("autoplan")
    assert optimizer_time_s(L8B, H100, cfg, runtime) == pytest.approx(291 * (10 * 30e-6 + 10e-6))
    assert optimizer_time_s(L8B, H100, cfg, runtime) == pytest.approx(0.09021)
    # foreach: bound by HBM traffic of the shard, 8.03e9 / 8 x 32 bytes at 3.35 TB/s.
    assert optimizer_time_s(L8B, H100, cfg, TT) == pytest.approx(8_030_261_248 / 8 * 32 / 3.35e12)


def test_torchtitan_selective_recomputes_every_second_matmul():
    cluster = ClusterSpec(H100, 8)
    cfg = _cfg()
    lt_tt = layer_time(L8B, cluster, cfg, TT)
    lt_rt = layer_time(L8B, cluster, cfg, resolve_executor("autoplan"))
    extra = lt_tt.recompute_s["selective"] - lt_rt.recompute_s["selective"]
    # wk (d x d_kv), wo (d_q x d), w3 (d x f) at 8192 tokens
    flops = 2 * 8192 * (4096 * 1024 + 4096 * 4096 + 4096 * 14336)
    assert extra > flops / 989e12  # at most peak speed
    assert extra < flops / (989e12 * 0.72 * 0.9)


# --------------------------------------------------------------------------- compile


def test_compile_lowers_elementwise_time():
    eager = elementwise_bytes_per_token(L8B, TT)
    compiled = elementwise_bytes_per_token(L8B, TT.with_overrides(compile=True))
    # torchtitan's repeat_kv copies K and V to the 32 query heads: 2 x (2 B x 1024 + 2 B x 4096)
    repeat_kv = 2 * (2 * 1024 + 2 * 4096)
    # eager: 2 x 4096 x 28 + 5120 x 28 + 14336 x 10 + 2 x 4096 x 6 + 4096 x 4
    assert eager == 581632 + repeat_kv
    # compiled: 2 x 4096 x 4 + 5120 x 4 + 14336 x 6 + 2 x 4096 x 6 + 4096 x 4
    assert compiled == 204800 + repeat_kv
    # the runtime hands K/V to SDPA at kv width (enable_gqa): no copy
    assert elementwise_bytes_per_token(L8B, resolve_executor("autoplan")) == 581632
    cluster = ClusterSpec(H100, 8)
    a = estimate_step(L8B, cluster, _cfg(), "torchtitan")
    b = estimate_step(L8B, cluster, _cfg(), "torchtitan-compile")
    assert b.time_breakdown_s["elementwise"] < a.time_breakdown_s["elementwise"]
    assert b.step_time_s < a.step_time_s
    assert b.time_breakdown_s["matmul"] == a.time_breakdown_s["matmul"]


def test_host_overhead_shows_only_when_the_gpu_work_is_small():
    cluster = ClusterSpec(H100, 8)
    big = layer_time(L8B, cluster, _cfg(seq=8192), TT)
    assert big.forward_s > 60 * 10e-6 * 10
    tiny = MODEL_PRESETS["debug"]
    lt = layer_time(tiny, cluster, _cfg(seq=128, layers=2), TT)
    assert lt.forward_s == pytest.approx(60 * 10e-6)


# --------------------------------------------------------------------------- presets and files


def test_llama2_13b_preset_parameter_count():
    # per layer 4 x 5120^2 + 3 x 5120 x 13824 + 2 x 5120 = 317,204,480; x 40 layers
    # + embedding and output 2 x 32000 x 5120 + final norm 5120
    assert MODEL_PRESETS["llama2-13b"].num_params == 40 * 317_204_480 + 2 * 32000 * 5120 + 5120 == 13_015_864_320


def test_gpu_from_file_is_a_preset_plus_overrides(tmp_path):
    from cost_models.specs import SpecError

    path = tmp_path / "my-h100.yaml"
    path.write_text("base: h100\npower_limit_w: 500\nhbm_bytes_per_s: 2.4e12\n")
    gpu = resolve_gpu(str(path))
    assert gpu.name == "my-h100" and gpu.power_limit_w == 500 and gpu.hbm_bytes_per_s == 2.4e12
    assert gpu.clock_fraction == pytest.approx((500 / 700) ** (1 / 3))
    # A new limit on a capped base derives the clock again instead of keeping the base's.
    path.write_text("base: h100-96gb-500w\npower_limit_w: 600\n")
    assert resolve_gpu(str(path)).clock_fraction == pytest.approx((600 / 700) ** (1 / 3))
    assert gpu.bf16_flops_per_s == resolve_gpu("h100").bf16_flops_per_s
    js = tmp_path / "g.json"
    js.write_text('{"base": "a100", "inter_node_bytes_per_s": 50e9}')
    assert resolve_gpu(str(js)).inter_node_bytes_per_s == 50e9
    for text, match in (("base: h100\nclock: 2\n", "unknown GPU field 'clock'"),
                        ("base: tpu\n", "base='tpu' is no GPU preset"),
                        ("base: h100\nmatmul_efficiency: 1.5\n", "matmul_efficiency=1.5"),
                        ("base: h100\nsm_count: many\n", "sm_count='many' must be a number"),
                        ("- 1\n", "expected a mapping")):
        path.write_text(text)
        with pytest.raises(SpecError, match=match) as error:
            resolve_gpu(str(path))
        assert "\n" not in str(error.value)
    with pytest.raises(SpecError, match="file not found"):
        resolve_gpu(str(tmp_path / "missing.yaml"))


def test_torchtitan_selective_under_tp_regathers_two_inputs():
    # SAC saves mm / SDPA / reduce_scatter outputs, not all-gathers: recomputing wk and w3
    # re-runs the attention and FFN all-gathers. tp=2, 8192 tokens: buffer 2 B x 8192 x 4096;
    # one all-gather 8.4 + 3.4 us + 1/2 x 67,108,864 B / 360 GB/s.
    one = 8.4e-6 + 3.4e-6 + 0.5 * 67_108_864 / 360e9
    cluster = ClusterSpec(H100, 8)
    cfg = _cfg(tp=2, dp_shard=4)
    terms = time_terms(L8B, cluster, cfg, TT)
    assert terms.recompute_comm_s["selective"] == pytest.approx(2 * one)
    assert time_terms(L8B, cluster, cfg, resolve_executor("autoplan")).recompute_comm_s["selective"] == 0.0
