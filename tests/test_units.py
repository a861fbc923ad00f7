"""Size parsing and printing, against hand-written values."""

import pytest

from autoplan.errors import UsageError
from autoplan.units import (
    format_bytes_gib,
    format_duration,
    format_tokens,
    parse_batch_tokens,
    parse_seq_len,
    parse_train_tokens,
)


@pytest.mark.parametrize("text, expected", [
    ("256k", 262144), ("256K", 262144), ("128K", 131072), ("1M", 1048576), ("1m", 1048576),
    ("262144", 262144), (" 64k ", 65536), ("8 k", 8192), ("1.5k", 1536), ("262_144", 262144),
    ("2G", 2147483648), ("4096", 4096), (8192, 8192),
])
def test_seq_len_is_binary(text, expected):
    assert parse_seq_len(text) == expected


@pytest.mark.parametrize("text, expected", [("4M", 4194304), ("512k", 524288), ("2M", 2097152),
                                            ("1000", 1000)])
def test_batch_tokens_are_binary(text, expected):
    assert parse_batch_tokens(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1T", 10**12), ("15T", 15 * 10**12), ("15.6T", 15_600_000_000_000), ("300B", 300 * 10**9),
    ("1b", 10**9), ("2G", 2 * 10**9), ("2.5M", 2_500_000), ("1k", 1000), ("123", 123),
])
def test_train_tokens_are_decimal(text, expected):
    assert parse_train_tokens(text) == expected


@pytest.mark.parametrize("bad", ["abc", "", "-5", "0", "0k", "1.5", "0.1M", "12q", "1e6", "256kb", "k", "1..5k",
                                 "1T", True, -3, 0])
def test_bad_seq_len_names_the_flag_in_one_line(bad):
    with pytest.raises(UsageError) as info:
        parse_seq_len(bad)
    message = str(info.value)
    assert message.startswith("--target-seqlen ") and "\n" not in message


def test_messages_say_what_is_expected():
    with pytest.raises(UsageError, match=r"^--target-seqlen 'abc': expected a size like 256k, 1M or 262144$"):
        parse_seq_len("abc")
    with pytest.raises(UsageError, match=r"^--global-batch-tokens '4X': expected a size like 4M"):
        parse_batch_tokens("4X")
    with pytest.raises(UsageError, match=r"^--train-tokens '1Q': expected a size like 1T"):
        parse_train_tokens("1Q")
    with pytest.raises(UsageError, match=r"^--fix seq_len '1.5': must be a positive whole number"):
        parse_seq_len("1.5", flag="--fix seq_len")
    # 'B' is a decimal-only suffix: a sequence length of '1B' is rejected, not misread.
    with pytest.raises(UsageError, match="--target-seqlen"):
        parse_seq_len("1B")


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


@pytest.mark.parametrize("count, text", [
    (262144, "256k"), (1048576, "1M"), (131072, "128k"), (1000, "1000"), (1536, "1536"), (1024, "1k"),
    (3 * 1048576, "3M"), (1073741824, "1G"), (1, "1"),
])
def test_format_tokens(count, text):
    assert format_tokens(count) == text


@pytest.mark.parametrize("count", [1, 1024, 4096, 65536, 262144, 1048576, 3 * 2**20, 5 * 2**30, 1000, 12345])
def test_format_tokens_round_trips(count):
    assert parse_seq_len(format_tokens(count)) == count


def test_format_bytes_gib():
    assert format_bytes_gib(80 * 2**30) == "80.0 GiB"
    assert format_bytes_gib(81559 * 2**20) == "79.6 GiB"
    assert format_bytes_gib(3 * 2**29, digits=2) == "1.50 GiB"


@pytest.mark.parametrize("seconds, text", [
    (3.2, "3.2 s"), (0.25, "250 ms"), (59.94, "59.9 s"), (90, "1.5 min"), (3600 * 4.1, "4.1 h"),
    (86400 * 12.5, "12.5 days"), (0, "0.0 s"), (float("inf"), "forever"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
