"""The integer program: choose one candidate layout and, jointly, how many of its layers
run with no, selective or full activation checkpointing, under the memory cap.

Variables, per candidate ``c``: ``x_c`` (chosen), ``n_cm`` (layers in AC mode ``m``),
``u_cm`` (mode ``m`` used), ``e_c`` (FSDP traffic not hidden by compute). Layers are
identical, so a per-layer knapsack is a choice of counts; the runtime assigns full AC
to the first layers, then selective, then none (``ACPolicy.mix``), and the memory
constraints are the exact phase peaks of that order (see cost_models/memory.py):
within a block of same-mode layers the backward peak is linear in the layer index, so
it is enough to bound both ends of each block.

Objective: seconds per token per GPU (step time / tokens per GPU per step) - linear,
because tokens per step are a constant of each candidate - so minimizing it maximizes
tokens/s. max-seqlen and min-gpus solve a first program for the sequence length / GPU
count, then this one among the candidates that reach it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import pulp

from cost_models.config import AC_MODES
from cost_models.executors import ExecutorProfile
from cost_models.memory import MemoryTerms, memory_terms
from cost_models.pipeline import estimate_pipeline, max_rank_layers, micro_config, micro_parts, rank_counts_policy
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec
from cost_models.step import TimeTerms, time_terms

from .ilp_memory import add_memory_constraints
from .search import Candidate


class SolverError(RuntimeError):
    pass


@dataclass(frozen=True)
class PipelinePricing:
    """A pp > 1 candidate, priced outside the ILP's per-layer knapsack: its AC (per-rank
    counts, ``pipeline.rank_counts_policy``) is the fastest mix that fits on every stage,
    found by enumeration (``price_pipeline``); the ILP only chooses whether to take it."""

    counts: dict[str, int] | None  # per pp rank; None when nothing fits even with full AC
    step_s: float
    peak_bytes: float  # the worst stage's peak with ``counts``
    full_ac_peak_bytes: float  # the worst stage's peak with every layer under full AC
    usable_bytes: float
    bubble_fraction: float


@dataclass(frozen=True)
class PricedCandidate:
    candidate: Candidate
    memory: MemoryTerms
    time: TimeTerms | None  # None when the candidate cannot fit even with full AC
    tokens_per_gpu_step: float
    tensor_budget_bytes: float  # tensor bytes allowed at the peak (capacity less overheads)
    pipeline: PipelinePricing | None = None  # pp > 1

    @property
    def n_layers(self) -> int:
        return self.memory.n_layers

    def counts_fit(self, counts: dict[str, int]) -> bool:
        if self.pipeline is not None:
            return self.pipeline.counts is not None
        if self.time is None:
            return False
        peak = self.memory.peak_tensor_bytes_for_counts(counts["full"], counts["selective"], counts["none"])
        return peak <= self.tensor_budget_bytes

    def full_ac_need_bytes(self) -> float:
        """Peak bytes (context, NCCL and allocator included) with full AC."""
        if self.pipeline is not None:
            return self.pipeline.full_ac_peak_bytes
        mt = self.memory
        return self.full_ac_peak_tensor_bytes() * (1 + mt.fragmentation) + mt.fixed_overhead_bytes + mt.comm_buffer_bytes

    @property
    def terms(self) -> TimeTerms:
        """The time terms; only candidates that can fit (``time`` set) reach the solver."""
        if self.time is None:
            raise SolverError(f"{self.candidate.describe()} cannot fit and has no time terms")
        return self.time

    def seconds_per_token(self, counts: dict[str, int]) -> float:
        if self.pipeline is not None:
            return self.pipeline.step_s / self.tokens_per_gpu_step
        return self.terms.step_s(counts) / self.tokens_per_gpu_step

    def full_ac_peak_tensor_bytes(self) -> float:
        return self.memory.peak_tensor_bytes_for_counts(self.n_layers, 0, 0)


def memory_key(candidate: Candidate) -> tuple:
    """What ``memory_terms`` reads of a candidate: the parallelism only through the FSDP
    degree (dp_shard x cp), tp, cp and whether a replicate group exists (one more NCCL
    communicator), never the mesh order or the gradient accumulation. Candidates with
    equal keys have equal memory terms (tests/test_search_speed.py checks it)."""
    p = candidate.parallelism
    return (p.dp_shard, p.cp, p.tp, p.dp_replicate > 1, candidate.seq_len, candidate.local_batch_size,
            candidate.cp_impl)


def tensor_budget_bytes(mem: MemoryTerms, capacity_bytes: float) -> float:
    """Tensor bytes allowed at the peak: capacity less the fixed overhead and NCCL, over
    the allocator's fragmentation."""
    return (capacity_bytes - mem.fixed_overhead_bytes - mem.comm_buffer_bytes) / (1 + mem.fragmentation)


