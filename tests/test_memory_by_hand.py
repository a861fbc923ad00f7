"""The memory model's closed form against its phase walk on made-up terms (every
candidate phase gets to be the largest), the loss's allocator request sequence and the
kernel cost helpers (GEMM, loss traffic, attention keys and backend, optimizer), by
hand-derived numbers."""

import random

import pytest

from cost_models.activations import LayerMemory, layer_memory, torchtitan_layer_sac_modes
from cost_models.allocator import loss_allocation_events, simulate_allocator
from cost_models.config import ACPolicy, Parallelism, Precision, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.kernels import (
    attention_backend_for,
    attention_keys_per_call,
    gemm_time_s,
    loss_elementwise_bytes_per_token,
    optimizer_time_s,
    parameter_tensors,
)
from cost_models.memory import MemoryTerms, estimate_memory, memory_terms, predict_reserved_peak_bytes
from cost_models.models import ModelSpec
from cost_models.specs import GPU_PRESETS, MODEL_PRESETS

L8B = MODEL_PRESETS["llama3-8b"]
MODES = ("full", "selective", "none")


def _terms(rng: random.Random, n_layers: int) -> MemoryTerms:
    def draw():
        return rng.choice([0, rng.randint(1, 10), rng.randint(1, 1000)])
    logits, stranded = draw(), draw()
    return MemoryTerms(
        static_bytes=draw(), sharded_grad_bytes_per_layer=draw(), sharded_grad_bytes_root=draw(),
        root_unsharded_bytes=draw(), root_activation_bytes=draw(), input_bytes=draw(),
        loss_working_bytes=logits + stranded, forward_block_bytes=draw(), backward_block_bytes=draw(),
        root_grad_bytes=draw(), root_reduce_bytes=draw(), optimizer_temp_bytes=draw(),
        layer=LayerMemory(saved={m: draw() for m in MODES}, working={m: draw() for m in MODES}),
        comm_buffer_bytes=draw(), fixed_overhead_bytes=0.0, fragmentation=0.0, n_layers=n_layers,
        loss_stranded_bytes=stranded, loss_logits_bytes=logits)


def test_closed_form_peak_equals_the_phase_walk_on_made_up_terms():
    # Real models leave most of the closed form's candidates dominated; made-up byte
    # counts (zeros, small and large) let each one be the maximum somewhere.
    rng = random.Random(0)
    for _ in range(3000):
        n_layers = rng.randint(1, 5)
        n_full = rng.randint(0, n_layers)
        n_sel = rng.randint(0, n_layers - n_full)
        n_none = n_layers - n_full - n_sel
        terms = _terms(rng, n_layers)
        modes = ("full",) * n_full + ("selective",) * n_sel + ("none",) * n_none
        walk = max(sum(p.values()) - p["comm_buffers"] for p in terms.phases(modes).values())
        assert terms.peak_tensor_bytes_for_counts(n_full, n_sel, n_none) == walk, (n_full, n_sel, n_none, terms)


def test_tensor_peak_names_the_largest_phase():
    rng = random.Random(1)
    terms = _terms(rng, 2)
    big = dict(vars(terms))
    big.update(optimizer_temp_bytes=10**9)
    name, phase = MemoryTerms(**big).tensor_peak(("none", "none"))
    assert name == "optimizer" and phase["activations"] == 10**9
    big.update(optimizer_temp_bytes=0, loss_logits_bytes=10**9, loss_working_bytes=10**9)
    name, phase = MemoryTerms(**big).tensor_peak(("none", "none"))
    assert name == "loss" and phase["logits_loss"] == 10**9


def test_reserved_peak_scales_the_tensor_walk_by_the_fragmentation_given():
    cfg = TrainConfig(Parallelism(dp_shard=8), 8192, ac=ACPolicy.uniform("selective", 32))
    terms = memory_terms(L8B, cfg, "torchtitan")
    walk = max(sum(p.values()) - p["comm_buffers"] for p in terms.phases(cfg.ac.layer_modes).values())
    assert predict_reserved_peak_bytes(L8B, cfg, "torchtitan") == estimate_memory(L8B, cfg, "torchtitan").reserved_peak_bytes
    none, quarter = (predict_reserved_peak_bytes(L8B, cfg, "torchtitan", fragmentation=f) for f in (0.0, 0.25))
    assert none == pytest.approx(walk + terms.allocator_pool_bytes, rel=1e-12)
    assert quarter - none == pytest.approx(0.25 * walk, rel=1e-9)


def test_loss_request_sequence_by_hand():
    # Full-sequence fp32 cross-entropy (torchtitan: one chunk), tp=1: logits (2 bytes per
    # element), the fp32 copy and log-softmax (4 each); ``del pred`` frees the logits
    # before backward; nll grad and log-softmax grad (4 each), then the logits' grad (2).
    tiny = ModelSpec("t", vocab_size=100, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16)
    cfg = TrainConfig(Parallelism(dp_shard=2, cp=2), 64, local_batch_size=3)
    L = 96 * 100  # 3 x 64 / 2 tokens on this GPU x vocab
    assert loss_allocation_events(tiny, cfg, resolve_executor("torchtitan")) == [
        ("alloc", "0:logits", 2 * L), ("alloc", "0:up", 4 * L), ("alloc", "0:lsm", 4 * L), ("free", "0:up", 0.0),
        ("free", "0:logits", 0.0), ("alloc", "0:gnll", 4 * L), ("alloc", "0:glsm", 4 * L), ("free", "0:gnll", 0.0),
        ("free", "0:lsm", 0.0), ("alloc", "0:grad", 2 * L), ("free", "0:glsm", 0.0), ("free", "0:grad", 0.0)]
    # tp=2: loss_parallel on vocab-sharded logits (L / 2 per GPU), logits kept to the end.
    # As traced op by op at TP 2 and 8: exp is freed after its all-reduced sum, before the
    # result is written; backward holds the saved result, zeros, exp(result) and their sum,
    # and frees two of them before the bf16 grad is cast back.
    kept = resolve_executor("torchtitan").with_overrides(logits_freed_before_backward=False)
    tp2 = TrainConfig(Parallelism(dp_shard=1, tp=2), 64, local_batch_size=3)
    H = 192 * 100 / 2
    assert [(kind, name, n / H) for kind, name, n in loss_allocation_events(tiny, tp2, kept)] == [
        ("alloc", "0:logits", 2), ("alloc", "0:up", 4), ("alloc", "0:shifted", 4), ("alloc", "0:exp", 4),
        ("free", "0:exp", 0), ("alloc", "0:result", 4), ("free", "0:shifted", 0), ("free", "0:up", 0),
        ("alloc", "0:zeros", 4), ("alloc", "0:exp2", 4), ("alloc", "0:sum", 4),
        ("free", "0:zeros", 0), ("free", "0:exp2", 0), ("alloc", "0:grad", 2), ("free", "0:sum", 0),
        ("free", "0:result", 0), ("free", "0:logits", 0), ("free", "0:grad", 0)]


