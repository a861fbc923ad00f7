"""Sizes on the command line: sequence lengths, token budgets, and their printing.

Two conventions, each the one its quantity is quoted in:

- Sequence lengths (``--target-seqlen``, ``--fix seq_len``) and batch token counts
  (``--global-batch-tokens``) are binary: k = 1024, M = 1024^2, G = 1024^3, so
  ``128k`` = 131072 and ``4M`` = 4194304. Batch tokens share the convention so that a
  batch is a whole number of sequences (4M = 512 sequences of 8k, 16 of 256k).
- Training budgets (``--train-tokens``) are decimal: k = 10^3, M = 10^6, B = G = 10^9,
  T = 10^12, as in "15T tokens" (Llama 3 was trained on 15.6e12 tokens).

A number may carry a fraction when the result is whole (``1.5k`` = 1536) and digit
groups may use underscores (``262_144``). Bad input raises ``UsageError`` with a one-line
message that names the flag.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UsageError

BINARY = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]?)\s*$")


def _parse(text: object, scale: dict[str, int], flag: str, example: str) -> int:
    if isinstance(text, bool):  # bool is an int; a flag value is never a bool
        raise UsageError(f"{flag} {text!r}: expected a size like {example}")
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"{flag} {text!r}: must be a positive whole number of tokens")
        return text
    match = _PATTERN.match(str(text).replace("_", ""))
    suffix = match.group(2).lower() if match else ""
    if not match or suffix not in scale:
        raise UsageError(f"{flag} {text!r}: expected a size like {example}")
    number = match.group(1)
    whole, _, fraction = number.partition(".")
    # Exact arithmetic: '1.5k' = 15 * 1024 / 10, no float rounding at large sizes.
    numerator = int(whole + fraction) * scale[suffix]
    denominator = 10 ** len(fraction)
    if numerator % denominator or numerator == 0:
        raise UsageError(f"{flag} {text!r}: must be a positive whole number of tokens")
    return numerator // denominator


def parse_seq_len(text: str | int, flag: str = "--target-seqlen") -> int:
    """Binary multiples: '256k' -> 262144, '128K' -> 131072, '1M' -> 1048576, '262144' -> 262144."""
    return _parse(text, BINARY, flag, "256k, 1M or 262144")


def parse_batch_tokens(text: str | int, flag: str = "--global-batch-tokens") -> int:
    """Binary multiples, like sequence lengths: '4M' -> 4194304, '512k' -> 524288."""
    return _parse(text, BINARY, flag, "4M, 512k or 4194304")


def parse_train_tokens(text: str | int, flag: str = "--train-tokens") -> int:
    """Decimal multiples: '1T' -> 10**12, '15T' -> 1.5e13, '300B' -> 3e11, '2.5M' -> 2500000."""
    return _parse(text, DECIMAL, flag, "1T, 300B or 1000000000")


def format_tokens(count: int) -> str:
    """The binary form parse_seq_len reads back: 262144 -> '256k', 1048576 -> '1M'.

    Counts that are not a whole number of k (1024) print as plain digits: 1000 -> '1000'.
    """
    count = int(count)
    for unit, size in (("G", 1024**3), ("M", 1024**2), ("k", 1024)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


def format_bytes_gib(count: float, digits: int = 1) -> str:
    """Bytes as GiB (2^30), the unit nvidia-smi's MiB adds up to: 85899345920 -> '80.0 GiB'."""
    return f"{count / 1024**3:.{digits}f} GiB"


def format_duration(seconds: float) -> str:
    """Seconds in the largest sensible unit: '3.2 s', '12.0 min', '4.1 h', '12.5 days'."""
    if not math.isfinite(seconds):
        return "forever" if seconds > 0 else str(seconds)
    if 0 < seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


@dataclass(frozen=True)
class MemoryHeadroom:
    """Memory a plan leaves free on every GPU: a fraction of capacity, or bytes."""

    fraction: float = 0.0
    fixed_bytes: float = 0.0

    def bytes_of(self, capacity_bytes: float) -> float:
        return self.fraction * capacity_bytes + self.fixed_bytes

    def __str__(self) -> str:
        if self.fixed_bytes:
            return format_bytes_gib(self.fixed_bytes)
        return f"{self.fraction * 100:g}%"


def parse_memory_headroom(text: str, flag: str = "--memory-headroom") -> MemoryHeadroom:
    """'5%' -> 5% of each GPU's memory; '4GiB', '4G', '512MiB' -> bytes (binary units); '0' -> none."""
    raw = str(text).strip()
    value = raw.lower().replace(" ", "")
    try:
        if value.endswith("%"):
            fraction = float(value[:-1]) / 100
            if not math.isfinite(fraction) or not 0 <= fraction < 0.9:
                raise ValueError
            return MemoryHeadroom(fraction=fraction)
        for suffix, scale in (("gib", 1024**3), ("gb", 1024**3), ("g", 1024**3), ("mib", 1024**2), ("mb", 1024**2),
                              ("m", 1024**2)):
            if value.endswith(suffix):
                amount = float(value[:-len(suffix)]) * scale
                break
        else:
            amount = float(value)
            if amount != 0:
                raise ValueError
        if not math.isfinite(amount) or amount < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"{flag} {raw!r}: expected a share of GPU memory such as 5% (below 90%) "
                         "or an amount such as 4GiB or 512MiB") from None
    return MemoryHeadroom(fixed_bytes=amount)
