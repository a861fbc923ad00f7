"""Emitted torchtitan files must fit for torchtitan: price the plan's layout as torchtitan
runs it (its executor profile - loss over the full vocabulary, its AC policy - one AC
mode for every block, its ring CP, its fixed mesh order) and, when that does not fit,
plan again for torchtitan."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cost_models.config import DEFAULT_MESH_ORDER, ACPolicy
from cost_models.executors import EXECUTOR_PROFILES, ExecutorProfile
from cost_models.step import StepEstimate, estimate_step

from ..plan import Plan
from ..units import format_bytes_gib

TORCHTITAN = "torchtitan"


@dataclass(frozen=True)
class TorchtitanFit:
    estimate: StepEstimate
    usable_bytes: float
    capacity_bytes: float

    @property
    def fits(self) -> bool:
        return self.estimate.peak_memory_bytes <= self.usable_bytes

    def describe(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (f"priced for torchtitan (executor profile '{TORCHTITAN}'): peak "
                f"{format_bytes_gib(self.estimate.peak_memory_bytes)} of {format_bytes_gib(self.usable_bytes)} usable "
                f"({format_bytes_gib(self.capacity_bytes)} capacity): {verdict}; "
                f"{self.estimate.tokens_per_second_per_gpu:,.0f} tokens/s/GPU predicted")


def torchtitan_profile(plan: Plan) -> ExecutorProfile:
    """The plan's own profile when it was made for torchtitan (calibrated values kept)."""
    return plan.executor_spec() if plan.executor == TORCHTITAN else EXECUTOR_PROFILES[TORCHTITAN]


def torchtitan_fit(plan: Plan) -> TorchtitanFit | None:
    """The plan's layout priced as torchtitan would run it (None: the plan names no GPU)."""
    from .torchtitan import ac_mode

    cluster = plan.cluster_spec()
    if cluster is None:
        return None
    model = plan.model_spec()
    mode, _ = ac_mode(plan)
    cfg = plan.train_config()
    # torchtitan's CP is PyTorch's ring (allgather rotation by default) and its mesh order is fixed.
    # Under a pipeline the ring is not priced (cost_models/rules.py): CP stays all-gather-K/V there.
    cp_impl = "ring-allgather" if cfg.cp_impl == "allgather-kv" and cfg.parallelism.pp == 1 else cfg.cp_impl
    cfg = replace(cfg, ac=ACPolicy.uniform(mode, model.n_layers), cp_impl=cp_impl, mesh_order=DEFAULT_MESH_ORDER)
    estimate = estimate_step(model, cluster, cfg, torchtitan_profile(plan))
    capacity = float(cluster.gpu.memory_bytes)
    predicted = plan.predicted
    if predicted is not None and predicted.memory_usable_bytes is not None:
        usable = float(predicted.memory_usable_bytes)
    else:
        from ..planner import DEFAULT_MEMORY_HEADROOM
        usable = capacity - DEFAULT_MEMORY_HEADROOM.bytes_of(capacity)
    return TorchtitanFit(estimate, usable, capacity)


def plan_for_torchtitan(request) -> Plan | None:
    """The fastest plan torchtitan can run as emitted: its profile, one AC mode for every
    block, its ring CP and mesh order (None when nothing fits)."""
    from ..planner import make_plan

    fixed = {k: v for k, v in request.fixed.items() if k not in ("ac", "mesh_order", "cp_impl")}
    fixed["mesh_order"] = DEFAULT_MESH_ORDER
    fixed["cp_impl"] = "ring-allgather"
    best: Plan | None = None
    for mode in ("none", "selective", "full"):
        if request.fixed.get("ac", request.ac) not in ("auto", mode):
            continue
        plan = make_plan(replace(request, executor=EXECUTOR_PROFILES[TORCHTITAN], ac=mode, fixed=fixed, top_k=0)).plan
        if plan is not None and (best is None or plan.prediction.tokens_per_second_per_gpu
                                 > best.prediction.tokens_per_second_per_gpu):
            best = plan
    return best