def test_sac_option_error_is_one_line():
    with pytest.raises(ValueError, match=r"^selective_ac_option=-1: must be >= 0$"):
        torchtitan_layer_sac_modes(4, -1)


# ----------------------------------------------------------------------------- kernels

GPU = GPU_PRESETS["h100-sxm-80gb"].with_overrides(bf16_flops_per_s=1e15, matmul_efficiency=0.5,
                                                   hbm_bytes_per_s=1e12, sm_count=132)


def test_gemm_time_compute_bound_by_hand():
    # 4096^3: tiles 32 x 16 = 512 in ceil(512 / 132) = 4 waves of 132 SMs; fill 4096 / (4096 + 128)
    expected = 2 * 4096**3 / (0.5e15 * (512 / 528) * (4096 / 4224))
    assert gemm_time_s(GPU, 4096, 4096, 4096) == pytest.approx(expected, rel=1e-12)


def test_gemm_time_memory_bound_by_hand():
    # 2 x 4096 x 8192 streams A (2 x 4096), B (4096 x 8192) and C (2 x 8192) in bf16
    assert gemm_time_s(GPU, 2, 8192, 4096) == pytest.approx(2 * (2 * 4096 + 4096 * 8192 + 2 * 8192) / 1e12, rel=1e-12)
    assert gemm_time_s(GPU, 4096, 2, 8192) == pytest.approx(2 * (4096 * 8192 + 8192 * 2 + 4096 * 2) / 1e12, rel=1e-12)
    # a 1-wide GEMM still costs (streams its operands)
    assert gemm_time_s(GPU, 1, 1, 1) == pytest.approx(max(2 / (0.5e15 * (1 / 132) * (1 / 129)), 6 / 1e12))


def test_gemm_with_an_empty_dimension_is_free():
    for shape in ((0, 5, 5), (5, 0, 5), (5, 5, 0), (-1, 5, 5), (0, 0, 0)):
        assert gemm_time_s(GPU, *shape) == 0.0


def test_loss_elementwise_traffic_by_hand():
    model = ModelSpec("v", vocab_size=1000, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16)
    # forward: cast (2 + 4), log-softmax (4 + 4), nll read (4) = 18; backward: nll grad,
    # log-softmax backward (3 x 4) + cast back (4 + 2) = 18
    assert loss_elementwise_bytes_per_token(model, 2) == 36 * 1000
    assert loss_elementwise_bytes_per_token(model, 4) == 40 * 1000  # fp32 logits: 20 + 20


def test_attention_keys_per_call_by_hand():
    def keys(cp, impl):
        return attention_keys_per_call(TrainConfig(Parallelism(cp=cp), 8192, cp_impl=impl))
    assert keys(1, "allgather-kv") == keys(1, "ring-allgather") == 8192.0
    assert keys(2, "allgather-kv") == keys(8, "allgather-kv") == 4096.0  # causal prefix: S / 2 on average
    assert keys(2, "ring-allgather") == 0.75 * 4096 and keys(4, "ring-alltoall") == 0.75 * 2048


def test_attention_backend_by_hand():
    gqa = L8B  # 32 query heads on 8 K/V heads
    mha = ModelSpec("m", vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=16)

    def backend(cp, impl, preferred, native_gqa=False, model=None):
        ex = resolve_executor("autoplan").with_overrides(attention_backend=preferred, native_gqa=native_gqa)
        return attention_backend_for(TrainConfig(Parallelism(cp=cp), 8192, cp_impl=impl), ex, model)
    # all-gather-KV CP's lower-right mask: flash, or efficient when preferred; never cuDNN
    assert backend(2, "allgather-kv", "cudnn") == "flash"
    assert backend(2, "allgather-kv", "efficient") == "efficient"
    assert backend(2, "allgather-kv", "flash") == "flash"
    assert backend(1, "allgather-kv", "cudnn") == "cudnn"  # no CP: the preferred kernel
    assert backend(2, "ring-allgather", "cudnn") == "cudnn"
    assert backend(1, "allgather-kv", "cudnn", native_gqa=True, model=gqa) == "flash"  # enable_gqa
    assert backend(1, "allgather-kv", "cudnn", native_gqa=True, model=mha) == "cudnn"
    assert backend(1, "allgather-kv", "cudnn", native_gqa=False, model=gqa) == "cudnn"


def test_parameter_tensors_by_hand():
    assert parameter_tensors(L8B) == 32 * 9 + 3 == 291
    base = dict(vocab_size=10, dim=8, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=16)
    assert parameter_tensors(ModelSpec("a", **base)) == 2 * 9 + 3
    assert parameter_tensors(ModelSpec("b", qkv_bias=True, **base)) == 2 * 12 + 3
    assert parameter_tensors(ModelSpec("c", tie_embeddings=True, **base)) == 2 * 9 + 2


