"""What one block keeps for backward and needs while it runs backward, per AC mode, and
what the loss keeps alive: the per-layer and loss terms of the memory model
(``memory.py`` composes them into the step's phases; its docstring derives the terms).

Selective AC is the executor's: ``ExecutorProfile.selective_saves`` names what one block
keeps (``save_bytes``). Under PyTorch's ring CP the attention's transients are
``ring_attention_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig
from .executors import ExecutorProfile
from .specs import ModelSpec

FP32 = 4


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one block holds for backward (``saved``) and needs on top while it runs
    backward (``working``), per AC mode."""

    saved: dict[str, float]
    working: dict[str, float]


def torchtitan_layer_sac_modes(n_layers: int, every: int) -> tuple[str, ...]:
    """torchtitan's per-layer selective AC (late 2024, ``selective_ac_option="N"``, not in
    0.3): ``ptd_checkpoint_wrapper._count += 1`` per block in order and the block is
    wrapped (full AC) when ``_count % N == 0``, else left alone - blocks N, 2N, ... counted
    from 1 are checkpointed. ``every=0`` checkpoints all of them."""
    if every < 0:
        raise ValueError(f"selective_ac_option={every}: must be >= 0")
    return tuple("full" if not every or (i + 1) % every == 0 else "none" for i in range(n_layers))


def save_bytes(model: ModelSpec, cfg: TrainConfig) -> dict[str, float]:
    """Bytes of each tensor a selective-AC policy may keep for one block (names used by
    ``ExecutorProfile.selective_saves``), with ``T`` local tokens and ``a`` bytes per
    activation element. Under TP the column-parallel outputs are split by heads / FFN
    columns; wo's and w2's matmul outputs are full-width partial sums (before the SP
    reduce-scatter) and ``wo_rs``/``w2_rs`` are the reduce-scatter outputs (only exist
    under TP)."""
    tp = cfg.parallelism.tp
    a = cfg.precision.activation_bytes
    T = cfg.tokens_per_gpu
    d, dq, dkv, f, heads = model.dim, model.q_dim, model.kv_dim, model.ffn_dim, model.n_heads
    return {
        "block_input": a * T * d / tp,
        "wq": a * T * dq / tp, "wk": a * T * dkv / tp, "wv": a * T * dkv / tp,
        "attention": a * T * dq / tp + FP32 * T * heads / tp,  # output + fp32 logsumexp
        "wo": a * T * d, "w2": a * T * d,
        "w1": a * T * f / tp, "w3": a * T * f / tp,
        "wo_rs": a * T * d / tp if tp > 1 else 0.0, "w2_rs": a * T * d / tp if tp > 1 else 0.0,
    }


def selective_saves(executor: ExecutorProfile) -> tuple[str, ...]:
    saves = executor.selective_saves
    if executor.compile:
        saves = tuple(name for name in saves if name not in executor.compile_drops_saves)
    return saves


