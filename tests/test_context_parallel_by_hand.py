"""runtime.context_parallel pieces by hand: the key blocks each query chunk attends, the
output buffers' layout and dtypes, the CUDA (lower-right mask) form run on CPU against
fp64 full causal attention, and AllGatherKVAttention end to end with a stand-in
all-gather that hands every rank the other ranks' shards."""

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from runtime import context_parallel as CP


def _reference(q, k, v):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          is_causal=True)


def _qkv(seed, batch=2, heads=4, kv_heads=2, seq=12, dim=8, dtype=torch.float64):
    torch.manual_seed(seed)
    return (torch.randn(batch, heads, seq, dim, dtype=dtype), torch.randn(batch, kv_heads, seq, dim, dtype=dtype),
            torch.randn(batch, kv_heads, seq, dim, dtype=dtype))


def test_blocks_are_the_strict_prefix_then_the_causal_diagonal():
    assert CP._blocks(0, 4) == [(0, 4, True)]  # chunk 0 has no prefix: no empty block
    assert CP._blocks(1, 4) == [(0, 4, False), (4, 8, True)]
    assert CP._blocks(3, 5) == [(0, 15, False), (15, 20, True)]


def test_head_tail_order_and_reorder_by_hand():
    assert [CP.head_tail_chunks(r, 3) for r in range(3)] == [(0, 5), (1, 4), (2, 3)]
    assert CP.gathered_order(3) == [0, 5, 1, 4, 2, 3]
    assert CP.gathered_order(1) == [0, 1]
    x = torch.arange(8).view(1, 8)
    assert CP.shard_sequence(x, 1, 2).tolist() == [[2, 3, 4, 5]]  # default dim 1: chunks 1 and 2
    gathered = torch.tensor([0, 3, 1, 2]).view(1, 1, 4, 1) * 10  # rank-major chunks of 1 token, cp=2
    assert CP.reorder_gathered(gathered, 2).flatten().tolist() == [0, 10, 20, 30]  # default dim 2


@pytest.mark.parametrize("dtype, lse_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32)])
def test_output_buffers_layout_and_dtypes(dtype, lse_dtype):
    q, k, v = _qkv(0, batch=2, heads=3, kv_heads=1, seq=16, dim=4, dtype=dtype)
    q = CP.shard_sequence(q, 0, 2, dim=2)  # cp=2, rank 0: chunks 0 and 3 of 4 tokens each
    out, lse = CP.cp_attention(q, k, v, [0, 3])
    assert out.shape == (2, 3, 8, 4) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # laid out B x T x H x hd: wo's input is a view
    assert lse.shape == (2, 3, 8) and lse.dtype == lse_dtype
    fake_out, fake_lse = CP._cp_attention_empty(q)
    assert fake_out.stride() == out.stride() and fake_lse.dtype == lse_dtype and fake_lse.shape == (2, 3, 8)


def test_log_sum_exp_is_that_of_the_whole_causal_row():
    q, k, v = _qkv(1, heads=2, kv_heads=1, seq=16, dim=4)
    _, lse = CP.cp_attention(q[:, :, 4:12], k, v, [1, 2])  # cp=2, rank 1: query chunks 1 and 2 of 4 tokens
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 2.0  # 1/sqrt(hd)
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(scores, -1)[:, :, 4:12], atol=1e-12)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_lower_right_form_equals_full_causal_attention(cp):
    q, k, v = _qkv(cp, heads=4, kv_heads=2, seq=6 * cp)
    reference = _reference(q, k, v)
    for rank in range(cp):
        local = CP.shard_sequence(q, rank, cp, dim=2)
        out = CP.chunked_attention_lower_right(local, k, v, CP.head_tail_chunks(rank, cp))
        assert out.shape == local.shape
        assert (out - CP.shard_sequence(reference, rank, cp, dim=2)).abs().max() < 1e-12
    q4, k4, v4 = _qkv(7, heads=2, kv_heads=2, seq=8)  # equal heads: no GQA
    out = CP.chunked_attention_lower_right(CP.shard_sequence(q4, 0, 2, dim=2), k4, v4, (0, 3))
    assert (out - CP.shard_sequence(_reference(q4, k4, v4), 0, 2, dim=2)).abs().max() < 1e-12