def test_optimizer_time_by_hand():
    cfg = TrainConfig(Parallelism(dp_shard=4, cp=2, tp=2), 8192)  # FSDP over dp_shard x cp = 8
    hbm = L8B.num_params / 2 / 8 * 32 / 1e12  # AdamW fp32: 28 bytes read/written + 4 for the norm
    fast_host = resolve_executor("autoplan").with_overrides(optimizer_foreach=False, dtensor_op_overhead_s=1e-9,
                                                            host_op_overhead_s=1e-9)
    assert optimizer_time_s(L8B, GPU, cfg, fast_host) == pytest.approx(hbm, rel=1e-12)
    slow = fast_host.with_overrides(dtensor_op_overhead_s=30e-6, host_op_overhead_s=10e-6)
    assert optimizer_time_s(L8B, GPU, cfg, slow) == pytest.approx(291 * (10 * 30e-6 + 10e-6), rel=1e-12)
    foreach = slow.with_overrides(optimizer_foreach=True, dtensor_op_overhead_s=0.01)
    assert optimizer_time_s(L8B, GPU, cfg, foreach) == pytest.approx(20 * (0.01 + 291 * 1e-6), rel=1e-12)


# ----------------------------------------------------------------------------- the estimate's breakdown

BREAKDOWN = ["params", "grads", "optimizer", "fsdp_unsharded", "activations", "recompute_working", "logits_loss",
             "comm_buffers", "overhead"]


def _estimate_on(monkeypatch, terms, n_layers=2, ac=None):
    import cost_models.memory as memory
    monkeypatch.setattr(memory, "memory_terms", lambda model, cfg, executor=None: terms)
    model = ModelSpec("m", vocab_size=10, dim=8, n_layers=n_layers, n_heads=2, n_kv_heads=2, ffn_dim=16)
    return estimate_memory(model, TrainConfig(Parallelism(), 64, ac=ac))


def _hand_terms(**values):
    base = dict(static_bytes=1200, sharded_grad_bytes_per_layer=10, sharded_grad_bytes_root=5, root_unsharded_bytes=20,
                root_activation_bytes=3, input_bytes=2, loss_working_bytes=0, forward_block_bytes=7,
                backward_block_bytes=11, root_grad_bytes=13, root_reduce_bytes=17, optimizer_temp_bytes=0,
                layer=LayerMemory(saved={"full": 1, "selective": 2, "none": 4}, working={"full": 8, "selective": 6,
                                                                                         "none": 5}),
                comm_buffer_bytes=50, fixed_overhead_bytes=1000, fragmentation=0.5, n_layers=2,
                allocator_pool_bytes=300)
    base.update(values)
    return MemoryTerms(**base)


def test_estimate_breakdown_of_an_optimizer_peak_by_hand(monkeypatch):
    # optimizer phase: static 1200 (params 4 + optimizer 8 bytes per parameter: 400 + 800),
    # grads 2 x 10 + 5, the AdamW temporaries 10000 as its "activations"
    est = _estimate_on(monkeypatch, _hand_terms(optimizer_temp_bytes=10000))
    tensor = 1200 + 25 + 10000
    reserved = tensor * 1.5 + 300
    assert est.peak_phase == "optimizer" and est.tensor_peak_phase == "optimizer"
    assert list(est.breakdown_bytes) == BREAKDOWN
    assert est.breakdown_bytes == {"params": 400, "grads": 25, "optimizer": 800, "fsdp_unsharded": 0.0,
                                   "activations": 10000, "recompute_working": 0.0, "logits_loss": 0.0,
                                   "comm_buffers": 50, "overhead": 700 + reserved - tensor}
    assert est.overhead_bytes == {"cuda_context": 700, "allocator_side_stream_pools": 300, "allocator_stranded": 0.0,
                                  "allocator_fragmentation": tensor * 0.5}
    assert est.reserved_peak_bytes == reserved and est.tensor_peak_bytes == tensor
    assert est.peak_bytes == reserved + 700 + 50


def test_estimate_breakdown_of_a_loss_peak_by_hand(monkeypatch):
    # loss phase: static 1200, unsharded 20 + 7, activations 2 layers x 4 (no AC) + 3,
    # logits 9000 and 600 stranded allocator bytes
    est = _estimate_on(monkeypatch, _hand_terms(loss_logits_bytes=9000, loss_stranded_bytes=600,
                                                loss_working_bytes=9600))
    tensor = 1200 + 27 + 11 + 9000
    assert est.peak_phase == "loss" and est.phase_tensor_bytes["loss"] == tensor
    assert est.breakdown_bytes == {"params": 400, "grads": 0.0, "optimizer": 800, "fsdp_unsharded": 27,
                                   "activations": 11, "recompute_working": 0.0, "logits_loss": 9000,
                                   "comm_buffers": 50, "overhead": 700 + (tensor + 600) * 1.5 + 300 - tensor}
    assert est.overhead_bytes["allocator_stranded"] == 600
    assert est.overhead_bytes["allocator_fragmentation"] == pytest.approx((tensor + 600) * 0.5)


def test_estimate_refuses_a_policy_of_another_depth(monkeypatch):
    with pytest.raises(ValueError, match="^activation checkpoint policy has 3 layers, model has 2$"):
        _estimate_on(monkeypatch, _hand_terms(), ac=ACPolicy.uniform("full", 3))


# ----------------------------------------------------------------------------- attention rate