def ring_attention_bytes(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile) -> tuple[float, float]:
    """(forward, backward) transient bytes of one attention call under PyTorch's ring CP,
    as torch 2.13 allocates them (torch/distributed/tensor/experimental/_context_parallel/
    _attention.py), beyond the block's saved tensors. ``q``/``kv`` are the local query and
    one of K/V in elements (K/V at query width when the executor expands them).

    Forward (``_templated_ring_attention``): ``torch.cat([key.flatten(), value.flatten()])``
    (2 kv, activation dtype) is rotated: the allgather rotater gathers it once
    (``ft_c.all_gather_single``: cp x 2 kv, alive for the whole loop), the alltoall rotater
    holds the current and the next received copy (2 x 2 kv); the inputs q, k, v are alive; ``_SDPAMerger`` with
    ``convert_to_f32`` keeps the running output in fp32 (4 q bytes) and, at a merge,
    the step's bf16 output, its fp32 copy, ``out - block_out`` and the sigmoid product
    (3 x 4 q bytes), plus fp32 LSE copies (4 x 4 bytes per head and token).
    Backward (``_templated_ring_attention_backward``): fp32 accumulators ``grad_query``
    (4 q) and the rotating fp32 dK/dV: the current ones, the new
    ``torch.cat([grad_key, grad_value])`` and the next received one (3 x 8 kv bytes,
    all-to-all rotater ``permute_tensor``); the step's dq, dk, dv in the activation dtype,
    twice (the previous step's stay bound until the op returns the next); the K/V
    rotation as in forward; FlashAttention-2's fp32 ``dq_accum`` workspace (4 q, an
    allocator tensor in flash_api.cpp). Checked against a trace of torch's own ring
    functions (tests/test_memory_ring.py).
    """
    par = cfg.parallelism
    tp, cp = par.tp, par.cp
    a = cfg.precision.activation_bytes
    T = cfg.tokens_per_gpu
    q = T * model.q_dim / tp
    kv = T * (model.q_dim if executor.sdpa_kv_expanded else model.kv_dim) / tp
    lse = FP32 * T * model.n_heads / tp
    allgather = cfg.cp_impl == "ring-allgather"
    # Forward: exchange_buffers returns None, so each step's cat dies at once; what stays
    # is the gathered K/V (allgather) or the current and the next received (alltoall; only
    # the current at the last step, so one buffer when cp == 2).
    rotation_forward = (cp if allgather else (2 if cp > 2 else 1)) * 2 * a * kv
    # Backward keeps ``next_kv = torch.cat(...)`` bound through the step.
    rotation_backward = (cp if allgather else 2) * 2 * a * kv + 2 * a * kv
    forward = a * (q + 2 * kv) + rotation_forward + 4 * FP32 * q + a * q + 4 * lse
    backward = 2 * FP32 * q + 2 * a * (q + 2 * kv) + 3 * 2 * FP32 * kv + rotation_backward + lse
    return forward, backward


def layer_memory(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile) -> LayerMemory:
    """Saved and working bytes of one block for each AC mode (see the module docstring)."""
    par = cfg.parallelism
    tp, cp = par.tp, par.cp
    a = cfg.precision.activation_bytes
    tokens = cfg.tokens_per_gpu
    d, dq, dkv, f, heads = model.dim, model.q_dim, model.kv_dim, model.ffn_dim, model.n_heads
    sp_gathered = d if (tp == 1 or executor.sp_saves_gathered_matmul_input) else d / tp
    # What attention keeps of K and V (runtime/model.py): kv-head width (SDPA's native
    # GQA) or query width when the executor expands them first (torchtitan 2024's
    # repeat_kv), for the whole sequence under all-gather CP.
    kv_tokens = tokens * cp if cfg.cp_impl == "allgather-kv" else tokens
    kv_width = dq if executor.sdpa_kv_expanded else dkv
    kv_saved = a * kv_tokens * 2 * kv_width / tp
    norm_bytes = a if (executor.norm_saved_bytes_per_element is None or executor.compile) \
        else executor.norm_saved_bytes_per_element
    norm_in = norm_bytes * tokens * d / tp + FP32 * tokens / tp  # input (or its fp32 copies) + rstd
    attention_out = a * tokens * dq / tp + FP32 * tokens * heads / tp  # out + lse

    none = (2 * norm_in + 2 * a * tokens * sp_gathered
            + a * tokens * dq / tp + kv_saved  # q, k, v after RoPE
            + attention_out  # wo's input is a view of the attention output
            + 4 * a * tokens * f / tp)
    sizes = save_bytes(model, cfg)
    selective = sum(sizes[name] for name in selective_saves(executor))
    full = sizes["block_input"]

    # Gradient temporaries while one block runs backward. Autograd frees a node's saved
    # tensors once the node has run, so at the SwiGLU product's backward (the widest
    # moment) its two new f-wide input grads exist while w2's saved input is already gone:
    # +2 f. Attention backward holds dq, dk, dv (all-gathered width under CP before the
    # reduce-scatter; under ring CP the ring's fp32 accumulators and rotation buffers).
    # The residual-stream gradient (sequence-sharded under SP) is alive throughout.
    # Under TP's sequence parallelism the row-parallel output matmuls (w2, wo) first
    # all-gather their incoming grad over the sequence (a x T x d) and write their input
    # grad next to it: at TP 8 that moment outgrows the SwiGLU product's (d > f / tp).
    gathered_grad = a * tokens * d if tp > 1 else 0.0
    ffn_grads = max(2 * a * tokens * f / tp, gathered_grad + a * tokens * f / tp)
    attention_grads = max(a * tokens * dq / tp + kv_saved, gathered_grad + a * tokens * dq / tp)
    if cfg.cp_impl in ("ring-allgather", "ring-alltoall") and cp > 1:
        attention_grads = max(ring_attention_bytes(model, cfg, executor)[1], gathered_grad + a * tokens * dq / tp)
    # Attention runs backward after the FFN, whose four f-wide tensors (saved or
    # recomputed, in every mode) are freed by then.
    transient = max(ffn_grads, attention_grads - 4 * a * tokens * f / tp) + a * tokens * d / tp
    working = {
        "none": transient,
        "selective": max(none - selective, 0.0) + transient,
        "full": none - full + transient,
    }
    return LayerMemory(saved={"none": none, "selective": selective, "full": full}, working=working)