@pytest.mark.parametrize("cp, seq", [(1, 4), (2, 4)])
def test_lower_right_form_gqa_when_sizes_coincide(cp, seq):
    # 4 query heads on 2 K/V heads where the sequence (4) equals the query heads, and
    # where the local tokens (2) equal the K/V heads: GQA must follow the head counts.
    q, k, v = _qkv(11, heads=4, kv_heads=2, seq=seq)
    reference = _reference(q, k, v)
    for rank in range(cp):
        out = CP.chunked_attention_lower_right(CP.shard_sequence(q, rank, cp, dim=2), k, v, CP.head_tail_chunks(rank, cp))
        assert (out - CP.shard_sequence(reference, rank, cp, dim=2)).abs().max() < 1e-12


def test_output_buffers_are_on_the_inputs_device():
    # the fake (meta) form traces shapes: its buffers must stay on the query's device
    out, lse = CP._cp_attention_empty(torch.empty(2, 3, 8, 4, device="meta"))
    assert out.device.type == "meta" and lse.device.type == "meta"


class _Mesh:
    group = object()

    def get_group(self):
        return self.group


def test_allgather_kv_attention_end_to_end_with_a_stand_in_gather(monkeypatch):
    cp = 3
    q, k, v = _qkv(5, heads=4, kv_heads=2, seq=6 * cp)
    reference = _reference(q, k, v)
    calls = []

    def all_gather(x, gather_dim, group):  # every rank's shard of the tensor x is a shard of
        calls.append((gather_dim, group, x.is_contiguous()))
        full = next(t for t in (k, v) if any(torch.equal(x, CP.shard_sequence(t, r, cp, dim=2)) for r in range(cp)))
        return torch.cat([CP.shard_sequence(full, r, cp, dim=2) for r in range(cp)], dim=gather_dim)
    monkeypatch.setattr(funcol, "all_gather_single_autograd", all_gather)

    def not_on_cpu(*args):
        raise AssertionError("the CUDA form ran on CPU tensors")
    monkeypatch.setattr(CP, "chunked_attention_lower_right", not_on_cpu)
    for rank in range(cp):
        attention = CP.AllGatherKVAttention(_Mesh(), rank, cp)
        # K/V arrive transposed (B x S x H x hd memory): the gather must get contiguous input
        local = [CP.shard_sequence(t, rank, cp, dim=2).transpose(1, 2).contiguous().transpose(1, 2)
                 for t in (q, k, v)]
        out = attention(*local)
        assert (out - CP.shard_sequence(reference, rank, cp, dim=2)).abs().max() < 1e-12
    assert calls == [(2, _Mesh.group, True)] * (2 * cp)


class _LooksCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def test_allgather_kv_attention_takes_the_lower_right_form_on_cuda(monkeypatch):
    cp, rank = 2, 1
    q, k, v = _qkv(6, heads=4, kv_heads=2, seq=4 * cp)
    monkeypatch.setattr(funcol, "all_gather_single_autograd", lambda x, gather_dim, group: torch.cat(
        [CP.shard_sequence(t, r, cp, dim=2) for t in (k, v) if any(
            torch.equal(x, CP.shard_sequence(t, s, cp, dim=2)) for s in range(cp)) for r in range(cp)], dim=gather_dim))
    seen = []
    lower_right = CP.chunked_attention_lower_right

    def spy(*args):
        seen.append(args[3])
        return lower_right(*(a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in args))
    monkeypatch.setattr(CP, "chunked_attention_lower_right", spy)
    local = [CP.shard_sequence(t, rank, cp, dim=2) for t in (q, k, v)]
    out = CP.AllGatherKVAttention(_Mesh(), rank, cp)(local[0].as_subclass(_LooksCuda), local[1], local[2])
    assert seen == [(1, 2)]
    assert (out - CP.shard_sequence(_reference(q, k, v), rank, cp, dim=2)).abs().max() < 1e-12