def test_attention_rate_by_hand():
    from cost_models.kernels import attention_rate_per_s
    from cost_models.specs import SpecError

    gpu = GPU.with_overrides(attention_efficiency=0.5)  # FA2's forward: half of peak
    ref = 16384 / (16384 + 512)  # the ramp at the 16k tokens the tables quote
    assert attention_rate_per_s(gpu, "flash", False, 16384) == pytest.approx(1e15 * 0.5)
    assert attention_rate_per_s(gpu, "flash", True, 16384) == pytest.approx(1e15 * 0.5 * 0.86)
    assert attention_rate_per_s(gpu, "flash", False, 65536) == pytest.approx(1e15 * 0.5)  # flat past 16k
    assert attention_rate_per_s(gpu, "flash", False, 512) == pytest.approx(1e15 * 0.5 * 0.5 / ref)
    assert attention_rate_per_s(gpu, "flash", False, 0) == pytest.approx(1e15 * 0.5 * (1 / 513) / ref)  # >= 1 key
    fast = gpu.with_overrides(attention_efficiency=0.9)
    assert attention_rate_per_s(fast, "cudnn", False, 16384) == pytest.approx(1e15 * 0.95)  # capped at 95%
    assert attention_rate_per_s(gpu.with_overrides(arch="ampere"), "efficient", True, 16384) == pytest.approx(
        1e15 * 0.5 * 0.6 * 0.86)
    assert attention_rate_per_s(gpu.with_overrides(arch="cdna3"), "cudnn", True, 16384) == pytest.approx(
        1e15 * 0.5 * 0.86)  # no table: FA2-like
    with pytest.raises(SpecError, match=r"^attention_backend='math': use one of flash, cudnn, efficient$"):
        attention_rate_per_s(gpu, "math", False, 16384)


def test_phases_by_hand():
    # two layers, the first without AC (saves 4), the second full AC (saves 1); every
    # optional phase present. The two backward layer phases tie at 1315 bytes: the first
    # one walked (the last layer) is reported.
    terms = _hand_terms(optimizer_temp_bytes=40, loss_logits_bytes=9, loss_stranded_bytes=6, loss_working_bytes=15,
                        norm_backward_working_bytes=21, final_norm_saved_bytes=19, forward_working_bytes=23,
                        layer=LayerMemory(saved={"full": 1, "selective": 2, "none": 4},
                                          working={"full": 14, "selective": 6, "none": 5}))
    common = {"params_and_optimizer": 1200, "comm_buffers": 50}
    phases = terms.phases(("none", "full"))
    assert list(phases) == ["loss", "norm_backward", "forward", "backward", "root_reduce", "optimizer"]
    assert phases == {
        "loss": dict(common, fsdp_unsharded=27, activations=8, logits_loss=9, allocator_stranded=6),
        "norm_backward": dict(common, fsdp_unsharded=44, activations=26, recompute_working=21),
        "forward": dict(common, fsdp_unsharded=31, activations=7, recompute_working=23),
        "backward": dict(common, fsdp_unsharded=44, grads=0, activations=7, recompute_working=14),
        "root_reduce": dict(common, grads=20, fsdp_unsharded=17, activations=2),
        "optimizer": dict(common, grads=25, activations=40),
    }
    assert "norm_backward" not in _hand_terms().phases(("none", "none"))  # absent when zero


def test_loss_request_sequence_chunks_and_variants():
    tiny = ModelSpec("t", vocab_size=100, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16)
    tt = resolve_executor("torchtitan")

    def events(tokens, executor):
        return loss_allocation_events(tiny, TrainConfig(Parallelism(), tokens), executor)
    chunked = events(96, tt.with_overrides(loss_chunk_tokens=32))  # 3 chunks of 32 tokens
    assert [e for e in chunked if e[0] == "alloc" and e[1].endswith("logits")] == [
        ("alloc", f"{c}:logits", 2 * 32 * 100) for c in range(3)]
    many = events(320, tt.with_overrides(loss_chunk_tokens=32))  # 10 chunks: two stand for all
    assert sorted({name.split(":")[0] for _, name, _ in many}) == ["0", "1"]
    bf16 = events(32, tt.with_overrides(loss_upcast_fp32=False))  # no upcast: every tensor bf16
    assert {n for kind, _, n in bf16 if kind == "alloc"} == {2 * 32 * 100}
    fused = events(32, tt.with_overrides(compile=True, loss_compiled_with_model=True))
    assert fused == [("alloc", "0:logits", 6400), ("alloc", "0:grad", 6400), ("free", "0:logits", 0.0),
                     ("free", "0:grad", 0.0)]


def test_ring_attention_transients_by_hand():
    from cost_models.activations import ring_attention_bytes

    # q_dim 64, kv_dim 16; cp tokens T = 256 per GPU, tp 2: q = 256 x 64 / 2 = 8192 and
    # kv = 2048 elements, fp32 LSE 4 x 256 x 8 heads / 2 = 4096 bytes; bf16 activations.
    model = ModelSpec("r", vocab_size=10, dim=64, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=16)

    def ring(cp, impl, executor="autoplan"):
        cfg = TrainConfig(Parallelism(cp=cp, tp=2), 256 * cp, cp_impl=impl)
        return ring_attention_bytes(model, cfg, resolve_executor(executor))
    # forward: q, k, v (2 (q + 2 kv)) + rotation + fp32 output and merge (16 q) + bf16 out (2 q) + 4 LSE copies
    # backward: fp32 grad_query and dq_accum (8 q) + dq, dk, dv twice (4 (q + 2 kv)) + fp32 dK/dV (24 kv)
    #           + rotation + the next cat (4 kv) + LSE
    base_fwd = 2 * (8192 + 4096) + 16 * 8192 + 2 * 8192 + 4 * 4096
    base_bwd = 8 * 8192 + 4 * (8192 + 4096) + 24 * 2048 + 4 * 2048 + 4096
    assert ring(4, "ring-alltoall") == (base_fwd + 2 * 4 * 2048, base_bwd + 2 * 4 * 2048)  # current + next
    assert ring(3, "ring-alltoall") == ring(4, "ring-alltoall")
    assert ring(2, "ring-alltoall") == (base_fwd + 4 * 2048, base_bwd + 2 * 4 * 2048)  # cp 2: one buffer
    assert ring(4, "ring-allgather") == (base_fwd + 4 * 4 * 2048, base_bwd + 4 * 4 * 2048)  # cp gathered copies
    # K/V expanded to the query heads (no native GQA): kv = q = 8192 elements
    expanded_fwd = 2 * (8192 + 2 * 8192) + 16 * 8192 + 2 * 8192 + 4 * 4096 + 2 * 4 * 8192
    expanded_bwd = 8 * 8192 + 4 * (3 * 8192) + 24 * 8192 + 4 * 8192 + 4096 + 2 * 4 * 8192
    assert ring(4, "ring-alltoall", "torchtitan") == (expanded_fwd, expanded_bwd)


