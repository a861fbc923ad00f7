"""Context parallelism: the sequence is split over ``cp`` ranks.

Load balancing (head-tail): the sequence is cut into ``2 cp`` equal chunks and rank
``r`` holds chunks ``r`` and ``2cp - 1 - r``, so every rank does the same causal work.

Portable implementation (``allgather-kv``, the Llama 3 approach): each rank all-gathers
K and V of the whole sequence (``all_gather_single_autograd``; its backward is a
reduce-scatter of dK/dV) and attends its two query chunks to their causal prefixes.
A query chunk ``g`` attends the strict prefix ``K[:g c]`` without a mask and its own
chunk ``K[g c:(g+1) c]`` with the top-left causal mask; the two partial results are
merged by their log-sum-exp. Backward runs each block's flash backward with the merged
output and log-sum-exp, which yields exactly the gradient of the global softmax (the
same identity ring attention uses). Memory stays linear in sequence length: no mask
and no score matrix is materialized.

On CUDA, the ring implementations use PyTorch's own ``context_parallel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def head_tail_chunks(cp_rank: int, cp: int) -> tuple[int, int]:
    return cp_rank, 2 * cp - 1 - cp_rank


def shard_sequence(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens (its two chunks, head then tail) along ``dim``."""
    chunks = x.chunk(2 * cp, dim=dim)
    head, tail = head_tail_chunks(cp_rank, cp)
    return torch.cat([chunks[head], chunks[tail]], dim=dim)


def gathered_order(cp: int) -> list[int]:
    """Global chunk index of each chunk in the all-gathered buffer (rank-major)."""
    order = []
    for rank in range(cp):
        order += list(head_tail_chunks(rank, cp))
    return order


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _reduce_kv(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    if grad.shape[1] == kv_heads:
        return grad
    batch, heads, length, dim = grad.shape
    return grad.view(batch, kv_heads, heads // kv_heads, length, dim).sum(2)


class ChunkedCausalAttention(torch.autograd.Function):
    """Query chunks (global indices ``chunk_ids``) against the whole-sequence K/V."""

    @staticmethod
    def forward(ctx, q, k, v, chunk_ids: tuple[int, ...]):
        chunk = q.shape[2] // len(chunk_ids)
        outs, lses = [], []
        for i, g in enumerate(chunk_ids):
            qi = q[:, :, i * chunk:(i + 1) * chunk]
            blocks = _blocks(g, chunk)
            out, lse = None, None
            for start, stop, causal in blocks:
                kb = _expand_kv(k[:, :, start:stop], q.shape[1])
                vb = _expand_kv(v[:, :, start:stop], q.shape[1])
                ob, lb = CPU_FLASH(qi, kb, vb, 0.0, causal)
                if out is None:
                    out, lse = ob, lb
                else:
                    merged = torch.logaddexp(lse, lb)
                    out = (out * torch.exp(lse - merged).unsqueeze(-1).to(out.dtype)
                           + ob * torch.exp(lb - merged).unsqueeze(-1).to(ob.dtype))
                    lse = merged
            outs.append(out)
            lses.append(lse)
        out = torch.cat(outs, dim=2)
        lse = torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk_ids = chunk_ids
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        chunk = q.shape[2] // len(ctx.chunk_ids)
        heads = q.shape[1]
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for i, g in enumerate(ctx.chunk_ids):
            rows = slice(i * chunk, (i + 1) * chunk)
            for start, stop, causal in _blocks(g, chunk):
                kb = _expand_kv(k[:, :, start:stop], heads)
                vb = _expand_kv(v[:, :, start:stop], heads)
                gq, gk, gv = CPU_FLASH_BACKWARD(grad_out[:, :, rows].contiguous(), q[:, :, rows], kb, vb,
                                                out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(),
                                                0.0, causal)
                dq[:, :, rows] += gq
                dk[:, :, start:stop] += _reduce_kv(gk, k.shape[1])
                dv[:, :, start:stop] += _reduce_kv(gv, v.shape[1])
        return dq, dk, dv, None


def _blocks(g: int, chunk: int) -> list[tuple[int, int, bool]]:
    """(start, stop, causal) key ranges query chunk ``g`` attends."""
    blocks = [(0, g * chunk, False)] if g > 0 else []
    return blocks + [(g * chunk, (g + 1) * chunk, True)]


def reorder_gathered(x: torch.Tensor, cp: int, dim: int = 2) -> torch.Tensor:
    """Rank-major gathered chunks -> global sequence order."""
    chunks = x.chunk(2 * cp, dim=dim)
    position = {g: i for i, g in enumerate(gathered_order(cp))}
    return torch.cat([chunks[position[g]] for g in range(2 * cp)], dim=dim)


def chunked_attention_lower_right(q, k, v, chunk_ids: tuple[int, ...]):
    """CUDA form of the same computation with public SDPA (lower-right causal masks are
    native to the flash / efficient kernels, so nothing is materialized)."""
    from torch.nn.attention.bias import causal_lower_right

    chunk = q.shape[2] // len(chunk_ids)
    outs = []
    for i, g in enumerate(chunk_ids):
        qi = q[:, :, i * chunk:(i + 1) * chunk]
        keys = (g + 1) * chunk
        kb, vb = _expand_kv(k[:, :, :keys], q.shape[1]), _expand_kv(v[:, :, :keys], q.shape[1])
        outs.append(F.scaled_dot_product_attention(qi, kb, vb, attn_mask=causal_lower_right(chunk, keys)))
    return torch.cat(outs, dim=2)


class AllGatherKVAttention:
    """attention_fn for a block: gather K/V over the cp group, attend local chunks."""

    def __init__(self, cp_mesh, cp_rank: int, cp: int):
        self.cp_mesh = cp_mesh
        self.cp_rank = cp_rank
        self.cp = cp

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_gather_single_autograd

        group = self.cp_mesh.get_group()

        def gather(x):
            full = all_gather_single_autograd(x.contiguous(), gather_dim=2, group=group)
            return reorder_gathered(full, self.cp, dim=2)

        k_full, v_full = gather(k), gather(v)
        chunk_ids = head_tail_chunks(self.cp_rank, self.cp)
        if q.is_cuda:
            return chunked_attention_lower_right(q, k_full, v_full, chunk_ids)
        return ChunkedCausalAttention.apply(q.contiguous(), k_full, v_full, chunk_ids)
