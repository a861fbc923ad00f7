"""Plan a run: build the search space, price it, solve, explain, and write the plan.

Objectives:
- ``throughput``: the fastest plan (tokens/s per GPU) at the target sequence length.
- ``max-seqlen``: the longest sequence that fits (feasibility is monotone in the length,
  so the length is found by bisection over a grid), then the fastest plan at it.
- ``min-gpus``: the fewest GPUs (whole nodes; ``--gpus`` is the upper bound) that fit
  the target, then the fastest plan on that many.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from cost_models.config import AC_MODES, ACPolicy, Parallelism
from cost_models.executors import DEFAULT_EXECUTOR, EXECUTOR_PROFILES, ExecutorProfile
from cost_models.specs import ClusterSpec, GiB, GPUSpec, ModelSpec, SpecError
from cost_models.step import StepEstimate, estimate_step

from .ilp import Choice, PricedCandidate, choose, price
from .plan import ActivationCheckpointDoc, Plan, PredictedDoc
from .report.describe import describe_ac, describe_degrees
from .search import Candidate, Rejection, build_search_space, check_pins, power_of_two_grid
from .units import format_tokens

OBJECTIVES = ("throughput", "max-seqlen", "min-gpus")
MAX_SEQ_LEN = 16 * 1024 * 1024
MIN_SEQ_LEN = 1024


@dataclass
class PlanRequest:
    model: ModelSpec
    gpu: GPUSpec
    num_gpus: int
    gpus_per_node: int | None = None
    target_seq_len: int | None = None
    global_batch_tokens: int | None = None
    objective: str | None = None  # default: throughput with a target, else max-seqlen
    fixed: dict[str, Any] = field(default_factory=dict)
    ac: str = "auto"  # auto | none | selective | full
    executor: ExecutorProfile = EXECUTOR_PROFILES[DEFAULT_EXECUTOR]
    top_k: int = 3
    gpu_source: str = "named"
    time_limit_s: float = 20.0
    memory_capacity_bytes: float | None = None  # overrides the GPU's memory (tests, headroom)
    # Keep only layouts for which this returns True (e.g. a layout family in a sweep).
    layout_filter: Callable[[Parallelism], bool] | None = None
    calibration: str | None = None  # where the GPU's and executor's calibrated values came from

    def resolved_objective(self) -> str:
        objective = self.objective or ("throughput" if self.target_seq_len else "max-seqlen")
        if objective not in OBJECTIVES:
            raise SpecError(f"--objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        if objective in ("throughput", "min-gpus") and not self.target_seq_len and "seq_len" not in self.fixed:
            raise SpecError(f"--objective {objective} needs --target-seqlen")
        return objective

    def allowed_modes(self) -> tuple[str, ...]:
        mode = self.fixed.get("ac", self.ac)
        if mode == "auto":
            return AC_MODES
        if mode not in AC_MODES:
            raise SpecError(f"--ac {mode!r}: use auto, none, selective or full")
        return (mode,)


@dataclass
class Alternative:
    candidate: Candidate
    counts: dict[str, int]
    estimate: StepEstimate
    bound_by: str


@dataclass
class PlanResult:
    plan: Plan | None
    estimate: StepEstimate | None
    alternatives: list[Alternative]
    rejections: list[Rejection]
    explanation: list[str]
    objective: str
    candidates_priced: int
    proven_optimal: bool = True


def _gpu_counts(request: PlanRequest, objective: str) -> list[int]:
    if objective != "min-gpus":
        return [request.num_gpus]
    per_node = request.gpus_per_node or request.gpu.gpus_per_node
    counts = [n for n in (1, 2, 4) if n < per_node and n <= request.num_gpus]
    counts += list(range(per_node, request.num_gpus + 1, per_node))
    return counts or [request.num_gpus]


def _price_all(request: PlanRequest, gpu_counts: list[int], seq_lens: list[int]
               ) -> tuple[list[PricedCandidate], list[Rejection]]:
    fixed = {k: v for k, v in request.fixed.items() if k not in ("ac", "seq_len")}
    space = build_search_space(request.model, request.gpu, gpu_counts, seq_lens, request.gpus_per_node,
                               fixed, request.global_batch_tokens)
    candidates = space.candidates
    if request.layout_filter is not None:
        candidates = [c for c in candidates if request.layout_filter(c.parallelism)]
    priced = [price(request.model, request.gpu, c, request.executor, request.gpus_per_node,
                    request.memory_capacity_bytes) for c in candidates]
    return priced, space.rejections


def _any_fits(priced: list[PricedCandidate], allowed: tuple[str, ...]) -> bool:
    lightest = "full" if "full" in allowed else allowed[-1]
    return any(p.counts_fit(_uniform(lightest, p.n_layers)) for p in priced)


def _uniform(mode: str, n_layers: int) -> dict[str, int]:
    return {m: (n_layers if m == mode else 0) for m in AC_MODES}


def make_plan(request: PlanRequest) -> PlanResult:
    objective = request.resolved_objective()
    allowed = request.allowed_modes()
    check_pins(request.model, request.num_gpus, request.fixed,
               request.gpus_per_node or min(request.gpu.gpus_per_node, request.num_gpus))
    target = request.fixed.get("seq_len", request.target_seq_len)
    if objective == "max-seqlen":
        seq_len = _longest_fitting_seq(request, allowed)
        seq_lens = [seq_len] if seq_len else [MIN_SEQ_LEN]
        gpu_counts = [request.num_gpus]
    else:
        if target is None:  # resolved_objective() requires a target for these objectives
            raise SpecError(f"--objective {objective} needs --target-seqlen")
        gpu_counts = _fewest_fitting_gpus(request, allowed, target) if objective == "min-gpus" else [request.num_gpus]
        seq_lens = [target]
    priced, rejections = _price_all(request, gpu_counts, seq_lens)
    choice = choose(priced, allowed, time_limit_s=request.time_limit_s)
    if choice is None:
        return _infeasible(request, objective, priced, rejections, allowed, target)
    chosen = priced[choice.index]
    estimate = _estimate(request, chosen.candidate, choice.counts)
    alternatives = _alternatives(request, priced, choice, allowed)
    plan = _to_plan(request, chosen.candidate, choice.counts, estimate, alternatives, rejections, objective)
    return PlanResult(plan, estimate, alternatives, rejections, plan.explanation, objective, len(priced),
                      choice.proven_optimal)


def _longest_fitting_seq(request: PlanRequest, allowed: tuple[str, ...]) -> int | None:
    low_bound = max(MIN_SEQ_LEN, request.target_seq_len or 0) if request.target_seq_len else MIN_SEQ_LEN
    grid = power_of_two_grid(MIN_SEQ_LEN, MAX_SEQ_LEN)
    grid = [s for s in grid if s >= min(low_bound, grid[-1])] or grid
    fits = {}

    def ok(index: int) -> bool:
        if index not in fits:
            priced, _ = _price_all(request, [request.num_gpus], [grid[index]])
            fits[index] = _any_fits(priced, allowed)
        return fits[index]

    if not ok(0):
        return None
    low, high = 0, len(grid) - 1
    while low < high:  # feasibility falls with length: find the last index that fits
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    return grid[low]


def _fewest_fitting_gpus(request: PlanRequest, allowed: tuple[str, ...], target: int) -> list[int]:
    for count in _gpu_counts(request, "min-gpus"):
        priced, _ = _price_all(request, [count], [target])
        if _any_fits(priced, allowed):
            return [count]
    return [request.num_gpus]


def _estimate(request: PlanRequest, candidate: Candidate, counts: dict[str, int]) -> StepEstimate:
    cfg = candidate.train_config()
    ac = ACPolicy.mix(request.model.n_layers, counts.get("full", 0), counts.get("selective", 0))
    cfg = replace(cfg, ac=ac)
    cluster = ClusterSpec(request.gpu, candidate.num_gpus, request.gpus_per_node)
    estimate = estimate_step(request.model, cluster, cfg, request.executor)
    if request.memory_capacity_bytes is not None:
        estimate = _with_capacity(estimate, request.memory_capacity_bytes)
    return estimate


def _with_capacity(estimate: StepEstimate, capacity: float) -> StepEstimate:
    return replace(estimate, memory_capacity_bytes=capacity, fits=estimate.peak_memory_bytes <= capacity)


def _bound_by(estimate: StepEstimate) -> str:
    use = estimate.peak_memory_bytes / estimate.memory_capacity_bytes
    t = estimate.time_breakdown_s
    biggest = max(("recompute", "exposed_tp_comm", "exposed_cp_comm", "exposed_fsdp_comm"), key=lambda k: t[k])
    parts = [f"memory {estimate.peak_memory_bytes / GiB:.1f} of {estimate.memory_capacity_bytes / GiB:.1f} GiB"]
    if use > 0.97:
        parts[0] = "bound by " + parts[0]
    share = t[biggest] / estimate.step_time_s
    if share > 0.05:
        parts.append(f"{biggest.replace('_', ' ')} {share * 100:.0f}% of step")
    return ", ".join(parts)


def _alternatives(request: PlanRequest, priced: list[PricedCandidate], choice: Choice,
                  allowed: tuple[str, ...]) -> list[Alternative]:
    """Next-best plans with different degrees: re-solve excluding each winner's family."""
    def family(p: PricedCandidate) -> tuple:
        return (p.candidate.num_gpus, p.candidate.seq_len, p.candidate.parallelism)

    excluded: list[set[int]] = []
    out = []
    current: Choice | None = choice
    for _ in range(request.top_k):
        assert current is not None
        fam = family(priced[current.index])
        excluded.append({i for i, p in enumerate(priced) if family(p) == fam})
        current = choose(priced, allowed, time_limit_s=request.time_limit_s, excluded=excluded)
        if current is None:
            break
        cand = priced[current.index].candidate
        estimate = _estimate(request, cand, current.counts)
        out.append(Alternative(cand, current.counts, estimate, _bound_by(estimate)))
    return out


