"""Plan a run: build the search space, price it, solve, explain, and write the plan.

Objectives:
- ``throughput``: the fastest plan (tokens/s per GPU) at the target sequence length.
- ``max-seqlen``: the longest sequence that fits, at a runnable granularity (a multiple
  of 1k and of what the layout needs), found by bisection on the memory model
  (``autoplan.longest``), then the fastest plan at it.
- ``min-gpus``: the fewest GPUs (whole nodes; ``--gpus`` is the upper bound) that fit
  the target, then the fastest plan on that many.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable

from cost_models.config import AC_MODES, ACPolicy, Parallelism, TrainConfig
from cost_models.executors import DEFAULT_EXECUTOR, EXECUTOR_PROFILES, ExecutorProfile
from cost_models.pipeline import rank_counts_policy
from cost_models.specs import ClusterSpec, GiB, GPUSpec, ModelSpec, SpecError
from cost_models.step import StepEstimate, estimate_step

from .caveats import IMPRACTICAL_STEP_S, MAX_SEQ_LEN, caveats
from .errors import UsageError
from .fix import check_conflicts
from .ilp import Choice, PricedCandidate, choose, price
from .longest import FitCheck, Longest, longest_fitting_seq
from .plan import ActivationCheckpointDoc, Plan, PredictedDoc
from .report.describe import LAYOUT_FAMILIES, describe_ac, describe_degrees, layout_family
from .search import Candidate, Rejection, build_search_space, check_pins, min_bubble_factor, pipeline_candidates
from .units import MemoryHeadroom, format_tokens

# 5% of each GPU (4 GiB of an 80 GB H100) stays free unless --memory-headroom says
# otherwise: the memory model's median error against traced memory is ~1% but single
# layouts miss by up to ~8%, the caching allocator's reserve varies from run to run, and
# NCCL's buffers grow with each communicator a job creates.
DEFAULT_MEMORY_HEADROOM = MemoryHeadroom(fraction=0.05)
# Plans whose predicted speeds differ by less than this are not told apart by the time
# model: its leave-one-group-out error on published runs (benchmarks/published_runs.py).
MODEL_TIME_ACCURACY = 0.10

OBJECTIVES = ("throughput", "max-seqlen", "min-gpus")
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
    memory_capacity_bytes: float | None = None  # overrides the GPU's memory (tests)
    # Memory every plan leaves free: the model is a model, the allocator fragments, NCCL
    # grows with communicators (see DEFAULT_MEMORY_HEADROOM).
    memory_headroom: MemoryHeadroom = field(default_factory=lambda: DEFAULT_MEMORY_HEADROOM)
    # Keep only layouts for which this returns True (e.g. a layout family in a sweep).
    layout_filter: Callable[[Parallelism], bool] | None = None
    calibration: str | None = None  # where the GPU's and executor's calibrated values came from

    @property
    def capacity_bytes(self) -> float:
        """Each GPU's memory."""
        return float(self.memory_capacity_bytes if self.memory_capacity_bytes is not None else self.gpu.memory_bytes)

    @property
    def headroom_bytes(self) -> float:
        return self.memory_headroom.bytes_of(self.capacity_bytes)

    @property
    def usable_bytes(self) -> float:
        """What a plan may use: capacity less the headroom."""
        return self.capacity_bytes - self.headroom_bytes

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
    seq_len_capped: bool = False  # max-seqlen reached MAX_SEQ_LEN: the longest that fits is that or more
    impractical: bool = False  # a step takes over IMPRACTICAL_STEP_S


def _gpu_counts(request: PlanRequest, objective: str) -> list[int]:
    if objective != "min-gpus":
        return [request.num_gpus]
    per_node = request.gpus_per_node or request.gpu.gpus_per_node
    counts = [n for n in (1, 2, 4) if n < per_node and n <= request.num_gpus]
    counts += list(range(per_node, request.num_gpus + 1, per_node))
    return counts or [request.num_gpus]