# ----------------------------------------------------------------------------- memory_terms by hand

# d 16, 4 heads of 4 (q 16), 2 K/V heads (kv 8), FFN 32, vocab 1000, untied: per block
# wq 256 + wk 128 + wv 128 + wo 256 + w1, w3, w2 3 x 512 + 2 norms 32 = 2336 parameters;
# root: embedding + output 2 x 16000 + final norm 16 = 32016; all: 36688.
SMALL = ModelSpec("small", vocab_size=1000, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32)
HAND_EX = resolve_executor("torchtitan").with_overrides(
    fsdp_last_block_resharded=False, fsdp_blocks_in_flight=2, fsdp_root_units=2, norm_backward_fp32_temporaries=3.0,
    compile=False, loss_num_chunks=None, loss_chunk_tokens=None, cuda_context_bytes=1000,
    allocator_fragmentation=0.125, nccl_communicator_bytes=100, nccl_alltoall_peer_bytes=7)


def test_memory_terms_by_hand():
    from cost_models.activations import loss_working_bytes
    from cost_models.allocator import allocator_loss_stranded_bytes

    assert (SMALL.params_per_layer, SMALL.root_params, SMALL.num_params) == (2336, 32016, 36688)
    cfg = TrainConfig(Parallelism(dp_shard=2, tp=2), 64)  # 64 tokens per GPU, tp 2, 2 FSDP shards
    t = memory_terms(SMALL, cfg, HAND_EX)
    assert t.static_bytes == 36688 / 4 * (4 + 8)  # fp32 master + AdamW states of the shard
    assert t.sharded_grad_bytes_per_layer == 2336 / 4 * 4 and t.sharded_grad_bytes_root == 32016 / 4 * 4
    assert t.forward_block_bytes == 1168 * 2  # the last block stays gathered (bf16)
    assert t.backward_block_bytes == 2 * 1168 * 2  # two blocks in flight
    assert t.root_grad_bytes == 1000 * 16 / 2 * 2  # the output projection's bf16 grad
    assert t.root_reduce_bytes == 16008 * 2 + 16008 * 4  # bf16 grads + their fp32 reduce copy
    assert t.root_unsharded_bytes == 16008 * 2 / 2  # two root units: norm + output stay gathered
    # final norm input (bf16 + fp32 rstd, sequence-sharded) + its gathered output + ids and labels
    assert t.final_norm_saved_bytes == 2 * 64 * 16 / 2 + 4 * 64 / 2 == 1152
    assert t.input_bytes == 2 * 8 * 64 and t.root_activation_bytes == 1152 + 2 * 64 * 16 + 1024
    assert t.norm_backward_working_bytes == 3 * 4 * 64 * 16 / 2 + 2 * 64 * 16  # 3 fp32 temporaries + gathered grad
    assert t.optimizer_temp_bytes == 3 * 4 * 1000 * 16 / 2 / 2  # the largest shard: embedding / output
    layer = layer_memory(SMALL, cfg, HAND_EX)
    assert t.layer.saved == layer.saved
    # working: the block's own + w2's weight grad (16 x 32 / 2 bf16), or the post-backward
    # moment (all grads 2336 + fp32 reduce copy 4672 - the resharded params 2336); below the
    # top block, FSDP2 still holds the block above's reduce-scatter input (1168 params x 4)
    assert t.top_layer_working == {m: max(w + 512, 4672) for m, w in layer.working.items()}
    assert t.layer.working == {m: max(w + 512 + 4672, 4672) for m, w in layer.working.items()}
    assert t.first_layer_block_saving_bytes == 1168 * 2  # block 0 prefetches no block below it
    # TP's embedding backward: a dense 1000 x 16 bf16 grad + max(the gathered incoming grad
    # 2 x 64 x 16, the rank's own 500 rows 500 x 16 x 2); alive: both root units gathered
    # (16008 bf16) + layer 0's held reduce-scatter input (4672); both blocks' sharded grads
    # (2 x 2336) + the [norm, output] unit's, reduced already (half the root's 32016)
    assert t.embedding_backward_working_bytes == 1000 * 16 * 2 + max(2 * 64 * 16, 500 * 16 * 2)
    assert t.embedding_backward_unsharded_bytes == 16008 * 2 + 4672
    assert t.embedding_backward_grad_bytes == 2 * 2336 + 32016 / 2
    assert t.loss_logits_bytes == loss_working_bytes(SMALL, cfg, HAND_EX) == 16 * 64 * 500
    assert t.loss_stranded_bytes == allocator_loss_stranded_bytes(SMALL, cfg, HAND_EX)
    assert t.forward_working_bytes == 0.0
    # pools: all-gather output max(root unit 8004, 2 blocks 2336) bf16; every fp32 sharded grad
    assert t.allocator_pool_bytes == 2 * 8004 + (2 * 2336 + 32016)
    assert t.fixed_overhead_bytes == 1000 + 2 * 8004 + (2 * 2336 + 32016)
    assert t.comm_buffer_bytes == 2 * 100  # FSDP's and TP's communicators
    assert t.fragmentation == 0.125 and t.n_layers == 2


