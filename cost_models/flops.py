"""FLOP counts: the MFU convention (model FLOPs) and what the GPU actually executes.

Derivation (per token, one layer, forward): a matmul with an ``m x n`` weight costs
``2 m n`` FLOPs, so the linear layers cost ``2 x matmul_params``. Causal attention over
a sequence of ``S`` tokens does ``Q K^T`` and ``P V``: ``2 x 2 x S x head_dim x n_heads``
per query token if every key were visited; the causal mask halves that for kernels that
skip masked tiles (FlashAttention). Backward costs 2x the forward for matmuls (gradient
w.r.t. input and weight) and 2.5x for flash attention (it recomputes ``Q K^T``;
Dao 2023, arXiv:2307.08691, section 3.1 / Table 1 counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from .specs import ModelSpec

ATTENTION_BACKWARD_FACTOR = 2.5  # flash attention backward / forward FLOPs
MATMUL_BACKWARD_FACTOR = 2.0


def mfu_params(model: ModelSpec) -> int:
    """torchtitan's MFU parameter count: all parameters minus the nn.Embedding weight.

    With tied embeddings the shared matrix is subtracted too (torchtitan subtracts every
    nn.Embedding's weight from the deduplicated parameter count), so we do the same.
    """
    return model.num_params - model.embedding_params


def model_flops_per_token(model: ModelSpec, seq_len: int) -> float:
    """FLOPs per token for MFU: ``6 N + 12 L H d_head S`` (torchtitan / PaLM appendix B).

    No causal discount and no recompute, so numbers compare with published MFU.
    """
    return 6.0 * mfu_params(model) + 12.0 * model.n_layers * model.q_dim * seq_len


def layer_matmul_params(model: ModelSpec) -> int:
    """Parameters of one block that take part in matmuls (all but the norm weights)."""
    return model.params_per_layer - 2 * model.dim - model.bias_params_per_layer


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one block for ``tokens`` tokens on one GPU."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def layer_forward_flops(model: ModelSpec, tokens_per_gpu: int, seq_len: int, cp: int, tp: int,
                        causal_skip: bool = True) -> LayerFlops:
    """Forward FLOPs one GPU executes for one block.

    ``tokens_per_gpu = local_batch x seq_len / cp``. Each query token attends on average
    to ``seq_len / 2`` keys under a causal mask (head-tail load balancing makes that true
    on every CP rank, not just on average). Tensor parallel splits heads and FFN columns.
    """
    linear = 2.0 * layer_matmul_params(model) * tokens_per_gpu / tp
    keys_per_query = seq_len / 2.0 if causal_skip else float(seq_len)
    attention = 4.0 * model.q_dim * keys_per_query * tokens_per_gpu / tp
    return LayerFlops(linear=linear, attention=attention)


def output_forward_flops(model: ModelSpec, tokens_per_gpu: int, tp: int) -> float:
    """The output projection (vocab logits)."""
    return 2.0 * model.dim * model.vocab_size * tokens_per_gpu / tp


def step_forward_backward_flops(model: ModelSpec, tokens_per_gpu: int, seq_len: int, cp: int,
                                tp: int) -> dict[str, float]:
    """Executed FLOPs of forward + backward for one micro-batch on one GPU, no recompute."""
    layer = layer_forward_flops(model, tokens_per_gpu, seq_len, cp, tp)
    output = output_forward_flops(model, tokens_per_gpu, tp)
    return {
        "linear": model.n_layers * layer.linear * (1 + MATMUL_BACKWARD_FACTOR)
        + output * (1 + MATMUL_BACKWARD_FACTOR),
        "attention": model.n_layers * layer.attention * (1 + ATTENTION_BACKWARD_FACTOR),
    }


def layer_gemms(model: ModelSpec, tokens_per_gpu: int, tp: int) -> tuple[tuple[str, int, int, int], ...]:
    """The forward GEMMs of one block on one GPU as (name, M, N, K): output M x N, inner K.

    Under tensor parallel (+ sequence parallel) the column-parallel projections (wq, wk,
    wv, w1, w3) see the all-gathered tokens and 1/tp of the output features; the
    row-parallel ones (wo, w2) 1/tp of the input features. Their FLOPs sum to
    ``layer_forward_flops(...).linear`` (2 M N K each).
    """
    d, dq, dkv, f = model.dim, model.q_dim, model.kv_dim, model.ffn_dim
    m = tokens_per_gpu
    kv = max(1, dkv // tp)  # kv heads replicated when tp exceeds them
    return (("wq", m, dq // tp, d), ("wk", m, kv, d), ("wv", m, kv, d),
            ("wo", m, d, dq // tp), ("w1", m, f // tp, d), ("w3", m, f // tp, d), ("w2", m, d, f // tp))