def _price_all(request: PlanRequest, gpu_counts: list[int], seq_lens: list[int]
               ) -> tuple[list[PricedCandidate], list[Rejection], Choice | None]:
    """Priced candidates, rejections, and the best pp = 1 choice when it was solved already
    (to decide whether pipelines can win; the pipelines are appended after the pp = 1 ones)."""
    fixed = {k: v for k, v in request.fixed.items() if k not in ("ac", "seq_len")}
    space = build_search_space(request.model, request.gpu, gpu_counts, seq_lens, request.gpus_per_node,
                               fixed, request.global_batch_tokens)
    candidates = space.candidates
    if request.layout_filter is not None:
        candidates = [c for c in candidates if request.layout_filter(c.parallelism)]
    memory: dict = {}
    allowed = request.allowed_modes()
    priced = [price(request.model, request.gpu, c, request.executor, request.gpus_per_node,
                    request.usable_bytes, memory, allowed) for c in candidates]
    rejections = space.rejections
    base = None
    # Unpinned pipelines join the throughput objective only: max-seqlen and min-gpus search
    # the length / GPU count over pp = 1 layouts (pin pp to search pipelines there).
    if "pp" not in fixed and request.resolved_objective() == "throughput" and len(gpu_counts) == 1 \
            and len(seq_lens) == 1:
        more, rejected, base = _pipeline_priced(request, gpu_counts[0], seq_lens[0], fixed, priced, allowed)
        priced += more
        rejections = rejections + rejected
    return priced, rejections, base


def _choose_with_pipelines(request: PlanRequest, priced: list[PricedCandidate], allowed: tuple[str, ...],
                           base: Choice | None) -> Choice | None:
    """The best choice: a pipeline's seconds per token are fixed (its AC is priced already),
    so with the pp = 1 optimum in hand the best of all is the faster of the two."""
    if base is None:
        return choose(priced, allowed, time_limit_s=request.time_limit_s)
    pipelines = [i for i, p in enumerate(priced) if p.pipeline is not None and p.pipeline.counts is not None]
    if not pipelines:
        return base
    best = min(pipelines, key=lambda i: priced[i].seconds_per_token({}))
    if priced[best].seconds_per_token({}) < base.seconds_per_token:
        counts = priced[best].pipeline.counts  # type: ignore[union-attr]
        return Choice(best, dict(counts or {}), priced[best].seconds_per_token({}), True)
    return base


def _pipeline_priced(request: PlanRequest, num_gpus: int, seq_len: int, fixed: dict[str, Any],
                     priced: list[PricedCandidate], allowed: tuple[str, ...]
                     ) -> tuple[list[PricedCandidate], list[Rejection], Choice | None]:
    """Pipeline candidates, when they can win: pp > 1 adds a bubble of at least
    ``min_bubble_factor`` times the compute, so it is priced only when no pp = 1 layout fits
    or the best one spends more than that factor over its own compute-only time (recompute,
    exposed communication). Each survivor must also beat that plan on a compute-only bound."""
    candidates, rejections = pipeline_candidates(request.model, request.gpu, num_gpus, seq_len,
                                                 request.gpus_per_node, fixed, request.global_batch_tokens)
    if request.layout_filter is not None:  # a layout family (sweep --frontier, capacity's pipelined alternative)
        candidates = [c for c in candidates if request.layout_filter(c.parallelism)]
    if not candidates:
        return [], [], None
    factor = min_bubble_factor(candidates)
    best = choose(priced, allowed, time_limit_s=request.time_limit_s) if priced else None
    bound = float("inf")
    if best is not None:
        winner = priced[best.index]
        bound = best.seconds_per_token
        compute_only = (winner.terms.grad_accum_steps * winner.terms.compute_s + winner.terms.optimizer_s) \
            / winner.tokens_per_gpu_step
        if bound <= factor * compute_only:
            return [], [], best  # not tried: its rejections would only add noise
    out = []
    # Branch and bound: cheapest lower bound first, and every pipeline priced lowers
    # the bar for the rest (a candidate that cannot beat the best found is not priced).
    bounded = sorted((_pipeline_lower_bound(request, c), i, c) for i, c in enumerate(candidates)
                     if _pipeline_static_bytes(request, c) <= request.usable_bytes)  # stage-0 weights fit
    for lower, _, c in bounded:
        if lower >= bound:
            break
        priced_pipeline = price(request.model, request.gpu, c, request.executor, request.gpus_per_node,
                                request.usable_bytes, None, allowed)
        out.append(priced_pipeline)
        if priced_pipeline.pipeline is not None and priced_pipeline.pipeline.counts is not None:
            bound = min(bound, priced_pipeline.seconds_per_token({}))
    rejections = list(rejections)
    if len(candidates) > len(bounded):
        rejections.append(Rejection("pipeline (pp > 1)", PIPELINE_TOO_BIG, len(candidates) - len(bounded)))
    if len(bounded) > len(out):
        rejections.append(Rejection("pipeline (pp > 1)", PIPELINE_CANNOT_WIN, len(bounded) - len(out)))
    return out, rejections, best