def test_memory_terms_variants_by_hand():
    cfg = TrainConfig(Parallelism(dp_shard=2, tp=2), 64)
    base = memory_terms(SMALL, cfg, HAND_EX)
    # the last block resharded after forward; one root unit (all of it stays gathered)
    other = memory_terms(SMALL, cfg, HAND_EX.with_overrides(fsdp_last_block_resharded=True, fsdp_root_units=1))
    assert other.forward_block_bytes == 0.0 and other.root_unsharded_bytes == 16008 * 2
    assert other.allocator_pool_bytes == 2 * 16008 + (2 * 2336 + 32016)
    tied = ModelSpec("tied", vocab_size=1000, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32,
                     tie_embeddings=True)  # one shared embedding: the root is not split
    assert memory_terms(tied, cfg, HAND_EX).root_unsharded_bytes == tied.root_params / 2 * 2
    # fp32 reduce = param dtype: no reduce copy
    fp32 = TrainConfig(Parallelism(dp_shard=2, tp=2), 64, precision=Precision.fp32())
    t32 = memory_terms(SMALL, fp32, HAND_EX)
    assert t32.root_reduce_bytes == 16008 * 4
    # post-backward: all fp32 grads (1168 x 4) less the resharded fp32 params: 0; below the
    # top block the block above's fp32 reduce-scatter input (1168 x 4) is held
    own = layer_memory(SMALL, fp32, HAND_EX).working
    assert t32.top_layer_working == {m: max(w + 16 * 32 / 2 * 4, 0.0) for m, w in own.items()}
    assert t32.layer.working == {m: max(w + 16 * 32 / 2 * 4 + 1168 * 4, 0.0) for m, w in own.items()}
    # compiled blocks: one fp32 temporary in the final norm's backward
    assert memory_terms(SMALL, cfg, HAND_EX.with_overrides(compile=True)).norm_backward_working_bytes == \
        4 * 64 * 16 / 2 + 2 * 64 * 16
    # 4 loss chunks of 16 tokens: hidden-state copies + fp32 grad buffer (6 x 64 x 16), and
    # the output projection's grad alive across chunks
    chunked = memory_terms(SMALL, cfg, HAND_EX.with_overrides(loss_num_chunks=4))
    assert chunked.loss_logits_bytes == 16 * 16 * 500 + 6 * 64 * 16 + 16000
    assert base.loss_logits_bytes == 16 * 64 * 500
    one_chunk = memory_terms(SMALL, TrainConfig(Parallelism(dp_shard=2, tp=2), 4), HAND_EX.with_overrides(
        loss_num_chunks=4))  # 4 tokens, 4 chunks of 1: still chunked
    assert one_chunk.loss_logits_bytes == 16 * 1 * 500 + 6 * 4 * 16 + 16000
    # ring CP: the attention's forward transient
    from cost_models.activations import ring_attention_bytes
    ring = TrainConfig(Parallelism(dp_shard=1, cp=2, tp=2), 128, cp_impl="ring-alltoall")
    assert memory_terms(SMALL, ring, HAND_EX).forward_working_bytes == ring_attention_bytes(SMALL, ring, HAND_EX)[0] > 0
    gather = TrainConfig(Parallelism(dp_shard=1, cp=2, tp=2), 128, cp_impl="ring-allgather")
    assert memory_terms(SMALL, gather, HAND_EX).forward_working_bytes == \
        ring_attention_bytes(SMALL, gather, HAND_EX)[0]
    assert memory_terms(SMALL, TrainConfig(Parallelism(cp=2, tp=2), 128), HAND_EX).forward_working_bytes == 0.0


@pytest.mark.parametrize("ffn, q_heads, expected", [(512, 4, 16 * 512), (8, 64, 16 * 256)])
def test_optimizer_temporaries_take_the_largest_shard(ffn, q_heads, expected):
    model = ModelSpec("w", vocab_size=8, dim=16, n_layers=1, n_heads=q_heads, n_kv_heads=q_heads, ffn_dim=ffn,
                      head_dim=4)  # q width = 4 x heads
    t = memory_terms(model, TrainConfig(Parallelism(dp_shard=2), 64), HAND_EX)
    assert t.optimizer_temp_bytes == 3 * 4 * expected / 2


def test_folded_loss_working_set_is_the_largest_of_loss_forward_and_norm_phases():
    # loss_working_bytes re-bases the ring forward phase and the final norm's backward
    # onto the loss phase: base + it = the largest of the three phase totals.
    tiny_vocab = ModelSpec("tv", vocab_size=16, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64)
    seen = set()
    for model, cfg in [(SMALL, TrainConfig(Parallelism(dp_shard=2, tp=2), 64)),
                       (tiny_vocab, TrainConfig(Parallelism(cp=2), 4096, cp_impl="ring-allgather")),
                       (tiny_vocab, TrainConfig(Parallelism(cp=2), 4096, cp_impl="ring-alltoall")),
                       (tiny_vocab, TrainConfig(Parallelism(dp_shard=2), 4096))]:
        t = memory_terms(model, cfg, HAND_EX)
        modes = ("none",) * model.n_layers
        phases = t.phases(modes)
        totals = {p: sum(phases[p].values()) - phases[p]["comm_buffers"] for p in ("loss", "forward", "norm_backward")
                  if p in phases}
        loss_base = totals["loss"] - t.loss_logits_bytes - t.loss_stranded_bytes
        assert loss_base + t.loss_working_bytes == pytest.approx(max(totals.values()), rel=1e-12)
        seen.add(max(totals, key=totals.get))
    assert seen == {"loss", "forward", "norm_backward"}  # each one is the largest somewhere


