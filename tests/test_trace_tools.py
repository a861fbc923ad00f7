"""Why runtime/trace.py leaves the optimizer step out of the traced window: PyTorch's
MemTracker sizes AdamW's temporaries of a DTensor parameter at the global shape."""

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore


def _optimizer_peak(make) -> float:
    with FakeTensorMode(allow_non_fake_inputs=True):
        param = torch.nn.Parameter(make())
        optimizer = torch.optim.AdamW([param], foreach=False)
        tracker = MemTracker()
        tracker.track_external(optimizer)
        with tracker:
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
