"""The longest sequence that fits, at the granularity a layout can run.

A layout (degrees, CP implementation, local batch) runs lengths that are multiples of
``seq_len_multiple`` (2 x cp for head-tail load balancing, x tp for sequence parallel),
rounded up to whole multiples of ``GRANULE`` tokens; with ``--global-batch-tokens``,
also those that divide the global batch into whole micro-batches. Layouts are grouped
by that set of lengths; within a group whether some layout fits falls with the length
(memory grows with it), so each group's longest is found by bisection on the memory
model. A group is searched only above the best length found so far, so after the first
group most take one probe.

Fitting is the planner's test: the layout's peak with every layer at its lightest
allowed activation-checkpointing mode is within the usable memory. Local batch 1 is
the lightest (unless pinned): a longer batch never fits where batch 1 does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cost_models.config import Parallelism, TrainConfig
from cost_models.memory import memory_terms
from cost_models.rules import layout_violations, seq_len_multiple
from cost_models.specs import SpecError

from .ilp import tensor_budget_bytes
from .search import Layout, _grad_accum, divisors, layouts

if TYPE_CHECKING:
    from .planner import PlanRequest

GRANULE = 1024  # answers are whole multiples of 1k tokens


@dataclass(frozen=True)
class Longest:
    seq_len: int | None  # None: not even the shortest length fits
    capped: bool  # the search's cap fits: the true longest is that or more


@dataclass(frozen=True)
class _Probe:
    parallelism: Parallelism
    cp_impl: str
    batch: int
    accum: int | None  # pinned gradient accumulation


def _lengths(step: int, per_batch: int | None, accum: int | None, low: int, high: int) -> list[int] | range:
    """Runnable lengths of a group within [low, high], ascending."""
    if per_batch is None:
        return range(math.ceil(low / step) * step, high + 1, step)
    if accum is not None:
        s = per_batch // accum if per_batch % accum == 0 else 0
        return [s] if s and s % step == 0 and low <= s <= high else []
    return [d for d in divisors(per_batch) if d % step == 0 and low <= d <= high]


class FitCheck:
    """Whether some layout fits a GPU count and a length, on the memory model alone (the
    planner's pre-solve test), remembered across lengths and GPU counts: memory terms
    depend on the degrees, not on the count they came from (``memory_key``)."""

    def __init__(self, request: PlanRequest, allowed: tuple[str, ...]):
        self.request = request
        self.fixed = {k: v for k, v in request.fixed.items() if k not in ("ac", "seq_len")}
        lightest = "full" if "full" in allowed else allowed[-1]
        n = request.model.n_layers
        self.counts = {m: (n if m == lightest else 0) for m in ("full", "selective", "none")}
        self.memo: dict[tuple, bool] = {}

    def layouts(self, num_gpus: int) -> list[Layout]:
        r = self.request
        found, _ = layouts(r.model, r.gpu, num_gpus, r.gpus_per_node, self.fixed)
        return [lay for lay in found if r.layout_filter is None or r.layout_filter(lay.parallelism)]

    def fits(self, par: Parallelism, cp_impl: str, batch: int, seq_len: int) -> bool:
        r = self.request
        key = (par.dp_shard, par.cp, par.tp, par.dp_replicate > 1, seq_len, batch, cp_impl)
        if key in self.memo:
            return self.memo[key]
        try:
            cfg = TrainConfig(par, seq_len, batch, 1, None, cp_impl)
        except SpecError:
            self.memo[key] = False
            return False
        if layout_violations(r.model, cfg):
            self.memo[key] = False
            return False
        mem = memory_terms(r.model, cfg, r.executor)
        peak = mem.peak_tensor_bytes_for_counts(self.counts["full"], self.counts["selective"], self.counts["none"])
        self.memo[key] = peak <= tensor_budget_bytes(mem, r.usable_bytes)
        return self.memo[key]

    def any_fits(self, num_gpus: int, seq_len: int) -> bool:
        """Some layout on ``num_gpus`` runs ``seq_len`` (global batch included) and fits.

        Of the layouts with the same cp and tp, the one without a replicate group
        (dp_shard = every data-parallel rank) needs the least memory: memory terms read
        dp_shard only as the FSDP shard count (state bytes / (dp_shard x cp)) and as NCCL
        communicators (one for FSDP, one for replicate, each when its group is > 1), and
        every other split has larger shards and a replicate group. Only it is priced
        when it is there (tests/test_longest.py checks the dominance on the model)."""
        unreplicated = {(lay.parallelism.cp, lay.parallelism.tp) for lay in self.layouts(num_gpus)
                        if lay.parallelism.dp_replicate == 1}
        for lay in self.layouts(num_gpus):
            if lay.parallelism.dp_replicate > 1 and (lay.parallelism.cp, lay.parallelism.tp) in unreplicated:
                continue
            batch = min(lay.batches)
            if isinstance(_grad_accum(seq_len, batch, lay.parallelism, self.request.global_batch_tokens,
                                      self.fixed), str):
                continue
            if any(self.fits(lay.parallelism, cp_impl, batch, seq_len) for cp_impl in lay.cp_impls):
                return True
        return False


def longest_fitting_seq(request: PlanRequest, allowed: tuple[str, ...], low: int, high: int) -> Longest:
    check = FitCheck(request, allowed)
    fixed = check.fixed
    groups: dict[tuple, list[_Probe]] = {}
    for lay in check.layouts(request.num_gpus):
        batch = min(lay.batches)
        par = lay.parallelism
        step = math.lcm(GRANULE, seq_len_multiple(par, batch))
        per_batch = None
        if request.global_batch_tokens is not None:
            per_batch = request.global_batch_tokens // (batch * par.dp_degree)
            if request.global_batch_tokens % (batch * par.dp_degree):
                continue
        accum = fixed.get("grad_accum_steps") if per_batch is not None else None
        for cp_impl in lay.cp_impls:
            groups.setdefault((step, per_batch, accum), []).append(_Probe(par, cp_impl, batch, accum))

    best: int | None = None
    capped = False
    for (step, per_batch, accum), probes in sorted(groups.items(), key=lambda kv: kv[0][0]):
        lengths = _lengths(step, per_batch, accum, max(low, (best or 0) + 1), high)
        if not lengths:
            continue

        def any_fits(index: int) -> bool:
            return any(check.fits(p.parallelism, p.cp_impl, p.batch, lengths[index]) for p in probes)

        if not any_fits(0):
            continue
        lo, hi = 0, len(lengths) - 1
        while lo < hi:  # the last index that fits
            mid = (lo + hi + 1) // 2
            if any_fits(mid):
                lo = mid
            else:
                hi = mid - 1
        best = lengths[lo]
        # the group's longest runnable length under the cap fits, and it runs longer ones
        capped = lo == len(lengths) - 1 and bool(_lengths(step, per_batch, accum, high + 1, 2 * high + step))
    return Longest(best, capped)