PIPELINE_TOO_BIG = "pp rank 0's weights, grads, optimizer state and saved activations alone exceed usable memory"
PIPELINE_CANNOT_WIN = ("slower than the plan found even at its lower bound (bubble + compute + the least "
                       "recompute pp rank 0 needs to fit)")


def pipeline_fits(request: PlanRequest) -> bool:
    """Whether some pipeline (pp > 1) of the throughput planner's pipeline space fits
    ``request.num_gpus`` at ``request.target_seq_len``: ``make_plan`` with a pp > 1 layout
    filter finds a plan, without building the pp = 1 space (capacity scans many counts)."""
    if request.target_seq_len is None:
        raise UsageError("pipeline_fits: the request needs a target sequence length")
    allowed = request.allowed_modes()
    fixed = {k: v for k, v in request.fixed.items() if k not in ("ac", "seq_len")}
    candidates, _ = pipeline_candidates(request.model, request.gpu, request.num_gpus, request.target_seq_len,
                                        request.gpus_per_node, fixed, request.global_batch_tokens)
    for c in candidates:
        if _pipeline_static_bytes(request, c) > request.usable_bytes:
            continue
        priced = price(request.model, request.gpu, c, request.executor, request.gpus_per_node,
                       request.usable_bytes, None, allowed)
        if priced.pipeline is not None and priced.pipeline.counts is not None:
            return True
    return False


def _pipeline_static_bytes(request: PlanRequest, candidate: Candidate) -> float:
    """Bytes pp rank 0 holds at least (a lower bound of its peak): its weights
    (``_rank0_weight_bytes``) and the activations its in-flight micro-batches save in its
    layers with the AC mode that saves least (full)."""
    from cost_models.pipeline import in_flight_microbatches, micro_config, rank_layers

    model, p = request.model, candidate.parallelism
    k = len(rank_layers(model.n_layers, p.pp, candidate.pp_virtual_stages)[0])
    # One micro-batch's per-layer saved bytes depend on its shape only: looked up by that
    # shape, so the 2,000-odd candidates of a large search build a few hundred configs.
    shape = (p.dp_shard, p.cp, p.tp, candidate.seq_len, candidate.local_batch_size // candidate.pp_microbatches,
             candidate.cp_impl, candidate.precision)
    saved = _SAVED_BY_SHAPE.get((model, request.executor, shape))
    if saved is None:
        saved = min(_saved_per_layer(model, micro_config(candidate.train_config()), request.executor).values())
        _SAVED_BY_SHAPE[(model, request.executor, shape)] = saved
    in_flight = in_flight_microbatches(candidate.pp_schedule, 0, p.pp, candidate.pp_microbatches,
                                       candidate.pp_virtual_stages)
    return _rank0_weight_bytes(request, candidate) + in_flight * k * saved


_SAVED_BY_SHAPE: dict = {}


def _rank0_weight_bytes(request: PlanRequest, candidate: Candidate) -> float:
    """pp rank 0's layers' and embedding's gathered params + fp32 unsharded grads (FSDP2
    under the schedule, cost_models/pipeline.py), their sharded fp32 params + AdamW
    states, and the CUDA context."""
    from cost_models.pipeline import rank_layers

    model, p = request.model, candidate.parallelism
    prec = candidate.precision
    k = len(rank_layers(model.n_layers, p.pp, candidate.pp_virtual_stages)[0])
    params = (k * model.params_per_layer + model.embedding_params) / p.tp
    return (params * (prec.param_bytes + prec.grad_reduce_bytes)
            + params / p.fsdp_degree * (prec.master_bytes + prec.optimizer_state_bytes)
            + request.executor.cuda_context_bytes)


