"""Sizes on the command line: sequence lengths, token budgets, and their printing.

Sequence lengths and batch token counts use binary multiples (k = 1024, M = 1024^2),
as sequence lengths are quoted in practice (128k = 131072). Training budgets
(``--train-tokens 1T``) are decimal (T = 10^12), as token budgets are quoted.
"""

from __future__ import annotations

import re

from .errors import UsageError

_BINARY = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]?)\s*$")


def _parse(text: str, scale: dict[str, int], flag: str, example: str) -> int:
    match = _PATTERN.match(str(text))
    suffix = match.group(2).lower() if match else ""
    if not match or suffix not in scale:
        raise UsageError(f"{flag} {text!r}: expected a size like {example}")
    value = float(match.group(1)) * scale[suffix]
    if value != int(value) or value <= 0:
        raise UsageError(f"{flag} {text!r}: must be a positive whole number of tokens")
    return int(value)


def parse_seq_len(text: str, flag: str = "--target-seqlen") -> int:
    """'256k' -> 262144, '1M' -> 1048576, '262144' -> 262144."""
    return _parse(text, _BINARY, flag, "256k, 1M or 262144")


def parse_batch_tokens(text: str, flag: str = "--global-batch-tokens") -> int:
    """'4M' -> 4194304 (binary, like sequence lengths)."""
    return _parse(text, _BINARY, flag, "4M, 512k or 4194304")


def parse_train_tokens(text: str, flag: str = "--train-tokens") -> int:
    """'1T' -> 10^12, '15T' -> 1.5e13, '300B' -> 3e11 (decimal)."""
    return _parse(text, _DECIMAL, flag, "1T, 300B or 1000000000")


def format_tokens(count: int) -> str:
    """262144 -> '256k', 1048576 -> '1M', 1000 -> '1000'."""
    for unit, size in (("M", 1024**2), ("k", 1024)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


def format_bytes_gib(count: float) -> str:
    return f"{count / 1024**3:.1f} GiB"


def format_duration(seconds: float) -> str:
    """Seconds as the largest sensible unit: '3.2 s', '4.1 h', '12.5 days'."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
