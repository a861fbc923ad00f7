"""Trace one rank's memory for a plan, on CPU, without a GPU and without real data.

Recipe (shared/design.md): FakeTensorMode + the fake process group (``FakeStore``,
backend "fake") with the plan's world size, rank 0's view of the device mesh, the
runtime's own model / parallelization / loss / optimizer, and FSDP2's memory tracker.
Two steps run; the second's forward and backward (steady state: optimizer states
allocated) are reported. Pipeline plans (pp > 1, CPU program): one pp rank runs the
runtime's stages under PyTorch's schedule (``trace_pipeline_memory``).
Parameters are kept in the plan's precision (bf16 compute, fp32 master), as on GPU.

What is not the same as a GPU run: kernels' scratch space (cuBLAS / flash workspaces),
the CUDA context, NCCL buffers and allocator fragmentation are not tensors, so they are
not traced; the comparison is between tensor bytes only.

DTensor's sharding propagation runs each new op signature once on GLOBAL-shape fake
tensors to learn the output's shape (``ShardingPropagator._propagate_tensor_meta_non_cached``,
torch 2.13). On a GPU those tensors live in a fresh ``FakeTensorMode`` and take no
memory; under our trace ``detect_fake_mode()`` returns the trace's own mode, so the
tracker would count them: a global [tokens, vocab] fp32 log-softmax input and output
(2 x 1.96 GiB for a 4k-token chunk of Llama 3's vocabulary) on top of the real,
vocab-sharded loss at TP 8. ``propagation_blind`` trackers inside ``sharding_propagation_untracked`` leave them out.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from autoplan.plan import Plan

# FSDPMemTracker category -> our memory breakdown component
CATEGORY_TO_COMPONENT = {
    "Sharded Param": "params",
    "OptState": "optimizer",
    "Sharded Grad": "grads",
    "Unsharded Param": "fsdp_unsharded",
    "Unsharded Grad": "fsdp_unsharded",
    "All Gather": "fsdp_unsharded",
    "Reduce Scatter": "fsdp_unsharded",
    "Activation": "activations",
    "Temp": "activations",
    "Inputs": "activations",
    "Buffer": "activations",
}


class _Propagation(threading.local):
    depth = 0


_PROPAGATING = _Propagation()


@contextmanager
def sharding_propagation_untracked():
    """Mark DTensor's shape propagation while inside, so a ``propagation_blind`` tracker
    skips the ops it runs (module docstring)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, op_schema):
        _PROPAGATING.depth += 1
        try:
            return original(self, op_schema)
        finally:
            _PROPAGATING.depth -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate  # type: ignore[method-assign]
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original  # type: ignore[method-assign]


def propagation_blind(tracker_class):
    """A subclass of a PyTorch memory tracker that does not count the global-shape tensors
    of DTensor's sharding propagation (inside ``sharding_propagation_untracked``)."""

    class PropagationBlind(tracker_class):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _PROPAGATING.depth:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return PropagationBlind


def _reset_peak(tracker) -> None:
    """Start the peak over from the current snapshot.

    ``reset_mod_stats`` clears per-module stats but not the global peak (torch 2.13,
    torch/distributed/_tools/mem_tracker.py), so without this the first iteration -
    lazy optimizer-state creation and its update - would set the "steady-state" peak.
    This is what ``MemTracker.__enter__`` does to initialize the peak.
    """
    tracker._peak_mem_snap = tracker.get_tracker_snapshot()
    tracker._peak_mem = {device: snap["Total"] for device, snap in tracker._peak_mem_snap.items()}


@dataclass
class TraceResult:
    peak_bytes: float
    categories: dict[str, float]
    components: dict[str, float]
    peak_at: str = ""  # pp > 1: where the peak was reached (op, modules)
    traced_rank: str = ""  # pp > 1: which pp rank was traced