def _to_plan(request: PlanRequest, cand: Candidate, counts: dict[str, int], estimate: StepEstimate,
             alternatives: list[Alternative], rejections: list[Rejection], objective: str) -> Plan:
    model = request.model
    ac = ACPolicy.mix(model.n_layers, counts.get("full", 0), counts.get("selective", 0))
    executor = request.executor
    p = cand.parallelism
    explanation = [
        f"objective {objective}: chose {describe_degrees(p)}"
        f" at seq_len {format_tokens(cand.seq_len)}, local batch {cand.local_batch_size}, AC {describe_ac(counts)}",
        f"predicted {estimate.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, MFU {estimate.mfu * 100:.1f}%, "
        f"{_bound_by(estimate)}",
    ]
    for alt in alternatives:
        explanation.append(f"alternative {alt.candidate.describe()} AC {describe_ac(alt.counts)}: "
                           f"{alt.estimate.tokens_per_second_per_gpu:,.0f} tokens/s/GPU; {alt.bound_by}")
    reasons = Counter(r.reason.split(";")[0] for r in rejections)
    for reason, count in reasons.most_common(3):
        explanation.append(f"rejected {count} layout(s): {reason}")
    return Plan(
        parallelism=p.as_dict(),
        mesh_order=list(cand.mesh_order),
        seq_len=cand.seq_len,
        local_batch_size=cand.local_batch_size,
        grad_accum_steps=cand.grad_accum_steps,
        activation_checkpoint=ActivationCheckpointDoc.from_policy(ac),
        cp_impl=cand.cp_impl,
        model=model.to_dict(),
        hardware={"gpu": request.gpu.to_dict(), "num_gpus": cand.num_gpus,
                  "gpus_per_node": request.gpus_per_node or min(request.gpu.gpus_per_node, cand.num_gpus),
                  "source": request.gpu_source},
        executor=executor.name,
        executor_profile=executor.to_dict(),
        calibration=request.calibration,
        loss_chunk_tokens=executor.loss_chunk_tokens,
        predicted=PredictedDoc(**estimate.summary(), peak_phase=estimate.peak_phase),
        alternatives=[{"parallelism": a.candidate.parallelism.as_dict(), "seq_len": a.candidate.seq_len,
                       "local_batch_size": a.candidate.local_batch_size, "cp_impl": a.candidate.cp_impl,
                       "mesh_order": list(a.candidate.mesh_order), "activation_checkpoint": dict(a.counts),
                       "predicted": a.estimate.summary(), "bound_by": a.bound_by} for a in alternatives],
        explanation=explanation,
    )