def test_nccl_and_loss_working_by_hand():
    from cost_models.activations import loss_working_bytes
    from cost_models.memory import nccl_bytes

    ex = HAND_EX
    # communicators: FSDP (dp_shard x cp = 4) and CP's; one all-to-all peer under ring CP
    assert nccl_bytes(TrainConfig(Parallelism(dp_shard=2, cp=2), 64, cp_impl="ring-alltoall"), ex) == 2 * 100 + 7
    assert nccl_bytes(TrainConfig(Parallelism(dp_shard=2, cp=2), 64, cp_impl="ring-allgather"), ex) == 2 * 100 + 7
    assert nccl_bytes(TrainConfig(Parallelism(dp_shard=2, cp=2), 64, cp_impl="allgather-kv"), ex) == 2 * 100
    assert nccl_bytes(TrainConfig(Parallelism(dp_replicate=2, dp_shard=2, tp=2), 64), ex) == 3 * 100
    model = ModelSpec("v", vocab_size=1000, dim=16, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=16)
    tp1, tp2 = TrainConfig(Parallelism(), 64), TrainConfig(Parallelism(tp=2), 64)
    flat = ex.with_overrides(loss_upcast_fp32=False)
    # per logit element: tp 1: max(logits 2 + upcast 4 + log-softmax 4, 3 x 4) = 12; tp 2
    # (loss_parallel, as traced): max(2 + 3 x 4, 4 x 4) = 16 over vocab / 2
    assert loss_working_bytes(model, tp1, ex) == 12 * 64 * 1000
    assert loss_working_bytes(model, tp2, ex) == 16 * 64 * 500
    assert loss_working_bytes(model, tp1, flat) == 6 * 64 * 1000  # no upcast: max(2 + 2 + 2, 3 x 2)
    assert loss_working_bytes(model, tp2, flat) == 8 * 64 * 500  # max(2 + 3 x 2, 4 x 2)
    wide = ex.with_overrides(logits_bytes=8)  # fp64 logits: the forward (8 + 4 + 4) is the larger
    assert loss_working_bytes(model, tp1, wide) == 16 * 64 * 1000
    assert loss_working_bytes(model, tp2, wide) == 20 * 64 * 500  # max(8 + 3 x 4, 4 x 4)


# ----------------------------------------------------------------------------- one block, by hand


def test_layer_memory_by_hand():
    from cost_models.activations import ring_attention_bytes, save_bytes, selective_saves

    # d 16, q 16 (4 heads), kv 8; cp 2 (all-gather KV), tp 2: 32 tokens per GPU, K/V of 64
    wide = ModelSpec("w", vocab_size=8, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=32)
    narrow = ModelSpec("n", vocab_size=8, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8)
    cfg = TrainConfig(Parallelism(cp=2, tp=2), 64)
    ex = resolve_executor("autoplan").with_overrides(sp_saves_gathered_matmul_input=True, native_gqa=True,
                                                     norm_saved_bytes_per_element=None)
    # none: 2 norm inputs (bf16 16/2 + fp32 rstd 1/2 per token = 18 bytes x 32 = 576 each), 2
    # gathered norm outputs (2 x 2 x 32 x 16), q (2 x 32 x 8), K and V of the whole sequence
    # (2 x 64 x 2 x 8 / 2 = 1024), attention output + fp32 lse (512 + 4 x 32 x 2 = 768), 4 f-wide
    # SwiGLU tensors (4 x 2 x 32 x f / 2)
    common = 2 * 576 + 2048 + 512 + 1024 + 768
    # transient = the widest backward moment + the sequence-sharded residual grad (2 x 32 x
    # 16 / 2 = 512). FFN: the SwiGLU product's two f-wide grads (2 x 2 x 32 x f / 2), or w2's
    # incoming grad gathered over the sequence under SP (2 x 32 x 16 = 1024) + its f-wide
    # input grad. Attention runs after the FFN's four f-wide tensors (4 x 2 x 32 x f / 2)
    # are freed: dq 512 + gathered dK, dV 1024 (or gathered grad 1024 + dq 512) less those.
    for model, f, transient in ((wide, 32, 2 * 2 * 32 * 32 / 2 + 512),  # the product's grads: 2048
                                (narrow, 8, 1024 + 2 * 32 * 8 / 2 + 512)):  # gathered grad + w2's input grad
        mem = layer_memory(model, cfg, ex)
        none = common + 4 * 2 * 32 * f / 2
        sizes = save_bytes(model, cfg)
        selective = sum(sizes[name] for name in selective_saves(ex))
        assert mem.saved == {"none": none, "selective": selective, "full": sizes["block_input"]}
        assert selective < none and sizes["block_input"] < selective
        assert mem.working == {"none": transient, "selective": none - selective + transient,
                               "full": none - sizes["block_input"] + transient}
    # sequence parallel keeps the norm outputs sharded when told so (16 / 2 wide)
    sharded = layer_memory(wide, cfg, ex.with_overrides(sp_saves_gathered_matmul_input=False))
    assert sharded.saved["none"] == common - 1024 + 4 * 2 * 32 * 32 / 2
    one = TrainConfig(Parallelism(cp=2), 64)  # tp 1: nothing to shard
    assert layer_memory(wide, one, ex.with_overrides(sp_saves_gathered_matmul_input=False)).saved == \
        layer_memory(wide, one, ex).saved
    # ring CP keeps only the local K/V (32 tokens: 512) and its backward holds the ring's buffers
    for impl in ("ring-allgather", "ring-alltoall"):
        ring = TrainConfig(Parallelism(cp=2, tp=2), 64, cp_impl=impl)
        mem = layer_memory(narrow, ring, ex)
        assert mem.saved["none"] == common - 512 + 4 * 2 * 32 * 8 / 2
        ffn = max(2 * 2 * 32 * 8 / 2, 1024 + 2 * 32 * 8 / 2)
        attention = max(ring_attention_bytes(narrow, ring, ex)[1], 1024 + 512) - 4 * 2 * 32 * 8 / 2
        assert mem.working["none"] == max(ffn, attention) + 512