def price(model: ModelSpec, gpu: GPUSpec, candidate: Candidate, executor: ExecutorProfile,
          gpus_per_node: int | None, capacity_bytes: float | None = None,
          memory_cache: dict | None = None, allowed_modes: tuple[str, ...] = AC_MODES) -> PricedCandidate:
    if candidate.parallelism.pp > 1:
        return price_pipeline(model, gpu, candidate, executor, gpus_per_node, capacity_bytes, allowed_modes)
    cfg = candidate.train_config()
    cluster = ClusterSpec(gpu, candidate.num_gpus, gpus_per_node)
    if memory_cache is None:
        mem = memory_terms(model, cfg, executor)
    else:
        key = memory_key(candidate)
        mem = memory_cache.get(key) or memory_cache.setdefault(key, memory_terms(model, cfg, executor))
    capacity = float(gpu.memory_bytes if capacity_bytes is None else capacity_bytes)
    budget = tensor_budget_bytes(mem, capacity)
    # Time is only needed for candidates that can fit at all (full AC is the lightest).
    fits_at_all = mem.peak_tensor_bytes_for_counts(mem.n_layers, 0, 0) <= budget
    tim = time_terms(model, cluster, cfg, executor) if fits_at_all else None
    par = candidate.parallelism
    tokens = candidate.seq_len * candidate.local_batch_size * candidate.grad_accum_steps / (par.cp * par.tp)
    return PricedCandidate(candidate, mem, tim, tokens, budget)


def price_pipeline(model: ModelSpec, gpu: GPUSpec, candidate: Candidate, executor: ExecutorProfile,
                   gpus_per_node: int | None, capacity_bytes: float | None = None,
                   allowed_modes: tuple[str, ...] = AC_MODES) -> PricedCandidate:
    """Price a pp > 1 candidate: the fastest per-rank AC mix whose every stage fits.

    Mixes: one mode on every layer, or the first ``n`` layers of each rank in a mode that
    recomputes more and the rest in one that recomputes less; more recompute only lowers
    memory and adds time, so for each pair of modes the smallest fitting ``n`` (bisection)
    is the pair's best."""
    cfg = candidate.train_config()
    cluster = ClusterSpec(gpu, candidate.num_gpus, gpus_per_node)
    par = cfg.parallelism
    usable = float(gpu.memory_bytes if capacity_bytes is None else capacity_bytes)
    k_max = max_rank_layers(model.n_layers, par.pp, cfg.pp_virtual_stages)

    seen: dict[tuple, Any] = {}

    def evaluate(counts: dict[str, int]):
        key = tuple(sorted(counts.items()))
        if key not in seen:
            modes = rank_counts_policy(model.n_layers, par.pp, cfg.pp_virtual_stages, counts)
            seen[key] = estimate_pipeline(model, cluster, cfg, executor, modes)
        return seen[key]

    order = [m for m in AC_MODES[::-1] if m in allowed_modes]  # full, selective, none: decreasing recompute
    full = evaluate(_uniform(order[0], k_max))
    best: tuple[float, dict[str, int], float] | None = None
    if full.peak_bytes <= usable:
        for a_index, heavy in enumerate(order):
            for light in order[a_index + 1:] or [heavy]:
                # Every layer in ``light`` is the pair's fastest mix: when even that is not
                # faster than the best found, the pair cannot win (no bisection needed).
                if best is not None and evaluate(_uniform(light, k_max)).step_time_s >= best[0]:
                    continue
                low, high = 0, k_max  # n layers per rank in ``heavy`` (all heavy: checked after)
                if heavy == light:
                    low = k_max
                while low < high:
                    mid = (low + high) // 2
                    trial = _uniform(light, k_max)
                    trial[heavy], trial[light] = mid, k_max - mid  # heavy != light here (low < high)
                    if evaluate(trial).peak_bytes <= usable:
                        high = mid
                    else:
                        low = mid + 1
                counts = _uniform(light, k_max)
                if heavy != light:
                    counts[heavy], counts[light] = low, k_max - low
                found = evaluate(counts)
                if found.peak_bytes <= usable and (best is None or found.step_time_s < best[0]):
                    best = (found.step_time_s, counts, found.peak_bytes)
    mem = micro_parts(model, cluster, micro_config(cfg), executor)[2]
    tokens = cfg.seq_len * cfg.local_batch_size * cfg.grad_accum_steps / (par.cp * par.tp * par.pp)
    pricing = PipelinePricing(best[1] if best else None, best[0] if best else float("inf"),
                              best[2] if best else full.peak_bytes, full.peak_bytes, usable, full.bubble_fraction)
    return PricedCandidate(candidate, replace(mem, n_layers=k_max), None, tokens, usable, pricing)


