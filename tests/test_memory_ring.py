"""Ring-CP attention transients in the memory model against a trace of PyTorch's own ring
code (torch 2.13 ``_templated_ring_attention`` / ``_templated_ring_attention_backward``)
run on CPU under a fake process group, one CP rank's view.

What is traced: the ring loop, rotaters (all-gather and all-to-all), ``_SDPAMerger`` and
fp32 gradient accumulation exactly as torch runs them; the per-step attention op is the
CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its backward)
standing in for CUDA flash, with the same outputs. Not traced: FlashAttention-2's fp32
``dq_accum`` workspace (CUDA only), which the model adds and the comparison removes.
The peak is the largest sum of live storages any op in the call created (inputs excluded),
over every CP rank (the ranks differ: load balancing splits some steps into halves).
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from cost_models.config import Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.memory import ring_attention_bytes
from cost_models.specs import ModelSpec

A = torch.ops.aten


class _PeakTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self.seen: dict[int, weakref.ref] = {}

    def _release(self, nbytes):
        self.current -= nbytes

    def ignore(self, *tensors):
        """Storages that exist before the call (inputs): views of them are not allocations."""
        for t in tensors:
            self.seen[t.untyped_storage()._cdata] = weakref.ref(t.untyped_storage())

    # Functional collectives' wrappers return the collective's output buffer itself on
    # NCCL (the fake process group hands back a fresh tensor): not allocations.
    ALIASING = {"_c10d_functional._wrap_tensor_autograd.default", "_c10d_functional.wait_tensor.default"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in self.ALIASING:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the StorageImpl: views and re-wrapped tensors share it
                ref = self.seen.get(key)
                if ref is not None and ref() is not None:
                    continue
                self.seen[key] = weakref.ref(storage)
                self.current += storage.nbytes()
                weakref.finalize(storage, self._release, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out


def _forward_op(query, key, value, is_causal, **kwargs):
    return A._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal)


def _backward_op(query, key, value, out, logsumexp, is_causal, grad_out, **kwargs):
    return A._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, out, logsumexp,
                                                                   0.0, is_causal)


def _traced_peaks(cp: int, rank: int, method: str, B: int, H: int, T: int, hd: int):
    from torch.distributed.tensor.experimental._context_parallel import _attention as ring
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=cp)
    saved = ring._cp_options.rotate_method
    try:
        ring._cp_options.rotate_method = (ring._RotateMethod.ALL_GATHER if method == "ring-allgather"
                                          else ring._RotateMethod.ALL_TO_ALL)
        group = dist.group.WORLD
        q, k, v = (torch.randn(B, H, T, hd, dtype=torch.bfloat16) for _ in range(3))
        tracker = _PeakTracker()
        tracker.ignore(q, k, v)
        with tracker:
            out, lse, *_ = ring._templated_ring_attention(group, 2, _forward_op, q, k, v, is_causal=True)
        forward = tracker.peak
        out, lse = out.detach().clone(), lse.detach().clone()
        dout = torch.randn_like(out)
        tracker = _PeakTracker()
        tracker.ignore(q, k, v, out, lse, dout)
        with tracker:
            grads = ring._templated_ring_attention_backward(group, 2, _backward_op, dout, "grad_out", q, k, v,
                                                            out, lse, is_causal=True)
        del grads
        backward = tracker.peak
    finally:
        ring._cp_options.rotate_method = saved
        dist.destroy_process_group()
    return forward, backward


@pytest.mark.parametrize("method", ["ring-allgather", "ring-alltoall"])
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_transients_match_a_trace_of_torch_ring_attention(method, cp):
    # K/V at query width (the CPU flash op takes equal head counts): n_kv_heads = n_heads.
    spec = ModelSpec("m", vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=96, rope_theta=1e4)
    seq = 256
    T = seq // cp
    cfg = TrainConfig(Parallelism(cp=cp), seq, cp_impl=method)
    forward_model, backward_model = ring_attention_bytes(spec, cfg, resolve_executor("autoplan"))
    a = 2
    q_el = T * spec.q_dim
    kv_el = T * spec.kv_dim
    inputs_forward = a * (q_el + 2 * kv_el)  # q, k, v exist before the call (modeled as alive)
    flash_dq_accum = 4 * q_el  # CUDA FlashAttention-2 workspace, not in the CPU kernel
    traced = [_traced_peaks(cp, r, method, 1, spec.n_heads, T, spec.head_dim) for r in range(cp)]
    forward_traced = max(f for f, _ in traced)
    backward_traced = max(b for _, b in traced)
    assert forward_model - inputs_forward == pytest.approx(forward_traced, rel=0.03)
    # measured: forward within 1.1%, backward within 0.5% except alltoall at cp=2 (+8.9%:
    # with two ranks the last step's rotation buffers are not all alive at once)
    assert backward_model - flash_dq_accum == pytest.approx(backward_traced, rel=0.10)
