"""What one kernel costs on one GPU: GEMMs (shape-aware), attention per SDPA backend and
direction, memory-bound element-wise ops, and the context-parallel merge traffic.

``step.py`` composes these into a block's and a step's time (its docstring says how the
pieces overlap). Every constant cites the kernel table, paper or PyTorch source it comes
from.
"""

from __future__ import annotations

import math
from functools import lru_cache

from . import flops
from .config import TrainConfig
from .executors import ExecutorProfile
from .specs import GPUSpec, ModelSpec, SpecError

FP32 = 4

# ----------------------------------------------------------------------------- GEMMs

# Output tile of the large cuBLAS/CUTLASS bf16 kernels (128 x 256 on Hopper wgmma, 256 x
# 128 on Ampere: the same 32k-element tile) and the k-depth of one pipeline stage (64).
GEMM_TILE_M, GEMM_TILE_N = 128, 256
GEMM_FILL_DRAIN_K = 2 * 64  # prologue fill + epilogue ~ two k-tiles of work per output tile


@lru_cache(maxsize=65536)
def gemm_shape_efficiency(m: int, n: int, k: int, sm_count: int) -> float:
    """Fraction of the large-GEMM rate an M x N x K GEMM reaches (wave quantization x fill).

    Tiles ``ceil(M/128) x ceil(N/256)`` run in waves of ``sm_count``; the last wave leaves
    SMs idle: ``tiles / (waves x sm_count)``. Each tile also pays a pipeline fill/drain of
    ~2 k-tiles: ``K / (K + 128)``.
    """
    tiles = math.ceil(m / GEMM_TILE_M) * math.ceil(n / GEMM_TILE_N)
    waves = math.ceil(tiles / sm_count)
    return tiles / (waves * sm_count) * k / (k + GEMM_FILL_DRAIN_K)


