"""A Llama-3-style decoder in one file: RMSNorm, RoPE, GQA attention, SwiGLU.

Module names follow torchtitan (tok_embeddings, layers.N.attention.wq, ...), so the
tensor-parallel plan and checkpoints read naturally.

What one block keeps for backward (measured by ``runtime/saved_tensors.py`` and checked
by tests/test_runtime_saved.py), on one rank with ``T`` tokens (``local_batch x seq_len /
cp``), ``S = local_batch x seq_len`` (the whole sequence), ``d`` model dim, ``d_q = H x
head_dim``, ``d_kv = H_kv x head_dim``, ``f`` FFN dim, ``H`` heads, ``b`` bytes per
activation element (the compute dtype); rstd and log-sum-exp are fp32 (4 bytes):

``none``, tp = cp = 1 -- ``T [b (4d + 2d_q + 2d_kv + 4f) + 4 (2 + H)]``:
  block input x (saved by attention_norm, T x d) and rstd (T); the normed x shared by
  wq/wk/wv (T x d); q after RoPE (T x d_q); K after RoPE and V at kv-head width (T x
  d_kv each: SDPA's ``enable_gqa``; on CUDA in fp32 they are expanded to d_q); the SDPA
  output (T x d_q; the flash kernels lay it out B x T x H x hd, so ``wo``'s input is a
  view of it, not a copy) and its log-sum-exp (H x T); h (ffn_norm input, T x d) and
  rstd; the normed h (T x d); w1 out, silu out, w3 out, their product (T x f each).
  RoPE's cos/sin tables are shared by all blocks and made once per forward.
``none`` with all-gather CP -- ``b (4Td + 2Td_q + 2S d_kv + 4Tf) + 4T (2 + H)``:
  as above, but K and V are the gathered ones of the whole sequence (S x d_kv each).
``none`` with TP (sequence parallel) -- T is the tokens of the TP group:
  ``b (2Td/tp + 2Td + 2Td_q/tp + 2Td_kv/tp + 4Tf/tp) + 4T (2 + H)/tp`` (norm inputs and rstd are
  sequence-sharded; the all-gathered norm outputs feeding the column-parallel matmuls
  are full T x d; heads and FFN columns are split). With CP too, replace the attention
  terms as above: ``2Td_q/tp + 2S d_kv/tp``.
``selective`` (save outputs of matmuls and attention ops, recompute the rest) --
  ``T [b (3d + 2d_q + 2d_kv + 2f) + 4H]``: the block input x (kept by the checkpoint),
  wq/wk/wv outputs (d_q + 2 d_kv), the attention output + lse, wo and w2 outputs (d
  each), w1 and w3 outputs (f each). Under CP the same per local token (the custom
  ``autoplan::cp_attention`` op is one saved op; the K/V all-gather is re-run in
  backward). Under TP: ``T [b (d/tp + (d_q + 2d_kv)/tp + d_q/tp + 2d + 2f/tp) + 4H/tp]``
  -- wo's and w2's matmul outputs are saved before their reduce-scatter, at full d.
``full`` -- ``b T d`` (``b T d / tp`` under TP): only the block input.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cost_models.specs import ModelSpec


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm that saves only its input and the per-token rstd, like a fused kernel.

    y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), computed in fp32.
    dx = rstd * (g*w - xhat * mean(g*w*xhat)), dw = sum(g * xhat), xhat = x * rstd.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16, fp64 stays fp64
        x_wide = x.to(wide)
        rstd = torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x_wide * rstd * weight.to(wide)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        wide = rstd.dtype
        xhat = x.to(wide) * rstd
        gw = grad.to(wide) * weight.to(wide)
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw = (grad.to(wide) * xhat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T x head_dim) for the given GLOBAL token positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (x: B x T x H x hd); cos/sin: T x hd. Saves only cos/sin for backward."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal SDPA; q: B x H x T x hd, k/v: B x Hkv x T x hd.

    GQA is native (``enable_gqa``) on the CPU flash kernel and on CUDA's flash kernel
    (fp16 / bf16), so K and V stay at kv-head width; elsewhere (CUDA fp32, which runs the
    memory-efficient kernel) K and V are expanded with ``repeat_interleave`` first.
    """
    if k.shape[1] != q.shape[1] and not native_gqa(q):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def native_gqa(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads = spec.n_heads
        self.n_kv_heads = spec.n_kv_heads
        self.head_dim = spec.head_dim
        # q/k/v biases when the model has them (Qwen2); ColwiseParallel shards them with the weights.
        self.wq = nn.Linear(spec.dim, spec.q_dim, bias=spec.qkv_bias)
        self.wk = nn.Linear(spec.dim, spec.kv_dim, bias=spec.qkv_bias)
        self.wv = nn.Linear(spec.dim, spec.kv_dim, bias=spec.qkv_bias)
        self.wo = nn.Linear(spec.q_dim, spec.dim, bias=False)
        # Replaced by context parallel (runtime/context_parallel.py).
        self.attention_fn: AttentionFn = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        # Under TP the projections are sharded by heads: infer local head counts.
        q = self.wq(x).view(batch, tokens, -1, self.head_dim)
        k = self.wk(x).view(batch, tokens, -1, self.head_dim)
        v = self.wv(x).view(batch, tokens, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(batch, tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.w1 = nn.Linear(spec.dim, spec.ffn_dim, bias=False)
        self.w2 = nn.Linear(spec.ffn_dim, spec.dim, bias=False)
        self.w3 = nn.Linear(spec.dim, spec.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.attention = Attention(spec)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.feed_forward = FeedForward(spec)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Returns final normed hidden states; the loss (runtime/loss.py) owns ``output``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(spec) for i in range(spec.n_layers)})
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        self.output = nn.Linear(spec.dim, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.norm(h)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Deterministic init of the FULL tensors, independent of how they are sharded.

    Each parameter's values come from a generator seeded by (seed, parameter name), drawn
    for the full shape; DTensor parameters then keep only their local shard. This costs
    one full tensor at a time on each rank (never the whole model).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        generator = torch.Generator().manual_seed(_name_seed(seed, name))
        full_shape = param.shape
        if name.endswith("norm.weight"):
            full = torch.ones(full_shape)
        elif name.endswith(".bias"):
            full = torch.zeros(full_shape)
        else:
            std = 0.02 if "tok_embeddings" in name else 1.0 / math.sqrt(full_shape[-1])
            full = torch.randn(full_shape, generator=generator) * std
        if isinstance(param, DTensor):
            local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full.to(param.device))


def _name_seed(seed: int, name: str) -> int:
    value = seed
    for char in name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""):
        value = (value * 131 + ord(char)) % (2**61 - 1)
    return value