@dataclass(frozen=True)
class Choice:
    index: int
    counts: dict[str, int]
    seconds_per_token: float
    proven_optimal: bool


@contextlib.contextmanager
def _quiet_native_stdout():
    """HiGHS prints its banner from C++ straight to fd 1; keep it out of our output."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _solver(time_limit_s: float, gap: float):
    """HiGHS through highspy; CBC (``pip install pulp[cbc]``, pulp's COIN_CMD) as the fallback.

    pulp 3.3 deprecates its bundled PULP_CBC_CMD (gone in 4.0), so it is not used.

    Our models are small (tens of candidates after ``_prune_by_bounds``, a few hundred
    columns), and HiGHS 1.16 spends most of such a solve in presolve and the feasibility
    jump heuristic: the 405B / 16,384-GPU plan's four models, written out as MPS and
    solved by highspy alone (best of 3, 2-core dev machine), took 0.25 s with them and
    0.08 s without, same optima.
    """
    try:
        solver = pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap, log_to_console=False,
                            output_flag=False, presolve="off", mip_heuristic_run_feasibility_jump=False)
        if solver.available():
            return solver
    except (AttributeError, pulp.PulpSolverError):
        pass
    cbc = pulp.COIN_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap)
    if cbc.available():
        return cbc
    raise SolverError("no MILP solver: install highspy (pip install highspy) or CBC (pip install pulp[cbc])")


def choose(priced: list[PricedCandidate], allowed_modes: tuple[str, ...] = AC_MODES, time_limit_s: float = 20.0,
           gap: float = 1e-4, excluded: list[set[int]] | None = None) -> Choice | None:
    """The fastest candidate (seconds per token) and its AC counts, by the ILP.

    Returns None when no candidate fits. ``excluded`` lists index sets of which none
    may be chosen (used to find the next-best alternatives). The other objectives
    (max-seqlen, min-gpus) fix the length or GPU count first (autoplan/longest.py) and
    then ask this for the fastest plan there.
    """
    if not priced:
        return None
    return _solve(priced, list(range(len(priced))), allowed_modes, time_limit_s, gap, excluded)


def _solve(priced: list[PricedCandidate], indices: list[int], allowed_modes: tuple[str, ...],
           time_limit_s: float, gap: float, excluded: list[set[int]] | None) -> Choice | None:
    excluded_all = set().union(*excluded) if excluded else set()
    indices = [i for i in indices if i not in excluded_all]
    # Cheap pre-solve filter: a candidate that does not fit even with every allowed layer
    # at its lightest mode can never be chosen.
    lightest = "full" if "full" in allowed_modes else ("selective" if "selective" in allowed_modes else "none")
    indices = [i for i in indices if priced[i].counts_fit(_uniform(lightest, priced[i].n_layers))]
    if not indices:
        return None
    indices = _prune_by_bounds(priced, indices, allowed_modes)
    indices = _drop_identical(priced, indices)
    prob = pulp.LpProblem("autoplan", pulp.LpMinimize)
    x, n, u, e = {}, {}, {}, {}
    for i in indices:
        p = priced[i]
        L = p.n_layers
        x[i] = prob.add_variable(f"x_{i}", cat="Binary")
        if p.pipeline is not None:
            continue  # AC already chosen (price_pipeline): only x_i
        e[i] = prob.add_variable(f"e_{i}", lowBound=0)
        for m in allowed_modes:
            n[i, m] = prob.add_variable(f"n_{i}_{m}", lowBound=0, upBound=L, cat="Integer")
            u[i, m] = prob.add_variable(f"u_{i}_{m}", cat="Binary")
            prob += n[i, m] <= L * u[i, m]
            prob += u[i, m] <= x[i]
        prob += pulp.lpSum(n[i, m] for m in allowed_modes) == L * x[i]
        add_memory_constraints(prob, p, x[i], {m: n[i, m] for m in allowed_modes}, {m: u[i, m] for m in allowed_modes}, i)
        t = p.terms
        recompute = pulp.lpSum(t.recompute_s[m] * n[i, m] for m in allowed_modes)
        prob += e[i] >= (t.fsdp_comm_s - t.hiding_compute_s) * x[i] - recompute
    prob += pulp.lpSum(x.values()) == 1
    terms = []
    for i in indices:
        if priced[i].pipeline is not None:
            terms.append(1e6 * priced[i].seconds_per_token({}) * x[i])
            continue
        t = priced[i].terms
        scale = 1e6 / priced[i].tokens_per_gpu_step  # microseconds per token
        micro = (t.base_s * x[i] + e[i]
                 + pulp.lpSum((t.recompute_s[m] + t.recompute_comm_s[m]) * n[i, m] for m in allowed_modes))
        terms.append(scale * (t.grad_accum_steps * micro + t.optimizer_s * x[i]))
    prob += pulp.lpSum(terms)
    with _quiet_native_stdout():
        prob.solve(_solver(time_limit_s, gap))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if prob.status == pulp.LpStatusInfeasible or prob.sol_status in (pulp.LpSolutionInfeasible, pulp.LpSolutionNoSolutionFound):
            return None
        raise SolverError(f"solver finished with status {pulp.LpStatus[prob.status]} (sol_status {prob.sol_status})")
    chosen = max(indices, key=lambda i: x[i].value() or 0.0)
    pipeline = priced[chosen].pipeline
    if pipeline is not None and pipeline.counts is not None:
        return Choice(chosen, dict(pipeline.counts), priced[chosen].seconds_per_token({}),
                      proven_optimal=prob.sol_status == pulp.LpSolutionOptimal)
    counts = {m: int(round(n[chosen, m].value() or 0)) for m in allowed_modes}
    for m in AC_MODES:
        counts.setdefault(m, 0)
    return Choice(chosen, counts, priced[chosen].seconds_per_token(counts),
                  proven_optimal=prob.sol_status == pulp.LpSolutionOptimal)


def _prune_by_bounds(priced: list[PricedCandidate], indices: list[int], allowed_modes: tuple[str, ...]) -> list[int]:
    """Drop candidates that provably cannot win, before the solver (exact, not heuristic).

    Lower bound of a candidate: the LP relaxation of its AC choice under the loss-phase
    memory constraint alone (``sum n_m = L``, ``sum n_m A_m <= budget``): its optimum
    sits on a vertex with at most two modes, so trying every pair is exact. Recompute
    hides FSDP traffic ``E`` at most one for one, so ``micro >= base + max(E, R_lp)``.
    Upper bound of the optimum: the best feasible integer mix found by rounding those
    vertices up toward the lighter-memory mode. A candidate whose lower bound exceeds
    the upper bound is never optimal.
    """
    order = [m for m in AC_MODES if m in allowed_modes]  # increasing recompute
    lower = {}
    upper = float("inf")
    for i in indices:
        p = priced[i]
        if p.pipeline is not None:
            lower[i] = p.seconds_per_token({})
            upper = min(upper, lower[i])
            continue
        t, mt = p.terms, p.memory
        L = p.n_layers
        room = p.tensor_budget_bytes - (mt.static_bytes + mt.root_unsharded_bytes + mt.forward_block_bytes
                                        + mt.root_activation_bytes + mt.loss_working_bytes)
        recompute_lp, mixes = _lp_vertices(L, room, mt.layer.saved, t.recompute_s, order)
        if recompute_lp is None:
            lower[i] = float("inf")
            continue
        micro = t.base_s + max(t.fsdp_comm_s - t.hiding_compute_s, recompute_lp, 0.0)
        lower[i] = (t.grad_accum_steps * micro + t.optimizer_s) / p.tokens_per_gpu_step
        if lower[i] >= upper:
            continue
        for counts in mixes:
            for bump in range(0, 4):
                trial = _shift_heavier(counts, order, bump)
                if trial is not None and p.counts_fit(trial):
                    upper = min(upper, p.seconds_per_token(trial))
                    break
        heavy = _uniform(order[-1], L)
        if p.counts_fit(heavy):
            upper = min(upper, p.seconds_per_token(heavy))
    return [i for i in indices if lower[i] <= upper * (1 + 1e-9)]


def _lp_vertices(n_layers: int, room: float, saved: dict[str, float], recompute: dict[str, float],
                 order: list[str]) -> tuple[float | None, list[dict[str, int]]]:
    """Min recompute seconds of the LP relaxation, and integer mixes rounded from its vertices."""
    best = None
    mixes = []
    for a_index, a in enumerate(order):
        if n_layers * saved[a] <= room:
            value = n_layers * recompute[a]
            best = value if best is None else min(best, value)
            mixes.append({m: (n_layers if m == a else 0) for m in AC_MODES})
        for b in order[a_index + 1:]:
            # n_a + n_b = L, n_a A_a + n_b A_b = room, with n_b the heavier-saving mode
            if saved[a] <= saved[b]:
                continue
            n_b = (n_layers * saved[a] - room) / (saved[a] - saved[b])
            if 0 <= n_b <= n_layers:
                value = (n_layers - n_b) * recompute[a] + n_b * recompute[b]
                best = value if best is None else min(best, value)
                k = min(n_layers, math.ceil(n_b - 1e-9))
                mixes.append({m: (n_layers - k if m == a else k if m == b else 0) for m in AC_MODES})
    return best, mixes


def _shift_heavier(counts: dict[str, int], order: list[str], steps: int) -> dict[str, int] | None:
    """Move ``steps`` layers from the lightest-recompute mode in use to the next heavier one."""
    counts = dict(counts)
    for _ in range(steps):
        for k, mode in enumerate(order[:-1]):
            if counts.get(mode, 0) > 0:
                counts[mode] -= 1
                counts[order[k + 1]] = counts.get(order[k + 1], 0) + 1
                break
        else:
            return None
    return counts


def _drop_identical(priced: list[PricedCandidate], indices: list[int]) -> list[int]:
    """Keep one of each set of candidates the cost model cannot tell apart (same memory
    and time terms, same tokens per step): the solver would only break ties among them."""
    seen: dict[tuple, int] = {}
    for i in indices:
        p = priced[i]
        key = (repr(p.memory), repr(p.time), p.tokens_per_gpu_step, p.tensor_budget_bytes, repr(p.pipeline),
               p.candidate if p.pipeline is not None else None)
        seen.setdefault(key, i)
    return sorted(seen.values())


def _uniform(mode: str, n_layers: int) -> dict[str, int]:
    counts = {m: 0 for m in AC_MODES}
    counts[mode] = n_layers
    return counts