def _infeasible(request: PlanRequest, objective: str, priced: list[PricedCandidate], rejections: list[Rejection],
                allowed: tuple[str, ...], target: int | None) -> PlanResult:
    """No plan fits: say what came closest and what would make the target fit."""
    lines = []
    if priced:
        closest = min(priced, key=lambda p: p.full_ac_peak_tensor_bytes() / p.tensor_budget_bytes)
        mt = closest.memory
        need = (closest.full_ac_peak_tensor_bytes() * (1 + mt.fragmentation) + mt.fixed_overhead_bytes
                + mt.comm_buffer_bytes)
        have = request.memory_capacity_bytes or request.gpu.memory_bytes
        lines.append(f"no layout fits: the closest, {closest.candidate.describe()} at seq_len "
                     f"{format_tokens(closest.candidate.seq_len)}, needs {need / GiB:.1f} GiB of {have / GiB:.1f} "
                     f"even with full AC")
    else:
        lines.append("no layout passes the structural rules for this model and GPU count")
    if "full" not in allowed:
        lines.append("try --ac auto (full activation checkpointing lowers memory)")
    if request.fixed:
        lines.append(f"try fewer pins than --fix {','.join(f'{k}={v}' for k, v in request.fixed.items())}")
    if target and objective != "min-gpus":
        for factor in (2, 4, 8, 16, 32, 64):
            more = replace(request, num_gpus=request.num_gpus * factor, objective="throughput", top_k=0)
            try:
                priced_more, _ = _price_all(more, [more.num_gpus], [target])
            except SpecError:
                break
            if _any_fits(priced_more, allowed):
                lines.append(f"the target fits on {more.num_gpus} GPUs ({factor}x): try --gpus {more.num_gpus} "
                             f"or --objective min-gpus --gpus {more.num_gpus}")
                break
        shorter = replace(request, objective="max-seqlen", target_seq_len=None, top_k=0,
                          fixed={k: v for k, v in request.fixed.items() if k != "seq_len"})
        longest = _longest_fitting_seq(shorter, allowed)
        if longest:
            lines.append(f"on {request.num_gpus} GPUs the longest sequence that fits is {format_tokens(longest)} "
                         f"(--objective max-seqlen)")
    if rejections:
        reasons = Counter(r.reason.split(";")[0] for r in rejections)
        reason, count = reasons.most_common(1)[0]
        lines.append(f"rejected {count} layout(s) before pricing: {reason}")
    return PlanResult(None, None, [], rejections, lines, objective, len(priced))