@lru_cache(maxsize=4096)
def _saved_per_layer(model: ModelSpec, micro: TrainConfig, executor: ExecutorProfile) -> dict[str, float]:
    """Bytes one layer saves for one micro-batch per AC mode (micro-batch configs repeat
    across schedules, micro-batch counts and pp degrees: cached)."""
    from cost_models.activations import layer_memory
    from cost_models.executors import resolve_executor

    return dict(layer_memory(model, micro, resolve_executor(executor)).saved)


def _pipeline_lower_bound(request: PlanRequest, candidate: Candidate) -> float:
    """Seconds per token a pipeline candidate cannot beat: its schedule slots x the larger
    of the compute (no recompute, no communication) of its rank with the most layers and
    rank 0's compute + the least recompute that lets its activations fit next to its
    weights. That recompute is the LP relaxation over AC mixes (``_lp_vertices``) with
    only ``in_flight - 1`` micro-batches' saved activations and no working sets (rank 0's
    peak phases hold at least that much); infinite when even that does not fit."""
    from cost_models.pipeline import (
        in_flight_microbatches,
        max_rank_layers,
        micro_config,
        micro_layer_time,
        rank_layers,
        schedule_slots,
    )

    from .ilp import _lp_vertices

    cfg = candidate.train_config()
    par = cfg.parallelism
    micro = micro_config(cfg)
    cluster = ClusterSpec(request.gpu, candidate.num_gpus, request.gpus_per_node)
    layer = micro_layer_time(request.model, cluster, micro, request.executor)
    per_layer = layer.forward_s + layer.backward_s
    k = max_rank_layers(request.model.n_layers, par.pp, cfg.pp_virtual_stages)
    k0 = len(rank_layers(request.model.n_layers, par.pp, cfg.pp_virtual_stages)[0])
    in_flight = in_flight_microbatches(cfg.pp_schedule, 0, par.pp, cfg.pp_microbatches, cfg.pp_virtual_stages)
    saved = {m: max(0.0, in_flight - 1) * v for m, v in _saved_per_layer(request.model, micro, request.executor).items()}
    allowed = request.allowed_modes()
    order = [m for m in AC_MODES if m in allowed]  # increasing recompute
    recompute, _ = _lp_vertices(k0, request.usable_bytes - _rank0_weight_bytes(request, candidate), saved,
                                layer.recompute_s, order)
    if recompute is None:
        return float("inf")
    microbatch_s = max(k * per_layer, k0 * per_layer + recompute)
    step = cfg.grad_accum_steps * schedule_slots(par.pp, cfg.pp_microbatches, cfg.pp_virtual_stages) * microbatch_s
    return step / (cfg.seq_len * cfg.local_batch_size * cfg.grad_accum_steps / (par.cp * par.tp * par.pp))


