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


def _attend_chunks(q, k, v, chunk_ids: list[int], out, lse) -> None:
    """Fill ``out``/``lse`` for query chunks ``chunk_ids`` against the whole K/V."""
    chunk = q.shape[2] // len(chunk_ids)
    for i, g in enumerate(chunk_ids):
        rows = slice(i * chunk, (i + 1) * chunk)
        acc, acc_lse = None, None
        for start, stop, causal in _blocks(g, chunk):
            # The CPU flash kernel does GQA natively (fewer K/V heads than Q heads).
            ob, lb = CPU_FLASH(q[:, :, rows], k[:, :, start:stop], v[:, :, start:stop], 0.0, causal)
            if acc is None:
                acc, acc_lse = ob, lb
            else:
                merged = torch.logaddexp(acc_lse, lb)
                acc = (acc * torch.exp(acc_lse - merged).unsqueeze(-1).to(acc.dtype)
                       + ob * torch.exp(lb - merged).unsqueeze(-1).to(ob.dtype))
                acc_lse = merged
        out[:, :, rows] = acc
        lse[:, :, rows] = acc_lse


@torch.library.custom_op("autoplan::cp_attention", mutates_args=())
def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_ids: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query chunks (global indices ``chunk_ids``, equal length, in this order along
    q's sequence dim) against the whole-sequence K/V (B x Hkv x S x hd), exactly causal.

    Returns the output (B x H x T x hd, laid out B x T x H x hd in memory like the flash
    kernels, so ``wo``'s input is a view) and its fp32 log-sum-exp (B x H x T). One op,
    so selective checkpointing saves the merged output once.
    """
    out, lse = _cp_attention_empty(q)
    _attend_chunks(q, k, v, list(chunk_ids), out, lse)
    return out, lse


def _cp_attention_empty(q):
    batch, heads, tokens, dim = q.shape
    out = torch.empty_permuted((batch, heads, tokens, dim), (0, 2, 1, 3), dtype=q.dtype, device=q.device)
    lse = q.new_empty((batch, heads, tokens), dtype=torch.promote_types(q.dtype, torch.float32))
    return out, lse


@cp_attention.register_fake
def _(q, k, v, chunk_ids):
    return _cp_attention_empty(q)


def _cp_attention_setup(ctx, inputs, output):
    q, k, v, chunk_ids = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.chunk_ids = list(chunk_ids)


def _cp_attention_backward(ctx, grad_out, grad_lse):
    """Each block's flash backward with the MERGED output and log-sum-exp gives the
    gradient of the global softmax (as in ring attention's backward)."""
    q, k, v, out, lse = ctx.saved_tensors
    chunk = q.shape[2] // len(ctx.chunk_ids)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, g in enumerate(ctx.chunk_ids):
        rows = slice(i * chunk, (i + 1) * chunk)
        for start, stop, causal in _blocks(g, chunk):
            gq, gk, gv = CPU_FLASH_BACKWARD(grad_out[:, :, rows], q[:, :, rows], k[:, :, start:stop],
                                            v[:, :, start:stop], out[:, :, rows], lse[:, :, rows], 0.0, causal)
            dq[:, :, rows] += gq
            dk[:, :, start:stop] += gk
            dv[:, :, start:stop] += gv
    return dq, dk, dv, None


cp_attention.register_autograd(_cp_attention_backward, setup_context=_cp_attention_setup)


def chunked_causal_attention(q, k, v, chunk_ids) -> torch.Tensor:
    return cp_attention(q, k, v, list(chunk_ids))[0]


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
    native to the flash / efficient kernels, so nothing is materialized). K/V stay at
    kv-head width (``enable_gqa``): expanding them to the query heads would keep 4x (8B)
    to 16x (405B) more K/V alive than the memory model prices, as a trace of this path
    on the fake CUDA device showed (-5% at 16k, -10% at 64k)."""
    from torch.nn.attention.bias import causal_lower_right

    chunk = q.shape[2] // len(chunk_ids)
    outs = []
    for i, g in enumerate(chunk_ids):
        qi = q[:, :, i * chunk:(i + 1) * chunk]
        keys = (g + 1) * chunk
        outs.append(F.scaled_dot_product_attention(qi, k[:, :, :keys], v[:, :, :keys],
                                                   attn_mask=causal_lower_right(chunk, keys),
                                                   enable_gqa=k.shape[1] != q.shape[1]))
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
        return chunked_causal_attention(q, k_full, v_full, chunk_ids)
