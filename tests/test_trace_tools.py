"""What PyTorch's memory tracker gets wrong under fake tensors, and runtime/trace.py's fix.

DTensor's sharding propagation runs each new op signature on GLOBAL-shape fake tensors;
under a fake-tensor trace it reuses the trace's own fake mode, so a tracker counts them.
On a GPU they live in a separate fake mode and take no memory."""

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from runtime.trace import propagation_blind, sharding_propagation_untracked


def _optimizer_peak(make, tracker_class=MemTracker) -> float:
    with FakeTensorMode(allow_non_fake_inputs=True):
        param = torch.nn.Parameter(make())
        optimizer = torch.optim.AdamW([param], foreach=False)
        tracker = tracker_class()
        tracker.track_external(optimizer)
        with sharding_propagation_untracked(), tracker:
            for step in range(2):
                param.grad = make()
                optimizer.step()
                optimizer.zero_grad()
                if step == 0:
                    tracker.reset_mod_stats()
        return float(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"])


def test_memtracker_oversizes_dtensor_optimizer_temporaries():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        mesh = init_device_mesh("cpu", (8,))
        plain = _optimizer_peak(lambda: torch.empty(128, 1024))  # the local shard's size
        sharded = _optimizer_peak(lambda: distribute_tensor(torch.empty(1024, 1024), mesh, [Shard(0)]))
    finally:
        dist.destroy_process_group()
    # Same local bytes; a correct tracker would report about the same peak. If this ever
    # fails, the tracker was fixed: put the optimizer step back in the traced window.
    assert sharded > 3 * plain


def _log_softmax_peak(tracker_class, local_shape) -> float:
    """Peak of a vocab-sharded log-softmax (TP's loss_parallel), one rank of 8."""
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (8,))
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = DTensor.from_local(torch.empty(local_shape), mesh, [Shard(1)])
        tracker = tracker_class()
        with sharding_propagation_untracked(), tracker, loss_parallel():
            torch.log_softmax(logits, dim=-1)
        return float(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"])


def test_propagation_blind_tracker_counts_local_shards_only():
    """loss_parallel's log-softmax works on the rank's [rows, vocab/8] shard; sharding
    propagation runs it once on the global [rows, vocab] shape. No tensor of the global
    size exists on a GPU: the blind tracker's peak stays a few local shards, PyTorch's
    own tracker counts at least one global tensor."""
    rows, local_vocab = 512, 1000
    local_bytes = rows * local_vocab * 4
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        # Propagation runs once per op signature and is then cached: one shape per tracker.
        counted = _log_softmax_peak(MemTracker, (rows, local_vocab))
        blind = _log_softmax_peak(propagation_blind(MemTracker), (rows, local_vocab + 8))
    finally:
        dist.destroy_process_group()
    assert counted >= 8 * local_bytes
    assert blind <= 4 * rows * (local_vocab + 8) * 4