def make_plan(request: PlanRequest) -> PlanResult:
    check_conflicts(request.fixed, request.target_seq_len, request.ac)
    objective = request.resolved_objective()
    if int(request.fixed.get("pp", 1)) > 1 and objective != "throughput":
        raise SpecError(f"--fix pp={request.fixed['pp']} with --objective {objective}: pipelines are planned for "
                        "--objective throughput only (give --target-seqlen); max-seqlen and min-gpus search pp=1")
    if objective != "min-gpus":  # there --gpus is only the upper bound of whole-node counts
        ClusterSpec(request.gpu, request.num_gpus, request.gpus_per_node)  # whole nodes, or a one-line error
    allowed = request.allowed_modes()
    check_pins(request.model, request.num_gpus, request.fixed,
               request.gpus_per_node or min(request.gpu.gpus_per_node, request.num_gpus))
    target = request.fixed.get("seq_len", request.target_seq_len)
    longest = None
    if objective == "max-seqlen":
        longest = _longest_fitting_seq(request, allowed)
        seq_lens = [longest.seq_len or MIN_SEQ_LEN]
        gpu_counts = [request.num_gpus]
    else:
        if target is None:  # resolved_objective() requires a target for these objectives
            raise SpecError(f"--objective {objective} needs --target-seqlen")
        gpu_counts = _fewest_fitting_gpus(request, allowed, target) if objective == "min-gpus" else [request.num_gpus]
        seq_lens = [target]
    priced, rejections, base = _price_all(request, gpu_counts, seq_lens)
    choice = _choose_with_pipelines(request, priced, allowed, base)
    if choice is None:
        return _infeasible(request, objective, priced, rejections, allowed, target)
    chosen = priced[choice.index]
    estimate = _estimate(request, chosen.candidate, choice.counts)
    alternatives, ties = _alternatives(request, priced, choice, estimate, allowed)
    plan = _to_plan(request, chosen.candidate, choice.counts, estimate, alternatives, ties, rejections, objective)
    capped = bool(longest and longest.capped)
    plan.explanation[1:1] = caveats(estimate, capped)
    plan.explanation += _pipeline_lines(priced, chosen, rejections)
    return PlanResult(plan, estimate, alternatives, rejections, plan.explanation, objective, len(priced),
                      choice.proven_optimal, capped, estimate.step_time_s > IMPRACTICAL_STEP_S)


def _longest_fitting_seq(request: PlanRequest, allowed: tuple[str, ...]) -> Longest:
    low = max(MIN_SEQ_LEN, request.target_seq_len or 0)
    return longest_fitting_seq(request, allowed, min(low, MAX_SEQ_LEN), MAX_SEQ_LEN)


def _fewest_fitting_gpus(request: PlanRequest, allowed: tuple[str, ...], target: int) -> list[int]:
    check = FitCheck(request, allowed)
    for count in _gpu_counts(request, "min-gpus"):
        if check.any_fits(count, target):
            return [count]
    return [request.num_gpus]


def _estimate(request: PlanRequest, candidate: Candidate, counts: dict[str, int]) -> StepEstimate:
    cfg = candidate.train_config()
    cfg = replace(cfg, ac=ac_policy(request.model, candidate, counts))
    cluster = ClusterSpec(request.gpu, candidate.num_gpus, request.gpus_per_node)
    estimate = estimate_step(request.model, cluster, cfg, request.executor)
    # Fits means: within the usable memory (capacity less the headroom).
    return replace(estimate, memory_capacity_bytes=request.capacity_bytes,
                   fits=estimate.peak_memory_bytes <= request.usable_bytes)


def ac_policy(model: ModelSpec, candidate: Candidate, counts: dict[str, int]) -> ACPolicy:
    """The per-layer AC of a choice: counts over the whole model (pp = 1: the first layers
    full, then selective), or per pp rank (pp > 1: ``pipeline.rank_counts_policy``)."""
    p = candidate.parallelism
    if p.pp > 1:
        return ACPolicy(rank_counts_policy(model.n_layers, p.pp, candidate.pp_virtual_stages, counts))
    return ACPolicy.mix(model.n_layers, counts.get("full", 0), counts.get("selective", 0))


def _bound_by(estimate: StepEstimate, usable_bytes: float) -> str:
    use = estimate.peak_memory_bytes / usable_bytes
    t = estimate.time_breakdown_s
    biggest = max(("recompute", "exposed_tp_comm", "exposed_cp_comm", "exposed_fsdp_comm"), key=lambda k: t[k])
    parts = [f"memory {estimate.peak_memory_bytes / GiB:.1f} of {usable_bytes / GiB:.1f} GiB usable"]
    if use > 0.97:
        parts[0] = "bound by " + parts[0]
    share = t[biggest] / estimate.step_time_s
    if share > 0.05:
        parts.append(f"{biggest.replace('_', ' ')} {share * 100:.0f}% of step")
    if estimate.pipeline is not None:
        bubble = getattr(estimate.pipeline, "bubble_fraction")
        parts.append(f"bubble {bubble:.0%}, worst pp rank {max(estimate.stage_peak_bytes) / GiB:.1f} GiB, "
                     f"slowest pp rank {estimate.slowest_stage}")
    return ", ".join(parts)


