"""Sweeps: vary one knob and tabulate the longest sequence that fits,
tokens/s/GPU, MFU and the memory breakdown; or trace the seq_len vs tokens/s frontier of
each layout family on a fixed GPU count.

Knobs:
- ``cp``: context-parallel degree, other degrees pinned by ``fixed``. Without an explicit
  GPU count the count follows the pins: ``dp_shard=8`` and cp 1, 2, 4, 8 gives 8, 16,
  32, 64 GPUs (unpinned degrees are then 1). With ``gpus`` given, the count stays and the
  planner chooses the unpinned degrees.
- ``gpus``: GPU counts; ``seqlen``: target sequence lengths; ``gpu``: GPU types.
- ``pp``: pipeline degree (1 = no pipeline), on the given GPU count at the target
  sequence length (pipelines are planned for throughput: ``max_seq_len`` is searched for
  pp = 1 only, 0 otherwise).

Frontier families: FSDP, FSDP+CP, FSDP+TP, FSDP+TP+CP (pp = 1) and PP (pp > 1: the fastest
pipeline the throughput planner finds at that length, priced even where a pp = 1 layout
would be faster).

Each point plans twice at most: the longest sequence that fits (objective max-seqlen
under the pins) and the fastest plan at the target sequence length (or, without a
target, at that longest length: the max-seqlen plan already is the fastest one there).
Plans are memoized within the process, and points run in worker processes when there
are several, so a 100-point sweep stays within seconds.

Rows are flat dicts with a fixed set of columns (``SWEEP_FIELDS`` / ``FRONTIER_FIELDS``);
``autoplan.report.rows`` prints them and reads CSV/JSON back to equal rows.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cost_models.config import Parallelism
from cost_models.executors import DEFAULT_EXECUTOR, EXECUTOR_PROFILES, ExecutorProfile
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec, SpecError, resolve_gpu

from .errors import UsageError
from .fix import check_conflicts
from .planner import DEFAULT_MEMORY_HEADROOM, PlanRequest, PlanResult, make_plan
from .report.describe import LAYOUT_FAMILIES, layout_family
from .report.rows import MEMORY_KEYS
from .units import MemoryHeadroom

KNOBS = ("cp", "gpus", "seqlen", "gpu", "pp")


def _in_family(name: str) -> Callable[[Parallelism], bool]:
    return lambda parallelism: parallelism.pp == 1 and layout_family(parallelism) == name


def _pipelined(parallelism: Parallelism) -> bool:
    return parallelism.pp > 1


# The pp = 1 families by what they add to data parallel, and "PP": every pipelined layout
# the throughput planner searches (pp 2 .. 16 with any inner degrees, its schedules).
FAMILIES: dict[str, Callable[[Parallelism], bool]] = {
    **{name: _in_family(name) for name in LAYOUT_FAMILIES}, "PP": _pipelined}
SWEEP_FIELDS = ("knob", "value", "gpu", "gpus", "max_seq_len", "seq_len", "fits", "tokens_per_second_per_gpu", "mfu",
                "layout", "ac", "peak_memory_bytes") + tuple(f"mem_{k}_bytes" for k in MEMORY_KEYS) + ("note",)
FRONTIER_FIELDS = ("family", "gpu", "gpus", "seq_len", "fits", "tokens_per_second_per_gpu", "mfu", "layout", "ac",
                   "peak_memory_bytes", "note")
DEFAULT_GPUS = 8
_PARALLEL_FROM = 4  # points; fewer run in this process


@dataclass
class SweepSetup:
    model: ModelSpec
    gpu: GPUSpec
    gpus: int | None = None  # None: one node, or (cp sweep) the product of the pinned degrees
    gpus_per_node: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    target_seq_len: int | None = None  # None: report tokens/s at each point's longest sequence
    executor: ExecutorProfile = EXECUTOR_PROFILES[DEFAULT_EXECUTOR]
    memory_headroom: MemoryHeadroom = DEFAULT_MEMORY_HEADROOM


# ------------------------------------------------------------------------------ planning


@lru_cache(maxsize=512)
def _plan(model: ModelSpec, gpu: GPUSpec, gpus: int, gpus_per_node: int | None, fixed: tuple,
          executor: ExecutorProfile, memory_headroom: MemoryHeadroom,
          objective: str, target: int | None, family: str | None) -> PlanResult:
    per_node = min(gpus_per_node or gpu.gpus_per_node, gpus)
    return make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=gpus, gpus_per_node=per_node, target_seq_len=target,
                                 objective=objective, fixed=dict(fixed), executor=executor, top_k=0,
                                 memory_headroom=memory_headroom,
                                 layout_filter=FAMILIES[family] if family else None))


def _frozen(fixed: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fixed.items() if k != "seq_len"))


def _outcome(result: PlanResult) -> dict:
    """The columns that describe one plan (zeros and the planner's reason when none fits)."""
    if result.plan is None:
        return {"fits": False, "tokens_per_second_per_gpu": 0.0, "mfu": 0.0, "layout": "", "ac": "",
                "peak_memory_bytes": 0.0, **{f"mem_{k}_bytes": 0.0 for k in MEMORY_KEYS},
                "note": result.explanation[0] if result.explanation else "no plan"}
    predicted = result.plan.prediction
    breakdown = predicted.memory_breakdown_bytes
    return {"fits": True, "tokens_per_second_per_gpu": float(predicted.tokens_per_second_per_gpu),
            "mfu": float(predicted.mfu), "layout": result.plan.describe_layout(), "ac": result.plan.describe_ac(),
            "peak_memory_bytes": float(predicted.peak_memory_bytes),
            **{f"mem_{k}_bytes": float(breakdown.get(k, 0.0)) for k in MEMORY_KEYS}, "note": ""}


def _point_inputs(setup: SweepSetup, knob: str, value) -> tuple[GPUSpec, int, dict, int | None]:
    fixed = dict(setup.fixed)
    gpu, target = setup.gpu, setup.target_seq_len or fixed.pop("seq_len", None)
    fixed.pop("seq_len", None)
    gpus = setup.gpus or DEFAULT_GPUS
    if knob == "cp":
        fixed["cp"] = int(value)
        pins = [k for k in ("dp_replicate", "dp_shard", "tp") if k in fixed]
        if setup.gpus is None and pins:
            gpus = math.prod(int(fixed[k]) for k in pins) * int(value)
    elif knob == "gpus":
        gpus = int(value)
    elif knob == "seqlen":
        target = int(value)
    elif knob == "gpu":
        gpu = resolve_gpu(str(value))
    elif knob == "pp":
        if target is None:
            raise UsageError("--knob pp needs --target-seqlen: pipelines are planned for throughput at a length")
        fixed["pp"] = int(value)
    else:
        raise UsageError(f"--knob {knob!r}: use one of {', '.join(KNOBS)}")
    return gpu, gpus, fixed, target


def sweep_point(setup: SweepSetup, knob: str, value) -> dict:
    """One row of a sweep: the longest sequence that fits, and the plan at the target."""
    gpu, gpus, fixed, target = _point_inputs(setup, knob, value)
    row = {"knob": knob, "value": value, "gpu": gpu.name, "gpus": gpus}
    key = (setup.model, gpu, gpus, setup.gpus_per_node, _frozen(fixed), setup.executor, setup.memory_headroom)
    try:
        if int(fixed.get("pp", 1)) > 1:  # pipelines: throughput at the target only
            max_seq = 0
            result = _plan(*key, "throughput", target, None)
        else:
            longest = _plan(*key, "max-seqlen", None, None)
            max_seq = longest.plan.seq_len if longest.plan else 0
            result = _plan(*key, "throughput", target, None) if target else longest
    except SpecError as error:  # this point's pins cannot work on this GPU count: a row, not an abort
        return {**row, "max_seq_len": 0, "seq_len": target or 0,
                **_outcome(PlanResult(None, None, [], [], [str(error)], "", 0))}
    return {**row, "max_seq_len": max_seq, "seq_len": target or max_seq, **_outcome(result)}


def frontier_point(setup: SweepSetup, family: str, seq_len: int) -> dict:
    """The fastest plan of one layout family at one sequence length."""
    gpus = setup.gpus or DEFAULT_GPUS
    fixed = {k: v for k, v in setup.fixed.items() if k != "seq_len"}
    row = {"family": family, "gpu": setup.gpu.name, "gpus": gpus, "seq_len": seq_len}
    try:
        result = _plan(setup.model, setup.gpu, gpus, setup.gpus_per_node, _frozen(fixed), setup.executor,
                       setup.memory_headroom,
                       "throughput", seq_len, family)
    except SpecError as error:
        result = PlanResult(None, None, [], [], [str(error)], "", 0)
    outcome = {k: v for k, v in _outcome(result).items() if k in FRONTIER_FIELDS}
    return {**row, **outcome}


def _call(task: tuple) -> dict:
    function, args = task
    return function(*args)


def _run(tasks: list[tuple], jobs: int | None) -> list[dict]:
    """Evaluate (function, args) tasks, in worker processes when there are enough of them;
    a progress bar on a terminal (``autoplan.report.progress``)."""
    from .report.progress import progress

    def serial() -> list[dict]:
        return list(progress(map(_call, tasks), len(tasks), "planning points"))

    jobs = jobs if jobs is not None else min(os.cpu_count() or 1, 8)
    jobs = min(jobs, len(tasks))
    if jobs <= 1 or len(tasks) < _PARALLEL_FROM:
        return serial()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start at once and inherit the memo. A parent that has solved before
    # holds HiGHS's worker threads; a forked child would inherit a scheduler without its
    # threads and hang on its first solve, so stop them first (HiGHS restarts them).
    # Elsewhere (macOS, Windows) points run here: spawned workers would re-run the caller's script.
    if not sys.platform.startswith("linux") or not _stop_highs_threads():
        return serial()
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(progress(pool.map(_call, tasks), len(tasks), "planning points"))
    except (OSError, RuntimeError):  # no processes here (sandbox, limits): run them in this one
        return serial()


def _stop_highs_threads() -> bool:
    """True when no HiGHS worker threads are left running (so forking is safe)."""
    try:
        import highspy
    except ImportError:
        return True  # no HiGHS: pulp runs CBC as a subprocess
    reset = getattr(getattr(highspy, "Highs", None), "resetGlobalScheduler", None)
    if reset is None:
        return False
    reset(True)
    return True


def sweep(setup: SweepSetup, knob: str, values: list, jobs: int | None = None) -> list[dict]:
    """Vary one knob (``cp``, ``gpus``, ``seqlen``, ``gpu`` or ``pp``): one row per value, in order."""
    if knob not in KNOBS:
        raise UsageError(f"--knob {knob!r}: use one of {', '.join(KNOBS)}")
    check_conflicts(setup.fixed, setup.target_seq_len)
    for value in values:  # bad values fail here, in this process, before any work
        gpu, gpus, _, _ = _point_inputs(setup, knob, value)
        ClusterSpec(gpu, gpus, min(setup.gpus_per_node or gpu.gpus_per_node, gpus))  # whole nodes
    return _run([(sweep_point, (setup, knob, v)) for v in values], jobs)


def frontier(setup: SweepSetup, seq_lens: list[int], families: list[str] | None = None,
             jobs: int | None = None) -> list[dict]:
    """For each layout family and sequence length: the fastest plan of that family
    (``fits`` False and zeros where none of the family fits)."""
    families = list(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UsageError(f"layout family {unknown[0]!r}: use one of {', '.join(FAMILIES)}")
    return _run([(frontier_point, (setup, f, s)) for f in families for s in seq_lens], jobs)


def grid(setup: SweepSetup, seq_lens: list[int], gpu_counts: list[int], jobs: int | None = None) -> list[dict]:
    """The fastest plan at every (sequence length, GPU count): ``seqlen`` sweeps, one per count."""
    points = [(s, n) for n in gpu_counts for s in seq_lens]
    order = sorted(range(len(points)), key=lambda i: -points[i][1])  # the costly (many-GPU) points first
    rows = _run([(_grid_point, (setup, *points[i])) for i in order], jobs)
    out: list[dict] = [{}] * len(points)
    for i, row in zip(order, rows):
        out[i] = row
    return out


def _grid_point(setup: SweepSetup, seq_len: int, gpus: int) -> dict:
    fixed = {k: v for k, v in setup.fixed.items() if k != "seq_len"}
    row = {"gpu": setup.gpu.name, "gpus": gpus, "seq_len": seq_len}
    try:
        result = _plan(setup.model, setup.gpu, gpus, setup.gpus_per_node, _frozen(fixed), setup.executor,
                       setup.memory_headroom,
                       "throughput", seq_len, None)
    except SpecError as error:
        result = PlanResult(None, None, [], [], [str(error)], "", 0)
    return {**row, **_outcome(result)}


def default_frontier_seq_lens() -> list[int]:
    return [2**k for k in range(13, 22)]  # 8k .. 2M
