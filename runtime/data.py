"""Token streams: deterministic synthetic tokens, or a memory-mapped file of token ids.

A file is read in order and wraps around at its end; it must hold at least one step.
A raw file's dtype is never guessed from its name: it comes from a sidecar
``PATH.json`` (``{"dtype": "uint16"}``) or ``--data-dtype``; ``.npy`` carries its own.
Each step draws ``global_batch = local_batch x dp`` sequences of ``seq_len + 1`` tokens;
data-parallel rank ``i`` takes rows ``[i b, (i+1) b)``. Labels are the inputs shifted by
one, cut from the full sequence BEFORE context parallel shards it, so every CP rank's
labels line up with its (head, tail) chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    pass


class TokenSource:
    """Sequences of ``seq_len + 1`` tokens, indexed by a global sample number."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, path: str | None = None,
                 sequences_per_step: int = 1, dtype: str | None = None):
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.tokens = None
        if path is not None:
            self.tokens = _open_tokens(Path(path), dtype)
            needed = sequences_per_step * (seq_len + 1)
            if len(self.tokens) < needed:
                raise DataError(f"--data {path}: {len(self.tokens)} tokens, fewer than one step needs "
                                f"({sequences_per_step} sequences of seq_len + 1 = {seq_len + 1}: {needed} tokens)")
            top = int(self.tokens.max()) if len(self.tokens) else 0
            if top >= vocab_size:
                raise DataError(f"--data {path}: max token id {top} >= the model's vocab_size {vocab_size} "
                                f"(wrong --data-dtype, or data tokenized for another model)")
            low = int(self.tokens.min())
            if low < 0:
                raise DataError(f"--data {path}: negative token id {low} (wrong --data-dtype?)")

    @property
    def num_sequences(self) -> int | None:
        return None if self.tokens is None else len(self.tokens) // (self.seq_len + 1)

    def sample(self, index: int) -> torch.Tensor:
        if self.tokens is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=generator)
        index %= self.num_sequences
        start = index * (self.seq_len + 1)
        # A copy: a memmapped int64 slice would otherwise be a read-only view torch warns about.
        return torch.from_numpy(np.array(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))


TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def token_dtype(path: Path, given: str | None = None) -> np.dtype:
    """The dtype of a raw token file: its sidecar's, else ``given``; they must agree."""
    side = sidecar(path)
    declared = None
    if side.exists():
        try:
            declared = json.loads(side.read_text())["dtype"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"--data {path}: sidecar {side} is not JSON with a \"dtype\" key") from None
    if declared is not None and given is not None and declared != given:
        raise DataError(f"--data {path}: --data-dtype {given} contradicts {side} (dtype {declared})")
    name = declared or given
    if name is None:
        raise DataError(f"--data {path}: dtype unknown; pass --data-dtype ({'|'.join(TOKEN_DTYPES)}) or write "
                        f"{side} with {{\"dtype\": \"uint16\"}}")
    if name not in TOKEN_DTYPES:
        raise DataError(f"--data {path}: dtype {name!r}: use one of {', '.join(TOKEN_DTYPES)}")
    return np.dtype(name)


def _open_tokens(path: Path, dtype: str | None = None):
    if not path.is_file():
        raise DataError(f"--data {path}: file not found")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r").reshape(-1)
        except (OSError, ValueError) as error:
            raise DataError(f"--data {path}: not a readable .npy file ({str(error).splitlines()[0]})") from None
    kind = token_dtype(path, dtype)
    size = path.stat().st_size
    if size % kind.itemsize:
        raise DataError(f"--data {path}: {size} bytes is not a whole number of {kind.name} tokens "
                        f"({kind.itemsize} bytes each): truncated, or another dtype")
    if size == 0:
        raise DataError(f"--data {path}: empty file")
    return np.memmap(path, dtype=kind, mode="r")


def batch_for_step(source: TokenSource, step: int, local_batch: int, dp_rank: int, dp: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for this dp rank: local_batch x seq_len each (full sequence)."""
    first = step * local_batch * dp + dp_rank * local_batch
    rows = torch.stack([source.sample(first + i) for i in range(local_batch)])
    return rows[:, :-1], rows[:, 1:]