def loss_chunk_tokens(cfg: TrainConfig, executor: ExecutorProfile) -> int:
    return chunk_tokens(cfg.tokens_per_gpu, executor)


def chunk_tokens(tokens: int, executor: ExecutorProfile) -> int:
    """Tokens per loss chunk for ``tokens`` local tokens under the executor's chunking."""
    if executor.loss_num_chunks:
        return max(1, tokens // executor.loss_num_chunks)
    return min(tokens, executor.loss_chunk_tokens) if executor.loss_chunk_tokens else tokens


def loss_working_bytes(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile) -> float:
    """Logits and cross-entropy tensors alive at once, for one chunk of tokens.

    tp == 1, fused ``F.cross_entropy`` on fp32-upcast logits: forward holds the logits,
    their fp32 copy and the log-softmax output (logits + 4 + 4 bytes per element);
    backward holds the saved log-softmax output, nll_loss's dense gradient and
    log-softmax's input gradient (3 x 4).
    tp > 1, ``loss_parallel`` on vocab-sharded logits (torch/distributed/tensor/parallel/
    loss.py): forward holds logits, the fp32 copy, the max-shifted copy and its exp; exp
    is freed after its all-reduced sum, before the result is written (logits + 3 x 4).
    Backward holds the saved result, a zeros gradient, exp(result) and their sum
    (4 x 4); three are freed before the gradient is cast back to the logits' dtype.
    Traced op by op at TP 2 and 8 (tests/test_memory_vs_trace.py); DTensor's sharding
    propagation adds global-shape copies under a naive fake-tensor trace, not on a GPU
    (runtime/trace.py).
    """
    chunk = loss_chunk_tokens(cfg, executor)
    vocab = model.vocab_size / cfg.parallelism.tp
    upcast = FP32 if executor.loss_upcast_fp32 else executor.logits_bytes
    if executor.compile and executor.loss_compiled_with_model:
        # Inductor fuses upcast + log-softmax + nll: forward keeps the logits (read again
        # in backward) and a per-row logsumexp; backward writes one logits-sized grad.
        return 2 * executor.logits_bytes * chunk * vocab
    if cfg.parallelism.tp > 1:
        forward = executor.logits_bytes + 3 * upcast
        backward = 4 * upcast
    else:
        forward = executor.logits_bytes + 2 * upcast
        backward = 3 * upcast
    return max(forward, backward) * chunk * vocab