def trace_plan_memory(plan: Plan, steps: int = 2, device_type: str = "cpu", pp_rank: int | None = None
                      ) -> TraceResult:
    """Rank 0's forward + backward peak of the plan's second step, traced with fake tensors.

    ``device_type="cpu"``: the CPU program (CPU attention kernels; ring CP runs through the
    portable all-gather-K/V path). ``"cuda"``: the CUDA program on the fake CUDA device
    (``runtime/fake_cuda.py``, loaded before torch): the fused SDPA kernels' ops, FSDP2's
    bf16/fp32 mixed precision as on GPU, and PyTorch's own ring attention for ``ring-*``.
    pp > 1: pp rank ``pp_rank``'s stages (default 0), CPU program only (``trace_pipeline_memory``).
    """
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .mesh import ParallelDims, build_mesh
    from .parallelize import uses_native_cp
    from .train import (
        _native_cp_micro_step,
        build_parallel_model,
        build_training_state,
        local_tokens,
        loss_backward_context,
        micro_loss,
    )

    p = plan.parallelism
    if p.pp > 1:
        if device_type != "cpu":
            from .mesh import LayoutError
            raise LayoutError(f"parallelism.pp={p.pp}: the CUDA program's trace runs one whole model (pp = 1); "
                              "trace pipeline stages with the CPU program (--program cpu)")
        return trace_pipeline_memory(plan, pp_rank=0 if pp_rank is None else pp_rank, steps=steps)
    world = p.world_size
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, world)
    device = torch.device(device_type)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = build_mesh(dims, device_type, plan.mesh_order)
        param_dtype = torch.bfloat16 if plan.precision.param_dtype == "bfloat16" else torch.float32
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        if device_type == "cpu":
            # Mesh and sharding metadata need real (tiny) tensors on CPU: build them outside
            # fake mode, on the meta device; only materialization and the steps run under it.
            model = build_parallel_model(plan, mesh, dims, device, param_dtype=param_dtype)
        else:
            # On the fake CUDA device nothing real can exist: build under fake mode.
            with fake_mode:
                model = build_parallel_model(plan, mesh, dims, device, param_dtype=param_dtype)
        native_cp = dims.cp > 1 and uses_native_cp(plan.cp_impl, device_type)
        with fake_mode:
            state = build_training_state(plan, mesh, dims, device, materialize=False, model=model)
            tracker = propagation_blind(FSDPMemTracker)(state.model, state.optimizer)
            vocab = plan.model_spec().vocab_size
            batch = plan.local_batch_size
            # The last step's optimizer update runs outside the tracker: MemTracker sizes
            # the temporaries AdamW creates from DTensor parameters at their GLOBAL shape
            # (a local-size DTensor shows 28x a plain tensor's peak, see
            # tests/test_trace_tools.py), which would invent a peak that does not exist.
            # The optimizer phase is exact arithmetic in the model (states, grads and
            # per-parameter temporaries), checked separately.
            untracked = sharding_propagation_untracked()
            untracked.__enter__()
            tracker.__enter__()
            def micro_step() -> None:
                tokens = torch.randint(0, vocab, (batch, plan.seq_len + 1))
                if native_cp:
                    _native_cp_micro_step(state, tokens[:, :-1], tokens[:, 1:], plan.grad_accum_steps)
                    return
                inputs, labels, positions = local_tokens(state, tokens[:, :-1], tokens[:, 1:])
                loss = micro_loss(state, inputs, labels, positions) / plan.grad_accum_steps
                with loss_backward_context(state.dims):
                    loss.backward()

            try:
                snapshot = _traced_steps(
                    tracker, state.optimizer, steps, plan.grad_accum_steps, micro_step,
                    lambda: torch.nn.utils.clip_grad_norm_(state.model.parameters(), plan.optimizer.max_norm,
                                                           foreach=False))
            finally:
                tracker.__exit__(None, None, None)
                untracked.__exit__(None, None, None)
    finally:
        dist.destroy_process_group()
    return _result(snapshot, device_type)


def clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding decisions (torch 2.13: the C++ dispatch fast path's
    cache, ``ShardingPropagator``'s per-thread LRU caches, ``_gen_transform_infos``, the redistribute planners,
    ``MeshTopoInfo.build_from_mesh``).

    Their keys hold DeviceMeshes, which compare equal across process groups by layout;
    their values hold the mesh they were computed with. A trace after another trace with
    the same layout but another rank (a new fake group, other group names) would get
    specs on the old meshes and fail on a group that no longer exists."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._collective_utils import MeshTopoInfo
    from torch.distributed.tensor._redistribute import _gen_transform_infos, clear_redistribute_planner_cache

    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ dispatch fast path's
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()
    _gen_transform_infos.cache_clear()
    clear_redistribute_planner_cache()
    MeshTopoInfo.build_from_mesh.cache_clear()


def _multi_root_tracker(tracker_class, roots: list, optimizer):
    """An FSDP2 memory tracker over several FSDP roots, each run once per micro-batch.

    A pp rank holds one FSDP root per stage (``v`` of them, interleaved), and the schedule
    calls each once per micro-batch. ``FSDPMemTracker`` takes one root and raises when a
    root's forward is entered again (it takes that for a second iteration, torch 2.13
    fsdp2_mem_tracker.py, the wrapped ``FSDPState._pre_forward``). Its byte accounting is
    per tensor (dispatch + weak references), not per module: the subclass below forgets a
    root's per-module stats just before its forward (``enter_roots``; the peak is kept)
    and instruments every root's FSDP modules.
    """
    from torch import nn

    class PipelineTracker(tracker_class):
        peak_at = ""  # the op (and modules running) where the peak was last raised
        _func = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._func = func
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _update_peak_stats(self, peak_state):
            before = dict(self._peak_mem)
            super()._update_peak_stats(peak_state)
            if self._peak_mem != before:
                where = sorted(m for m in self._mod_tracker.parents if m != "Global")
                self.peak_at = (f"{'backward' if self._mod_tracker.is_bw else 'forward'} "
                                f"{getattr(self._func, '__name__', self._func)} in {', '.join(where) or 'no module'}")

        def enter_roots(self):
            def forget(module, args):
                if not self._mod_tracker.is_bw:
                    self.memory_tracking.pop(module, None)
            # prepend: ahead of the tracker's own wrapped FSDP pre-forward hook
            return [root.register_forward_pre_hook(forget, prepend=True) for root in roots]

    tracker = PipelineTracker(roots[0], optimizer)
    tracker._root_mod = nn.ModuleList(roots)  # the modules to instrument: every stage's
    return tracker