def test_allocator_rules_by_hand():
    MiB = 2**20
    # exactly 1 MiB is still a small request: a 2 MiB segment, and its 1 MiB remainder is
    # split off (small blocks always split) for the next request
    assert simulate_allocator([("alloc", "a", MiB)]) == (2 * MiB, MiB)
    assert simulate_allocator([("alloc", "a", MiB), ("alloc", "b", 512 * 1024)]) == (2 * MiB, 1.5 * MiB)
    # a large block keeps a remainder of <= 1 MiB (no split): a small request needs a new segment
    for first in (11 * MiB + 512 * 1024, 11 * MiB):
        assert simulate_allocator([("alloc", "a", first), ("alloc", "b", 100 * 1024)])[0] == 14 * MiB
    # freeing a block merges it with a free neighbour after it: the merged block serves 18 MiB
    assert simulate_allocator([("alloc", "a", 5 * MiB), ("free", "a", 0), ("alloc", "b", 18 * MiB)]) == \
        (20 * MiB, 18 * MiB)
    # the split remainder lies after the block: a freed first block does not merge with the
    # second request's block, so 12 MiB needs a new segment
    events = [("alloc", "a", 5 * MiB), ("alloc", "c", 5 * MiB), ("free", "a", 0), ("alloc", "d", 12 * MiB)]
    assert simulate_allocator(events)[0] == 32 * MiB
    # best fit takes the FIRST of equal free blocks (segment 0's 20 MiB, not segment 1's):
    # then freeing x merges 30 MiB in segment 1, where 25 MiB fits
    events = [("alloc", "t", 20 * MiB), ("alloc", "s", 30 * MiB), ("free", "s", 0), ("alloc", "x", 10 * MiB),
              ("free", "t", 0), ("alloc", "c", 8 * MiB), ("free", "x", 0), ("alloc", "d", 25 * MiB)]
    assert simulate_allocator(events) == (50 * MiB, 50 * MiB)


def test_expandable_segment_grows_its_free_tail():
    MiB = 2**20
    # a 100 MiB, b 10 MiB appended (110); b freed leaves a free 10 MiB tail; c 30 MiB grows
    # that tail by 20 MiB (130) instead of a new 30 MiB segment (140)
    events = [("alloc", "a", 100 * MiB), ("alloc", "b", 10 * MiB), ("free", "b", 0), ("alloc", "c", 30 * MiB)]
    assert simulate_allocator(events, expandable_segments=True) == (130 * MiB, 130 * MiB)
    assert simulate_allocator(events, expandable_segments=False) == (140 * MiB, 130 * MiB)
    # after the growth the tail is exactly c: freeing c and asking 31 MiB grows it by 2 MiB more
    more = events + [("free", "c", 0), ("alloc", "e", 31 * MiB)]
    assert simulate_allocator(more, expandable_segments=True) == (132 * MiB, 131 * MiB)


def test_loss_request_chunk_counts():
    tiny = ModelSpec("t", vocab_size=100, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16)
    tt = resolve_executor("torchtitan").with_overrides(loss_chunk_tokens=8)

    def prefixes(tokens, executor=tt):
        events = loss_allocation_events(tiny, TrainConfig(Parallelism(), tokens), executor)
        return sorted({int(name.split(":")[0]) for _, name, _ in events})
    assert prefixes(64) == list(range(8))  # 8 chunks: every one
    assert prefixes(72) == [0, 1]  # 9: two stand for all
    fused = tt.with_overrides(compile=True, loss_compiled_with_model=True)
    assert prefixes(24, fused) == [0, 1, 2]


def test_single_loss_chunk_adds_no_chunk_buffers():
    cfg = TrainConfig(Parallelism(dp_shard=2, tp=2), 64)
    one = memory_terms(SMALL, cfg, HAND_EX.with_overrides(loss_num_chunks=1))
    assert one.loss_logits_bytes == 16 * 64 * 500


def test_gathered_blocks_set_the_all_gather_pool_when_larger_than_the_root():
    # vocab 16, d 64, heads 4 of 16, FFN 64: per block 4 x 4096 + 3 x 4096 + 128 = 28800
    # parameters; root 2 x 1024 + 64 = 2112
    model = ModelSpec("b", vocab_size=16, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64)
    assert (model.params_per_layer, model.root_params) == (28800, 2112)
    t = memory_terms(model, TrainConfig(Parallelism(), 64), HAND_EX)
    assert t.allocator_pool_bytes == 2 * (2 * 28800) + (2 * 28800 * 4 + 2112 * 4)


def test_post_backward_grads_can_set_the_block_working_set():
    # 2 tokens: activations are tiny; FSDP2's post-backward holds all the block's bf16 grads
    # (2336 x 2) + their fp32 reduce copy (2336 x 4) after its bf16 params (2336 x 2) go
    # on the top block (below it, the block above's fp32 reduce-scatter input, 2336 x 4, is
    # held next to the compute moment, which then wins)
    cfg = TrainConfig(Parallelism(), 2)
    t = memory_terms(SMALL, cfg, HAND_EX)
    assert t.top_layer_working["none"] == 2336 * 4
    assert t.layer.working["none"] == layer_memory(SMALL, cfg, HAND_EX).working["none"] + 16 * 32 * 2 + 2336 * 4
    # fp32 everywhere: no reduce copy; the block's own working set + w2's fp32 grad
    fp32 = TrainConfig(Parallelism(), 2, precision=Precision.fp32())
    assert memory_terms(SMALL, fp32, HAND_EX).top_layer_working["none"] == \
        layer_memory(SMALL, fp32, HAND_EX).working["none"] + 16 * 32 * 4


def test_best_fit_not_first_fit():
    MiB = 2**20
    # free 100 MiB (segment 0) and 30 MiB (segment 1): 20 MiB takes the 30, so 90 MiB
    # still fits the 100 (first fit would split the 100 and need a new segment)
    events = [("alloc", "a", 100 * MiB), ("alloc", "b", 30 * MiB), ("free", "a", 0), ("free", "b", 0),
              ("alloc", "c", 20 * MiB), ("alloc", "d", 90 * MiB)]
    assert simulate_allocator(events) == (130 * MiB, 130 * MiB)


def test_expandable_growth_is_at_the_segment_end():
    MiB = 2**20
    # blocks a 100, b 6, c 10 in one expandable segment; c freed is the tail: 30 MiB grows
    # it by 20 (b's 6 MiB in the middle plays no part)
    events = [("alloc", "a", 100 * MiB), ("alloc", "b", 6 * MiB), ("alloc", "c", 10 * MiB), ("free", "c", 0),
              ("alloc", "d", 30 * MiB)]
    assert simulate_allocator(events, expandable_segments=True) == (136 * MiB, 136 * MiB)
