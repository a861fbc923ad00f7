"""Cost-model facts the seeded-bug run (benchmarks/seeded_bugs.py) showed untested.

Each test pins a number derived by hand in the test (or measured from PyTorch itself),
never one read back from the code under test:

- attention backward = 2.5 x forward FLOPs: FlashAttention-2's backward runs 5 matmuls
  (recompute S = Q K^T, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q) where the
  forward runs 2 (S = Q K^T, O = P V); Dao 2023, arXiv:2307.08691, section 3.1.
- full activation checkpointing re-runs the whole block forward, attention included.
- single-tensor AdamW (torch 2.13, ``foreach=False``) allocates temporaries of the
  parameter's shard; the model charges 3 fp32 copies of the largest shard.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.flops import layer_forward_flops, step_forward_backward_flops
from cost_models.memory import memory_terms
from cost_models.specs import MODEL_PRESETS, ClusterSpec, resolve_gpu
from cost_models.step import attention_backend_for, attention_keys_per_call, attention_rate_per_s, layer_time

L8B = MODEL_PRESETS["llama3-8b"]
H100 = resolve_gpu("h100")
RUNTIME = resolve_executor("autoplan")


def _cfg(seq=8192, dp_shard=8, tp=1, ac="none"):
    return TrainConfig(Parallelism(dp_shard=dp_shard, tp=tp), seq_len=seq, ac=ACPolicy.uniform(ac, L8B.n_layers))


# ----------------------------------------------------------------------------- attention


def test_attention_backward_is_two_and_a_half_forwards():
    seq = tokens = 8192
    # Forward, one layer, causal (half the keys per query): QK^T and PV, 2 FLOPs per MAC,
    # q_dim = 32 heads x 128 = 4096.
    forward = 2 * 2 * tokens * (seq / 2) * 4096
    assert forward == 2.0**39
    backward = 5 / 2 * forward  # 5 matmuls against 2
    fb = step_forward_backward_flops(L8B, tokens, seq, cp=1, tp=1)
    assert fb["attention"] == pytest.approx(32 * (forward + backward), rel=1e-12)
    assert fb["attention"] == pytest.approx(32 * 3.5 * 2.0**39, rel=1e-12)
    # The step time charges the same 2.5x at the backward kernel's own rate.
    cfg = _cfg(seq)
    backend = attention_backend_for(cfg, RUNTIME, L8B)
    keys = attention_keys_per_call(cfg)
    lt = layer_time(L8B, ClusterSpec(H100, 8), cfg, RUNTIME)
    expected = forward / attention_rate_per_s(H100, backend, False, keys) \
        + 2.5 * forward / attention_rate_per_s(H100, backend, True, keys)
    assert lt.attention_s == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- recompute


@pytest.mark.parametrize("seq", [8192, 65536])
def test_full_recompute_reruns_the_whole_forward_attention_included(seq):
    cfg = _cfg(seq, ac="full")
    lt = layer_time(L8B, ClusterSpec(H100, 8), cfg, RUNTIME)
    # Full AC saves only the block input, so backward first re-runs the whole forward.
    assert lt.recompute_s["full"] == pytest.approx(lt.forward_s, rel=1e-12)
    # ...and that forward holds the attention kernel: its FLOPs by hand at its own rate.
    attention_flops = 2 * 2 * seq * (seq / 2) * 4096
    assert layer_forward_flops(L8B, seq, seq, 1, 1).attention == attention_flops
    backend = attention_backend_for(cfg, RUNTIME, L8B)
    attention_s = attention_flops / attention_rate_per_s(H100, backend, False, attention_keys_per_call(cfg))
    # At 64k tokens attention is most of the forward; full recompute pays all of it.
    assert lt.recompute_s["full"] >= attention_s
    assert lt.recompute_s["full"] - lt.recompute_s["selective"] >= attention_s * (1 - 1e-9)


# ----------------------------------------------------------------------------- AdamW


class _PeakTemporaries(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and still alive (plain tensors)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.alive:
                continue  # in-place or a view: no new memory
            self.alive.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.alive.discard(key)
        self.live -= nbytes


def _measured_adamw_temporaries(numel: int) -> int:
    """Peak temporaries of torch's single-tensor AdamW step, in copies of the parameter."""
    param = torch.nn.Parameter(torch.randn(numel))
    optimizer = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.1, foreach=False)
    for _ in range(2):  # the first step allocates the states: measure the second
        param.grad = torch.randn(numel)
        mode = _PeakTemporaries()
        with mode:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return mode.peak // (4 * numel)


def test_adamw_temporaries_by_hand_and_measured():
    measured = _measured_adamw_temporaries(4096)
    assert measured == 2, measured  # sqrt(v) and sqrt(v) / bias correction, both alive at once
    for tp, dp_shard in ((1, 8), (2, 4)):
        terms = memory_terms(L8B, _cfg(dp_shard=dp_shard, tp=tp, ac="full"), RUNTIME)
        # Largest shard: the output projection, 128256 x 4096, split over tp and FSDP.
        shard = 128256 * 4096 / tp / dp_shard
        assert terms.optimizer_temp_bytes == pytest.approx(3 * 4 * shard, rel=1e-12)
        # Never fewer than what a plain tensor's step was measured to allocate (DTensor
        # shards add the update's copy on top).
        assert terms.optimizer_temp_bytes >= measured * 4 * shard


# ----------------------------------------------------------------------------- search


def test_batch_cap_counts_tokens_per_gpu_after_cp():
    """Local batches above 1 are searched while a micro-batch holds at most 32k tokens
    per GPU, and a GPU holds seq / cp tokens of each sequence: at 64k, cp=4 allows b=2."""
    from autoplan.search import build_search_space

    seq = 64 * 1024
    space = build_search_space(L8B, H100, [16], [seq], 8)
    batches: dict[int, set[int]] = {}
    for c in space.candidates:
        batches.setdefault(c.parallelism.cp, set()).add(c.local_batch_size)
    # b x 64k / cp <= 32k, by hand, for every CP degree the 16 GPUs allow.
    assert batches == {1: {1}, 2: {1}, 4: {1, 2}, 8: {1, 2, 4}, 16: {1, 2, 4, 8}}