def trace_pipeline_memory(plan: Plan, pp_rank: int = 0, steps: int = 2) -> TraceResult:
    """pp rank ``pp_rank``'s forward + backward peak of the plan's second step (CPU program).

    The rank runs the runtime's own stages (``runtime.pipeline``: split, per-stage
    TP / CP / AC / FSDP2), PyTorch's schedule (GPipe / 1F1B / Interleaved1F1B) and the
    pipeline loss, as global rank ``pp_rank x world / pp`` (pp is the mesh's outermost
    dim; coordinate 0 on the others) of the fake process group. Two departures, both
    forced by a process group that carries no data, neither changing what is allocated:

    - The stages get their shapes up front (``PipelineStage(input_args=, output_args=)``,
      ``runtime.pipeline.static_stage_args``) instead of exchanging them over P2P on the
      first step (a fake ``recv_object_list`` returns nothing). The schedule then
      allocates the same per-micro-batch receive buffers from the same metadata.
    - The schedule's P2P warm-up vote (``_warmup_p2p``) is replaced by its outcome when
      every rank gives static shapes: STATIC. The real vote multiplies 0/1 flags received
      from the previous rank and reads the result with ``.item()``: under the fake group
      the received flag is never written, and under fake tensors ``.item()`` has no value.

    P2P sends and receives themselves run as the schedule issues them: the fake group
    completes them at once and leaves the pre-allocated receive buffers as they are (a
    fake tensor's bytes are its size, not its contents), so the buffers, the
    activations saved per micro-batch and the order the schedule frees them in are the
    real ones.
    """
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.pipelining._utils import InferenceMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from . import pipeline as pp
    from .mesh import LayoutError, ParallelDims, build_mesh
    from .train import build_pipeline, build_training_state, local_tokens, loss_backward_context

    p = plan.parallelism
    if not 0 <= pp_rank < p.pp:
        raise LayoutError(f"pp rank {pp_rank}: the plan has pp={p.pp} (ranks 0..{p.pp - 1})")
    world = p.world_size
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, world, p.pp)
    device = torch.device("cpu")
    if dist.is_initialized():
        dist.destroy_process_group()
    clear_dtensor_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=pp_rank * (world // p.pp), world_size=world)
    try:
        mesh = build_mesh(dims, "cpu", plan.mesh_order)
        param_dtype = torch.bfloat16 if plan.precision.param_dtype == "bfloat16" else torch.float32
        # Mesh and sharding metadata need real (tiny) tensors on CPU: build the stages outside
        # fake mode, on the meta device; materialization and the steps run under it.
        pipe, stages_model = build_pipeline(plan, mesh, dims, device, param_dtype=param_dtype)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            state = build_training_state(plan, mesh, dims, device, materialize=False, param_dtype=param_dtype,
                                         model=stages_model, pipeline=pipe, pp_static_shapes=True)

            def warmup_outcome(stages, has_backward, p2p_done):
                for stage in stages:
                    stage._inference_mode = InferenceMode.STATIC

            pipe.schedule._warmup_p2p = warmup_outcome  # type: ignore[attr-defined]
            tracker = _multi_root_tracker(propagation_blind(FSDPMemTracker), pipe.stages, state.optimizer)
            vocab = plan.model_spec().vocab_size
            untracked = sharding_propagation_untracked()
            untracked.__enter__()
            tracker.__enter__()
            handles = tracker.enter_roots()
            def micro_step() -> None:
                tokens = torch.randint(0, vocab, (plan.local_batch_size, plan.seq_len + 1))
                inputs, labels, positions = local_tokens(state, tokens[:, :-1], tokens[:, 1:])
                with loss_backward_context(dims):
                    pp.forward_backward(pipe, inputs, labels, positions)

            try:
                snapshot = _traced_steps(
                    tracker, state.optimizer, steps, plan.grad_accum_steps, micro_step,
                    lambda: pp.clip_grad_norm_(pipe, state.model.parameters(), plan.optimizer.max_norm))
            finally:
                for handle in handles:
                    handle.remove()
                tracker.__exit__(None, None, None)
                untracked.__exit__(None, None, None)
    finally:
        dist.destroy_process_group()
    result = _result(snapshot, "cpu")
    result.peak_at = tracker.peak_at
    result.traced_rank = f"pp rank {pp_rank} of {p.pp} (global rank {pp_rank * (world // p.pp)} of {world})"
    return result


def _traced_steps(tracker, optimizer, steps: int, accum: int, micro_step, clip) -> dict:
    """Run ``steps`` training steps of ``accum`` micro-steps under ``tracker`` and return the
    last step's forward + backward peak snapshot. The last step stops before its optimizer
    update (module docstring); after the first, whose optimizer states are created lazily,
    the peak starts over (``_reset_peak``)."""
    for step in range(steps):
        for _ in range(accum):
            micro_step()
        if step == steps - 1:
            break
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            tracker.reset_mod_stats()
            _reset_peak(tracker)
    return tracker.get_tracker_snapshot("peak")


def _result(snapshot, device_type: str) -> TraceResult:
    per_device = next((v for k, v in snapshot.items() if str(k).startswith(device_type)),
                      next(iter(snapshot.values())))
    categories = {getattr(k, "value", str(k)): float(v) for k, v in per_device.items() if k != "Total"}
    components: dict[str, float] = {}
    for category, value in categories.items():
        component = CATEGORY_TO_COMPONENT.get(category, "activations")
        components[component] = components.get(component, 0.0) + value
    return TraceResult(float(per_device["Total"]), categories, components)