def _alternatives(request: PlanRequest, priced: list[PricedCandidate], choice: Choice, estimate: StepEstimate,
                  allowed: tuple[str, ...]) -> tuple[list[Alternative], list[str]]:
    """Structurally different next-best plans, and the layouts that tie with the winner.

    One row per idea, not reshuffles of the winner: the best plan of the winner's own
    layout family with other degrees (unless it ties the winner exactly: then it is
    listed as a tie), the best plan of each other family (FSDP, +CP, +TP, +TP+CP), and
    the best plan that leaves clearly more memory free, shown when it is within 1% of
    the winner's speed. Rows are ordered by speed; ``top_k`` caps them.
    """
    if request.top_k <= 0:
        return [], []
    winner = priced[choice.index]
    # Pipelines form one family of their own (one more row, one more solve).
    family_of = ["PP" if p.candidate.parallelism.pp > 1 else layout_family(p.candidate.parallelism) for p in priced]
    winner_key = (winner.candidate.num_gpus, winner.candidate.seq_len, winner.candidate.parallelism)
    same_degrees = {i for i, p in enumerate(priced)
                    if (p.candidate.num_gpus, p.candidate.seq_len, p.candidate.parallelism) == winner_key
                    and (p.candidate.pp_schedule, p.candidate.pp_microbatches) == (winner.candidate.pp_schedule,
                                                                                  winner.candidate.pp_microbatches)}

    def best(excluded: set[int], pool: list[PricedCandidate] = priced) -> Alternative | None:
        found = choose(pool, allowed, time_limit_s=request.time_limit_s, excluded=[excluded])
        if found is None:
            return None
        candidate = pool[found.index].candidate
        alternative_estimate = _estimate(request, candidate, found.counts)
        return Alternative(candidate, found.counts, alternative_estimate,
                           _bound_by(alternative_estimate, request.usable_bytes))

    ties: list[str] = []
    rows: list[Alternative] = []
    for family in LAYOUT_FAMILIES + (("PP",) if "PP" in family_of else ()):
        others = {i for i, name in enumerate(family_of) if name != family}
        if family == family_of[choice.index]:
            runner_up = best(others | same_degrees)
            if runner_up is not None and _same_prediction(runner_up, estimate, choice.counts):
                ties.append(runner_up.candidate.describe())
                runner_up = best(others | same_degrees | {i for i, p in enumerate(priced)
                                                          if p.candidate.parallelism == runner_up.candidate.parallelism})
            if runner_up is not None and not _same_prediction(runner_up, estimate, choice.counts):
                rows.append(runner_up)
        else:
            alternative = best(others)
            if alternative is not None:
                rows.append(alternative)
    rows.sort(key=lambda a: -a.estimate.tokens_per_second_per_gpu)
    rows = rows[:request.top_k]
    roomy = _roomier(request, priced, estimate, best)
    if roomy is not None and all(r.candidate != roomy.candidate for r in rows):
        rows = rows[:max(request.top_k - 1, 0)] + [roomy]
    return rows, ties


# A plan "leaves clearly more memory free" when it frees this share of usable memory more.
ROOMIER_SHARE = 0.10
# ... and is offered beside the winner when its speed is within this share of the winner's.
ROOMIER_SPEED_SHARE = 0.01


def _roomier(request: PlanRequest, priced: list[PricedCandidate], estimate: StepEstimate,
             best: Callable[..., Alternative | None]) -> Alternative | None:
    """The fastest plan whose peak is at least ROOMIER_SHARE of usable memory below the
    winner's, when it is within ROOMIER_SPEED_SHARE of the winner's speed."""
    ceiling = estimate.peak_memory_bytes - ROOMIER_SHARE * request.usable_bytes
    tighter = []
    for p in priced:
        if p.pipeline is not None:
            if p.pipeline.counts is not None and p.pipeline.peak_bytes <= ceiling:
                tighter.append(p)
            continue
        if p.time is None:  # cannot fit even the full budget
            continue
        mt = p.memory
        budget = (ceiling - mt.fixed_overhead_bytes - mt.comm_buffer_bytes) / (1 + mt.fragmentation)
        # Full AC saves the least: a candidate it does not bring under the budget never can.
        if p.full_ac_peak_tensor_bytes() <= budget:
            tighter.append(replace(p, tensor_budget_bytes=min(p.tensor_budget_bytes, budget)))
    roomy = best(set(), tighter)
    if roomy is None:
        return None
    if roomy.estimate.tokens_per_second_per_gpu < (1 - ROOMIER_SPEED_SHARE) * estimate.tokens_per_second_per_gpu:
        return None
    return roomy


