"""Token files and batches, in process, against values written by hand: which tokens each
step and data-parallel rank reads, wrap-around, the dtype rules and their one-line errors.
(The end-to-end runs in test_runtime_inputs.py go through torchrun subprocesses, which
mutation testing cannot see.)"""

import json

import numpy as np
import pytest
import torch

from runtime.data import DataError, TokenSource, batch_for_step, sidecar, token_dtype


def _tokens(tmp_path, values, dtype="uint16", name="t.bin", side=True):
    path = tmp_path / name
    np.asarray(values, dtype=dtype).tofile(path)
    if side:
        sidecar(path).write_text(json.dumps({"dtype": dtype}))
    return path


def test_sequences_wrap_and_split_across_data_parallel_ranks(tmp_path):
    path = _tokens(tmp_path, range(20))  # 5 sequences of seq_len + 1 = 4 tokens
    source = TokenSource(vocab_size=32, seq_len=3, path=str(path), sequences_per_step=2)
    assert source.num_sequences == 5
    assert source.sample(0).tolist() == [0, 1, 2, 3]
    assert source.sample(4).tolist() == [16, 17, 18, 19]
    assert source.sample(6).tolist() == [4, 5, 6, 7]  # wraps: 6 % 5 = 1
    assert source.sample(1).dtype == torch.int64
    # step 1, 2 sequences per rank, rank 1 of 2: global samples 1*2*2 + 1*2 = 6 and 7.
    inputs, labels = batch_for_step(source, step=1, local_batch=2, dp_rank=1, dp=2)
    assert inputs.tolist() == [[4, 5, 6], [8, 9, 10]]
    assert labels.tolist() == [[5, 6, 7], [9, 10, 11]]


def test_synthetic_tokens_are_seeded_by_sample_and_bounded():
    a, b = TokenSource(vocab_size=7, seq_len=50, seed=3), TokenSource(vocab_size=7, seq_len=50, seed=3)
    assert a.num_sequences is None and a.tokens is None
    assert torch.equal(a.sample(5), b.sample(5)) and not torch.equal(a.sample(5), a.sample(6))
    assert not torch.equal(a.sample(5), TokenSource(vocab_size=7, seq_len=50, seed=4).sample(5))
    assert a.sample(0).shape == (51,) and int(a.sample(0).max()) < 7 and int(a.sample(0).min()) >= 0


def test_dtype_from_sidecar_flag_or_neither(tmp_path):
    path = _tokens(tmp_path, range(8), dtype="int32", side=False)
    with pytest.raises(DataError, match=r"dtype unknown; pass --data-dtype \(uint8\|uint16\|uint32\|int32\|int64\)"):
        token_dtype(path)
    assert token_dtype(path, "int32") == np.dtype("int32")
    sidecar(path).write_text('{"dtype": "int32"}')
    assert token_dtype(path) == np.dtype("int32") and token_dtype(path, "int32") == np.dtype("int32")
    with pytest.raises(DataError, match="--data-dtype uint16 contradicts"):
        token_dtype(path, "uint16")
    sidecar(path).write_text('{"dtype": "float32"}')
    with pytest.raises(DataError, match="dtype 'float32': use one of"):
        token_dtype(path)
    sidecar(path).write_text('{"kind": "int32"}')
    with pytest.raises(DataError, match='is not JSON with a "dtype" key'):
        token_dtype(path)
    assert sidecar(path).name == "t.bin.json"


def test_file_checks_are_one_line(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        TokenSource(8, 3, path=str(tmp_path / "missing.bin"))
    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    sidecar(empty).write_text('{"dtype": "uint16"}')
    with pytest.raises(DataError, match="empty file"):
        TokenSource(8, 3, path=str(empty))
    odd = tmp_path / "o.bin"
    odd.write_bytes(b"\x01\x00\x02")
    sidecar(odd).write_text('{"dtype": "uint16"}')
    with pytest.raises(DataError, match="3 bytes is not a whole number of uint16 tokens"):
        TokenSource(8, 3, path=str(odd))
    short = _tokens(tmp_path, range(7), name="s.bin")
    with pytest.raises(DataError, match=r"7 tokens, fewer than one step needs \(2 sequences of seq_len \+ 1 = 4: 8"):
        TokenSource(8, 3, path=str(short), sequences_per_step=2)
    TokenSource(8, 3, path=str(_tokens(tmp_path, range(8), name="ok.bin")), sequences_per_step=2)  # exactly one step
    high = _tokens(tmp_path, [0, 1, 2, 9], name="h.bin")
    with pytest.raises(DataError, match="max token id 9 >= the model's vocab_size 9"):
        TokenSource(9, 3, path=str(high))
    TokenSource(10, 3, path=str(high))  # 9 < 10 fits
    low = _tokens(tmp_path, [0, -1, 2, 3], dtype="int32", name="l.bin")
    with pytest.raises(DataError, match="negative token id -1"):
        TokenSource(10, 3, path=str(low))


def test_npy_files_carry_their_dtype(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(12, dtype=np.int64).reshape(3, 4))
    source = TokenSource(vocab_size=16, seq_len=3, path=str(path))
    assert source.num_sequences == 3 and source.sample(2).tolist() == [8, 9, 10, 11]
    bad = tmp_path / "b.npy"
    bad.write_bytes(b"not numpy")
    # numpy's reason (the file lacks the .npy magic, so numpy takes it for a pickle)
    with pytest.raises(DataError, match=r"not a readable .npy file \(.*pickled \(object\) data"):
        TokenSource(16, 3, path=str(bad))


def test_token_files_are_mapped_read_only(tmp_path):
    # The file is memory-mapped (not read into memory) and never written through.
    npy = tmp_path / "t.npy"
    np.save(npy, np.arange(8, dtype=np.int32))
    for path in (npy, _tokens(tmp_path, range(8))):
        tokens = TokenSource(vocab_size=16, seq_len=3, path=str(path)).tokens
        assert isinstance(tokens, np.memmap) and not tokens.flags.writeable


def test_unknown_dtype_error_lists_the_choices(tmp_path):
    path = _tokens(tmp_path, range(8), side=False)
    with pytest.raises(DataError, match=r"dtype 'float16': use one of uint8, uint16, uint32, int32, int64$"):
        token_dtype(path, "float16")


def test_synthetic_stream_is_pinned():
    # Sample i of seed s is torch.randint(0, vocab, (seq_len + 1,)) drawn from a generator
    # seeded s * 1_000_003 + i (a resumed run must see the same tokens). Seed defaults to 0.
    def drawn(seed, vocab, length):
        return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(TokenSource(vocab_size=5, seq_len=40).sample(3), drawn(3, 5, 41))
    assert torch.equal(TokenSource(vocab_size=5, seq_len=40, seed=2).sample(7), drawn(2_000_013, 5, 41))
    assert 0 in TokenSource(vocab_size=2, seq_len=63).sample(0).tolist()  # 0 is a token id too
