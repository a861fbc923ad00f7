"""Cross-entropy over the vocabulary without holding every token's logits at once.

tp == 1: the output projection and an fp32 cross-entropy run per chunk of tokens under
activation checkpointing, so one chunk's logits (bf16 + fp32 copy + log-softmax) are
alive at a time, in forward and in backward (cost_models.executors: profile 'autoplan').
tp > 1: the same chunking; the output projection is column-parallel (vocab-sharded
logits) and ``loss_parallel`` computes the cross-entropy on the shards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, output: torch.nn.Linear, labels: torch.Tensor,
                              chunk_tokens: int | None) -> torch.Tensor:
    """Sum of token losses; ``hidden``: B x T x d, ``labels``: B x T."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    chunk = chunk_tokens or flat_hidden.shape[0]
    total = None
    for start in range(0, flat_hidden.shape[0], chunk):
        part = checkpoint(_chunk_loss_sum, flat_hidden[start:start + chunk], output.weight,
                          flat_labels[start:start + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


def loss_parallel_once():
    """``loss_parallel()``, or nothing when it is already active.

    ``loss_parallel`` is not re-entrant: its exit removes the loss ops even when an outer
    one (around a backward, or around a whole pipeline schedule) still needs them.
    """
    import contextlib

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel
    from torch.distributed.tensor.parallel.loss import customized_loss_ops

    handlers = DTensor._op_dispatcher._custom_op_handlers
    if all(op in handlers for op in customized_loss_ops):
        return contextlib.nullcontext()
    return loss_parallel()


def _parallel_chunk_loss_sum(hidden, output: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    logits = output(hidden)  # column-parallel: vocab-sharded DTensor
    with loss_parallel_once():
        return F.cross_entropy(logits.float(), labels, reduction="sum")


def parallel_cross_entropy_sum(hidden, output: torch.nn.Module, labels: torch.Tensor,
                               chunk_tokens: int | None) -> torch.Tensor:
    """Tensor parallel: gather the (sequence-sharded) hidden states once, then per chunk
    of tokens a column-parallel output projection and ``loss_parallel`` cross-entropy on
    vocab-sharded logits, checkpointed like the tp == 1 path."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(hidden, DTensor):
        hidden = hidden.redistribute(hidden.device_mesh, [Replicate()])
    flat_hidden = hidden.flatten(0, 1)
    flat_labels = labels.reshape(-1)
    chunk = chunk_tokens or flat_hidden.shape[0]
    total = None
    for start in range(0, flat_hidden.shape[0], chunk):
        part = checkpoint(_parallel_chunk_loss_sum, flat_hidden[start:start + chunk], output,
                          flat_labels[start:start + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total