def gemm_time_s(gpu: GPUSpec, m: int, n: int, k: int) -> float:
    """Seconds of one bf16 GEMM: the slower of compute and streaming A, B, C from HBM."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    rate = gpu.bf16_flops_per_s * gpu.clock_fraction * gpu.matmul_efficiency
    compute = 2.0 * m * n * k / (rate * gemm_shape_efficiency(m, n, k, gpu.sm_count))
    memory = 2.0 * (m * k + k * n + m * n) / gpu.hbm_bytes_per_s
    return max(compute, memory)


@lru_cache(maxsize=16384)
def layer_matmul_s(model: ModelSpec, gpu: GPUSpec, tokens: int, tp: int) -> tuple[float, float, tuple]:
    """(forward, backward, per-GEMM forward seconds) of one block's GEMMs on one GPU.

    Backward of ``Y = X W`` (M x N, inner K): dX = dY W^T (M x K, inner N) and
    dW = X^T dY (K x N, inner M).
    """
    forward = backward = 0.0
    each = []
    for name, m, n, k in flops.layer_gemms(model, tokens, tp):
        fwd = gemm_time_s(gpu, m, n, k)
        forward += fwd
        backward += gemm_time_s(gpu, m, k, n) + gemm_time_s(gpu, k, n, m)
        each.append((name, fwd))
    return forward, backward, tuple(each)


# ----------------------------------------------------------------------------- attention

# Attention kernel throughput relative to FlashAttention-2's forward on the same GPU
# family, (forward, backward); ``GPUSpec.attention_efficiency`` is FA2's forward fraction
# of peak (what calibration fits), so every backend moves with it.
# - FA2 backward / forward: FA2 reaches up to 73% of A100 peak forward and up to 63%
#   backward (Dao 2023, arXiv:2307.08691, sec. 4.1): 63 / 73 = 0.86. On H100 FA2 forward
#   ~335-370 and backward ~300-330 TFLOP/s at head dim 128 (Shah et al. 2024, FA3,
#   arXiv:2407.08608, figs. 5-6): ~0.9; we use 0.86 for both (the backward is also the
#   slower direction in FA3's tables).
# - cuDNN on Hopper: 631 vs 329 TFLOP/s for flash at head dim 128 forward (pytorch issue
#   #142132): 1.92x; training (forward + backward) 1.7-2.3x faster than flash on H100
#   (transformers PR #48163): backward at the low end, 1.7x flash's backward.
# - cuDNN on Ampere: 0.82x flash (transformers PR #48163, A100), both directions.
# - memory-efficient (xformers-style cutlass kernel): ~0.6x FA2 in FA2's own benchmark
#   bars (arXiv:2307.08691 figs. 4-5, "xformers" vs "FlashAttention-2", A100); assumed
#   the same ratio on Hopper (no published Hopper table).
# Families without a published table use FA2-like numbers (1, 0.86) for every backend.
ATTENTION_KERNELS: dict[str, dict[str, tuple[float, float]]] = {
    "hopper": {"flash": (1.0, 0.86), "cudnn": (631.0 / 329.0, 1.7 * 0.86), "efficient": (0.6, 0.6 * 0.86)},
    "ampere": {"flash": (1.0, 0.86), "cudnn": (0.82, 0.82 * 0.86), "efficient": (0.6, 0.6 * 0.86)},
}
ATTENTION_BACKENDS = ("flash", "cudnn", "efficient")
_DEFAULT_KERNEL = (1.0, 0.86)
# Flash kernels ramp with sequence length: FA2's causal head-dim-128 forward reaches about
# half its long-sequence rate at 512 tokens and ~97% at 8k (arXiv:2307.08691 fig. 4):
# rate(L) proportional to L / (L + 512), normalized to the 16k tokens the tables quote
# and flat beyond (the published curves flatten from 8k to 16k).
ATTENTION_RAMP_KEYS = 512
ATTENTION_REFERENCE_KEYS = 16384


def attention_rate_per_s(gpu: GPUSpec, backend: str, backward: bool, keys_per_call: float) -> float:
    """FLOP/s of the attention kernel (FLOPs counted as in ``flops.py``)."""
    if backend not in ATTENTION_BACKENDS:
        raise SpecError(f"attention_backend={backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    relative = ATTENTION_KERNELS.get(gpu.arch, {}).get(backend, _DEFAULT_KERNEL)[1 if backward else 0]
    keys = max(1.0, keys_per_call)
    ramp = min(1.0, (keys / (keys + ATTENTION_RAMP_KEYS))
               / (ATTENTION_REFERENCE_KEYS / (ATTENTION_REFERENCE_KEYS + ATTENTION_RAMP_KEYS)))  # flat past 16k
    fraction = min(0.95, gpu.attention_efficiency * relative * ramp)
    return gpu.bf16_flops_per_s * gpu.clock_fraction * fraction


# ----------------------------------------------------------------------------- CP element-wise

# _SDPAMerger (torch 2.13 _context_parallel/_attention.py) per ring step after the first,
# per element of the attention output (fp32 accumulators): out.to(float32) (read 2,
# write 4), out - block_out (read 4 + 4, write 4), sigmoid(lse diff) x diff (read 4,
# write 4), out - that (read 4 + 4, write 4), _partial_update copy on half the steps
# (~2): 40 bytes. Steps with i > rank merge only half the queries: 3/4 on average.
CP_MERGE_BYTES_PER_ELEMENT = 40.0
CP_MERGE_ACTIVE_FRACTION = 0.75
# Once per forward: step 0's upcast (read 2 + write 4) and results() cast back (read 4 + write 2).
CP_MERGE_ONCE_BYTES_PER_ELEMENT = 12.0
# Backward per ring step: grad_query (fp32) += bf16 dq (read 4 + 2, write 4) on 3/4 of the
# queries, grad_key/grad_value likewise (10 per kv element), and the fp32 dK/dV cat for
# the rotation (read 4 + write 4 per kv element).
CP_BWD_Q_BYTES_PER_ELEMENT = 10.0
CP_BWD_KV_BYTES_PER_ELEMENT = 10.0 + 8.0
# K/V cat for the next rotation (bf16 read 2 + write 2), forward and backward.
CP_KV_CAT_BYTES_PER_ELEMENT = 4.0


def elementwise_bytes_per_token(model: ModelSpec, executor: ExecutorProfile) -> float:
    """HBM traffic of one block's memory-bound forward ops per token.

    Two RMSNorms over d, RoPE over q and k, SwiGLU over f, two residual adds over d, the
    attention-output re-layout over d_q; bytes per element from the executor profile
    (the fused numbers when the executor compiles its blocks).
    """
    table = executor.compiled_elementwise_bytes_per_element if executor.compile \
        else executor.elementwise_bytes_per_element
    per = dict(table)
    d, dq, dkv, f = model.dim, model.q_dim, model.kv_dim, model.ffn_dim
    repeat_kv = 0.0 if executor.native_gqa or dq == dkv else 2 * (2 * dkv + 2 * dq)  # K and V: read 2, write 2
    return (2 * d * per["rmsnorm"] + (dq + dkv) * per["rope"] + f * per["swiglu"]
            + 2 * d * per["residual"] + dq * per["relayout"] + repeat_kv)


def loss_elementwise_bytes_per_token(model: ModelSpec, logits_bytes: int) -> float:
    """Upcast, log-softmax, nll and their backward over the vocabulary, per token."""
    forward = (logits_bytes + FP32) + 2 * FP32 + FP32  # cast, log_softmax r/w, nll read
    backward = 3 * FP32 + (FP32 + logits_bytes)  # nll grad, log_softmax bwd, cast back
    return (forward + backward) * model.vocab_size


def attention_keys_per_call(cfg: TrainConfig) -> float:
    """Keys one attention kernel call sees: the whole sequence without CP; under ring CP
    with load balancing (chunks of c = S / (2 cp)), the rank's two chunks (2c) at step 0,
    then the first chunk only (c) on steps i <= rank and both (2c, for half the queries)
    on steps i > rank: ~1.5c = 0.75 S / cp on average; a causal prefix of the gathered
    K/V (S / 2 on average) under all-gather-KV CP."""
    cp = cfg.parallelism.cp
    if cp <= 1:
        return float(cfg.seq_len)
    if cfg.cp_impl == "allgather-kv":
        return cfg.seq_len / 2.0
    return 0.75 * cfg.seq_len / cp


def attention_backend_for(cfg: TrainConfig, executor: ExecutorProfile, model: ModelSpec | None = None) -> str:
    """The kernel that actually runs. The portable all-gather-KV CP passes a lower-right
    causal mask (torch/nn/attention/bias.py, CausalBias._dispatch): flash when it can,
    else memory-efficient; cuDNN is never taken on that path. K/V at kv-head width with
    enable_gqa (``native_gqa``) run on flash whatever backend is preferred."""
    if cfg.parallelism.cp > 1 and cfg.cp_impl == "allgather-kv":
        return "efficient" if executor.attention_backend == "efficient" else "flash"
    if executor.native_gqa and model is not None and model.n_heads != model.n_kv_heads:
        return "flash"  # enable_gqa=True: only flash (and math) accept it
    return executor.attention_backend


# ----------------------------------------------------------------------------- optimizer

OPTIMIZER_BYTES_PER_PARAM = 28 + 4  # AdamW fp32: read p, g, m, v; write p, m, v; + norm
# Optimizer + clipping host ops. AdamW(foreach=False) runs, per parameter tensor
# (torch 2.13 torch/optim/adam.py _single_tensor_adam, non-capturable path), 8 DTensor ops:
# param.mul_ (decoupled weight decay), exp_avg.lerp_, exp_avg_sq.mul_ + addcmul_,
# exp_avg_sq.sqrt, / bias correction, .add_(eps), param.addcdiv_; plus step_t += 1 on a
# plain tensor. clip_grad_norm_(foreach=False): one vector_norm and one mul_ per tensor.
# With foreach both become ~20 multi-tensor ops over the whole list (each still unwraps
# every DTensor: ~1 us a tensor).
OPTIMIZER_DTENSOR_OPS_PER_TENSOR = 8 + 2
OPTIMIZER_PLAIN_OPS_PER_TENSOR = 1
OPTIMIZER_FOREACH_OPS = 20
FOREACH_PER_TENSOR_OP_S = 1e-6


def parameter_tensors(model: ModelSpec) -> int:
    """Parameter tensors the optimizer walks: 7 linears + 2 norms (+ 3 q/k/v biases) per
    block, embedding, final norm, output (291 for Llama 3 8B)."""
    return (9 + (3 if model.qkv_bias else 0)) * model.n_layers + 2 + (0 if model.tie_embeddings else 1)


def optimizer_time_s(model: ModelSpec, gpu: GPUSpec, cfg: TrainConfig, executor: ExecutorProfile) -> float:
    """AdamW + clip_grad_norm_: HBM traffic of the sharded state, or the host's op issue
    when that is longer (foreach=False over ~290 DTensor parameters is dispatch-bound)."""
    par = cfg.parallelism
    sharded_params = model.num_params / par.tp / par.fsdp_degree
    hbm_s = sharded_params * OPTIMIZER_BYTES_PER_PARAM / gpu.hbm_bytes_per_s
    n = parameter_tensors(model)
    if executor.optimizer_foreach:
        host_s = OPTIMIZER_FOREACH_OPS * (executor.dtensor_op_overhead_s + n * FOREACH_PER_TENSOR_OP_S)
    else:
        host_s = n * (OPTIMIZER_DTENSOR_OPS_PER_TENSOR * executor.dtensor_op_overhead_s
                      + OPTIMIZER_PLAIN_OPS_PER_TENSOR * executor.host_op_overhead_s)
    return max(hbm_s, host_s)