def _same_prediction(alternative: Alternative, estimate: StepEstimate, counts: dict[str, int]) -> bool:
    """Exactly as fast (to 1e-9) with the same AC: the model cannot tell the two apart."""
    return (alternative.counts == counts and math.isclose(alternative.estimate.step_time_s, estimate.step_time_s,
                                                          rel_tol=1e-9)
            and math.isclose(alternative.estimate.peak_memory_bytes, estimate.peak_memory_bytes, rel_tol=1e-9))


def _to_plan(request: PlanRequest, cand: Candidate, counts: dict[str, int], estimate: StepEstimate,
             alternatives: list[Alternative], ties: list[str], rejections: list[Rejection], objective: str) -> Plan:
    model = request.model
    ac = ac_policy(model, cand, counts)
    executor = request.executor
    p = cand.parallelism
    pipeline = (f", pipeline {cand.describe().split(' b=')[1].split(' ', 1)[1]}" if p.pp > 1 else "")
    explanation = [
        f"objective {objective}: chose {describe_degrees(p)}"
        f" at seq_len {format_tokens(cand.seq_len)}, local batch {cand.local_batch_size}, AC {describe_ac(ac.layer_modes)}"
        + pipeline,
        f"predicted {estimate.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, MFU {estimate.mfu * 100:.1f}%, "
        f"{_bound_by(estimate, request.usable_bytes)}",
    ]
    if ties:
        explanation.append("equally fast by the model (same prediction): " + "; ".join(ties))
    speed = estimate.tokens_per_second_per_gpu
    close = [a for a in alternatives if a.estimate.tokens_per_second_per_gpu >= (1 - MODEL_TIME_ACCURACY) * speed]
    if close:
        explanation.append(f"{len(close)} alternative(s) within {MODEL_TIME_ACCURACY:.0%} of this speed, inside the "
                           "model's error on published runs: pick among them by what it does not price "
                           "(fewer moving parts, more free memory)")
    for alt in alternatives:
        freed = estimate.peak_memory_bytes - alt.estimate.peak_memory_bytes
        room = f", {freed / GiB:.1f} GiB more free" if freed >= ROOMIER_SHARE * request.usable_bytes else ""
        alt_ac = ac_policy(model, alt.candidate, alt.counts).layer_modes
        explanation.append(f"alternative {alt.candidate.describe()} AC {describe_ac(alt_ac)}: "
                           f"{alt.estimate.tokens_per_second_per_gpu:,.0f} tokens/s/GPU; {alt.bound_by}{room}")
    reasons = _reason_counts(rejections)
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
        **({"pp_schedule": cand.pp_schedule, "pp_microbatches": cand.pp_microbatches,
            "pp_virtual_stages": cand.pp_virtual_stages} if p.pp > 1 else {}),
        predicted=PredictedDoc(**estimate.summary(), peak_phase=estimate.peak_phase,
                               memory_usable_bytes=request.usable_bytes,
                               memory_headroom_bytes=request.headroom_bytes),
        alternatives=[{"parallelism": a.candidate.parallelism.as_dict(), "seq_len": a.candidate.seq_len,
                       "local_batch_size": a.candidate.local_batch_size, "cp_impl": a.candidate.cp_impl,
                       "mesh_order": list(a.candidate.mesh_order), "activation_checkpoint": dict(a.counts),
                       **({"pp_schedule": a.candidate.pp_schedule, "pp_microbatches": a.candidate.pp_microbatches,
                           "pp_virtual_stages": a.candidate.pp_virtual_stages} if a.candidate.parallelism.pp > 1
                          else {}),
                       "predicted": a.estimate.summary(), "bound_by": a.bound_by} for a in alternatives],
        explanation=explanation,
    )


