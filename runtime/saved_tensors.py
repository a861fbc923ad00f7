"""Measure what one transformer block keeps alive for backward, per AC mode and layout.

Method: a ``TorchDispatchMode`` records a weak reference to the storage of every tensor
any op creates during the model's forward. After the forward, with only the output held,
the storages still alive are exactly what autograd (or a checkpoint's cache) keeps for
backward. Running the model with ``n`` and ``n + 1`` layers and subtracting gives the
bytes one block adds (its input, kept by the block or by its checkpoint, included),
free of everything outside the blocks (embedding output, RoPE tables, final norm).

Tensor- and context-parallel layouts run on a fake process group (one rank's view,
collectives return uninitialized buffers of the right shape), so this needs no peers.
The formulas this is checked against are in ``runtime/model.py``'s docstring.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cost_models.specs import ModelSpec


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class _StorageRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[weakref.ref, int]] = {}
        self.origin: dict[int, tuple] = {}  # op, shape, dtype that created each storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                tensor = _local(tensor)  # a DTensor's own storage is a shell; its shard is real
                storage = tensor.untyped_storage()
                known = self.storages.get(id(storage))
                if known is None or known[0]() is not storage:  # ids are reused after frees
                    self.storages[id(storage)] = (weakref.ref(storage), storage.nbytes())
                    self.origin[id(storage)] = (str(func), tuple(tensor.shape), tensor.dtype)
        return out

    def alive_bytes(self, exclude: list[torch.Tensor]) -> int:
        """Bytes of recorded storages still alive, except those of ``exclude`` (the
        output, the parameters: ops like ``t()`` return views of the weights)."""
        gc.collect()
        skip = {id(_local(t).untyped_storage()) for t in exclude}
        return sum(size for key, (ref, size) in self.storages.items() if ref() is not None and key not in skip)

    def alive(self) -> list:
        gc.collect()
        return [(size, *self.origin[key]) for key, (ref, size) in self.storages.items() if ref() is not None]


def _saved_bytes(spec: ModelSpec, mode: str, batch: int, seq_len: int, tp: int, cp: int,
                 dtype: torch.dtype, wrap_block=None) -> int:
    from .context_parallel import shard_sequence
    from .mesh import ParallelDims, build_mesh
    from .parallelize import apply_ac, apply_cp, apply_tp

    world = tp * cp
    mesh = build_mesh(ParallelDims(1, 1, cp, tp, world), "cpu", ("dp_replicate", "dp_shard", "cp", "tp"))
    from .model import Transformer

    torch.manual_seed(0)
    model = Transformer(spec).to(dtype)
    if tp > 1:
        apply_tp(model, mesh["tp"])
    if cp > 1:
        apply_cp(model, mesh["cp"], mesh["cp"].get_local_rank(), cp)
    if wrap_block is None:
        apply_ac(model, (mode,) * spec.n_layers)
    else:  # another program's AC policy (e.g. torchtitan's), applied per block
        for name, block in list(model.layers.items()):
            model.layers[name] = wrap_block(block, name)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq_len))
    positions = torch.arange(seq_len)
    if cp > 1:
        tokens = shard_sequence(tokens, 0, cp)
        positions = shard_sequence(positions, 0, cp, dim=0)
    recorder = _StorageRecorder()
    with recorder:
        hidden = model(tokens, positions)
    saved = recorder.alive_bytes([hidden, *model.parameters()])
    del hidden
    return saved


def saved_bytes_per_block(spec: ModelSpec, mode: str = "none", batch: int = 1, seq_len: int = 64, tp: int = 1,
                          cp: int = 1, dtype: torch.dtype = torch.float32, wrap_block=None) -> int:
    """Bytes one block keeps for backward on one rank (``mode``: none / selective / full,
    or ``wrap_block(block, name) -> module`` to apply another program's AC wrapper).

    Sets up a fake process group of ``tp x cp`` ranks when none is initialized.
    """
    import dataclasses

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * cp)
    try:
        small = dataclasses.replace(spec, n_layers=1)
        large = dataclasses.replace(spec, n_layers=2)
        return (_saved_bytes(large, mode, batch, seq_len, tp, cp, dtype, wrap_block)
                - _saved_bytes(small, mode, batch, seq_len, tp, cp, dtype, wrap_block))
    finally:
        if own_group:
            dist.destroy_process_group()
