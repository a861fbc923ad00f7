"""Token streams: deterministic synthetic tokens, or a memory-mapped file of token ids.

A file is read in order and wraps around at its end; it must hold at least one step.
Each step draws ``global_batch = local_batch x dp`` sequences of ``seq_len + 1`` tokens;
data-parallel rank ``i`` takes rows ``[i b, (i+1) b)``. Labels are the inputs shifted by
one, cut from the full sequence BEFORE context parallel shards it, so every CP rank's
labels line up with its (head, tail) chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    pass


class TokenSource:
    """Sequences of ``seq_len + 1`` tokens, indexed by a global sample number."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, path: str | None = None,
                 sequences_per_step: int = 1):
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.tokens = None
        if path is not None:
            self.tokens = _open_tokens(Path(path))
            needed = sequences_per_step * (seq_len + 1)
            if len(self.tokens) < needed:
                raise DataError(f"--data {path}: {len(self.tokens)} tokens, fewer than one step needs "
                                f"({sequences_per_step} sequences of seq_len + 1 = {seq_len + 1}: {needed} tokens)")
            top = int(self.tokens.max()) if len(self.tokens) else 0
            if top >= vocab_size:
                raise DataError(f"--data {path}: token id {top} >= the model's vocab_size {vocab_size}")

    @property
    def num_sequences(self) -> int | None:
        return None if self.tokens is None else len(self.tokens) // (self.seq_len + 1)

    def sample(self, index: int) -> torch.Tensor:
        if self.tokens is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=generator)
        index %= self.num_sequences
        start = index * (self.seq_len + 1)
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))


def _open_tokens(path: Path):
    if not path.exists():
        raise DataError(f"--data {path}: file not found")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r").reshape(-1)
    dtype = np.uint32 if path.suffix in (".u32", ".uint32") or ".u32." in path.name else np.uint16
    return np.memmap(path, dtype=dtype, mode="r")


def batch_for_step(source: TokenSource, step: int, local_batch: int, dp_rank: int, dp: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for this dp rank: local_batch x seq_len each (full sequence)."""
    first = step * local_batch * dp + dp_rank * local_batch
    rows = torch.stack([source.sample(first + i) for i in range(local_batch)])
    return rows[:, :-1], rows[:, 1:]