def _pipeline_lines(priced: list[PricedCandidate], chosen: PricedCandidate,
                    rejections: list[Rejection] = ()) -> list[str]:  # type: ignore[assignment]
    """What pipeline parallelism would do, when pipelines were considered and another plan won."""
    pipelines = [p for p in priced if p.pipeline is not None]
    if chosen.pipeline is not None:
        return []
    if not pipelines:
        ruled_out = {r.reason: r.count for r in rejections if r.what == "pipeline (pp > 1)"}
        if not ruled_out:
            return []
        return [f"pipelines (pp > 1): none of {sum(ruled_out.values()):,} priced, all ruled out before pricing "
                "(the pipeline rejections above)"]
    fitting = [p for p in pipelines if p.pipeline is not None and p.pipeline.counts is not None]
    degrees = sorted({p.candidate.parallelism.pp for p in pipelines})
    line = f"pipelines (pp {', '.join(map(str, degrees))}): {len(fitting)} of {len(pipelines)} priced fit"
    if fitting:
        best = min(fitting, key=lambda p: p.seconds_per_token({}))
        line += f"; the fastest, {best.candidate.describe()}, runs {1 / best.seconds_per_token({}):,.0f} tokens/s/GPU"
    return [line]


def _reason_counts(rejections: list[Rejection]) -> Counter:
    reasons: Counter = Counter()
    for r in rejections:
        reasons[r.reason.split(";")[0]] += r.count
    return reasons


def _infeasible(request: PlanRequest, objective: str, priced: list[PricedCandidate], rejections: list[Rejection],
                allowed: tuple[str, ...], target: int | None) -> PlanResult:
    """No plan fits: say what came closest and what would make the target fit."""
    lines = []
    if priced:
        # The layout that needs the least memory (all at full AC, the lightest mode).
        closest = min(priced, key=lambda p: p.full_ac_need_bytes())
        need = closest.full_ac_need_bytes()
        have = request.usable_bytes
        lines.append(f"no layout fits: the closest, {closest.candidate.describe()} at seq_len "
                     f"{format_tokens(closest.candidate.seq_len)}, needs {need / GiB:.1f} GiB of {have / GiB:.1f} usable "
                     f"even with full AC")
    else:
        lines.append("no layout passes the structural rules for this model and GPU count")
    if "full" not in allowed:
        lines.append("try --ac auto (full activation checkpointing lowers memory)")
    if request.fixed:
        lines.append(f"try fewer pins than --fix {','.join(f'{k}={v}' for k, v in request.fixed.items())}")
    if target and objective == "min-gpus":
        check = FitCheck(request, allowed)
        per_node = request.gpus_per_node or request.gpu.gpus_per_node
        for factor in (2, 4, 8, 16, 32, 64):
            count = -(-request.num_gpus * factor // per_node) * per_node
            if check.any_fits(count, target):
                lines.insert(0, f"needs more than {request.num_gpus} GPUs: the target fits on {count} "
                                f"({factor}x); try --objective min-gpus --gpus {count}")
                break
    if target and objective != "min-gpus":
        check = FitCheck(request, allowed)
        for factor in (2, 4, 8, 16, 32, 64):
            more = replace(request, num_gpus=request.num_gpus * factor)
            if check.any_fits(more.num_gpus, target):
                lines.append(f"the target fits on {more.num_gpus} GPUs ({factor}x): try --gpus {more.num_gpus} "
                             f"or --objective min-gpus --gpus {more.num_gpus}")
                break
        shorter = replace(request, objective="max-seqlen", target_seq_len=None, top_k=0,
                          fixed={k: v for k, v in request.fixed.items() if k != "seq_len"})
        longest = _longest_fitting_seq(shorter, allowed).seq_len
        if longest:
            lines.append(f"on {request.num_gpus} GPUs the longest sequence that fits is {format_tokens(longest)} "
                         f"(--objective max-seqlen)")
    if rejections:
        reasons = _reason_counts(rejections)
        reason, count = reasons.most_common(1)[0]
        lines.append(f"rejected {count} layout(s) before pricing: {reason}")
    return PlanResult(None, None, [], rejections, lines, objective, len(priced))
