"""The ILP's memory constraints against a per-layer walk of the step's phases.

For every way to split a model's layers into full / selective / none (laid out in that
order), the constraints the solver sees must accept the split exactly when the largest
phase of ``MemoryTerms.phases`` that depends on the split - which walks the layers one at a time,
sharing no code with the constraints - fits the tensor budget. Budgets sit just above and
just below each split's own peak, so a constraint that drops a term (a working set, a
layer's saved activations, a gradient shard) or adds one is caught at the split where it
binds.
"""

from dataclasses import replace

import pulp
import pytest

from autoplan.ilp import _solver, price
from autoplan.ilp_memory import add_memory_constraints
from autoplan.search import build_search_space
from cost_models.executors import EXECUTOR_PROFILES
from cost_models.specs import MODEL_PRESETS, resolve_gpu

GPU = resolve_gpu("h100")
K = 1024


# Phases whose bytes do not depend on the AC split (the end-of-backward reduce and the
# optimizer step): a candidate they do not fit is dropped when it is priced.
SPLIT_FREE_PHASES = ("root_reduce", "optimizer", "embedding_backward")


def _walk_peak(memory, counts) -> float:
    """Largest phase that depends on the split (tensor bytes, no NCCL buffers)."""
    modes = ("full",) * counts["full"] + ("selective",) * counts["selective"] + ("none",) * counts["none"]
    phases = memory.phases(modes)
    return max(sum(v for k, v in phase.items() if k != "comm_buffers")
               for name, phase in phases.items() if name not in SPLIT_FREE_PHASES)


def _accepts(priced, counts) -> bool:
    prob = pulp.LpProblem("check", pulp.LpMinimize)
    x = prob.add_variable("x", lowBound=1, upBound=1)
    n = {m: prob.add_variable(f"n_{m}", lowBound=counts[m], upBound=counts[m]) for m in counts}
    u = {m: prob.add_variable(f"u_{m}", lowBound=int(counts[m] > 0), upBound=int(counts[m] > 0)) for m in counts}
    add_memory_constraints(prob, priced, x, n, u, 0)
    # The split is fixed; the constraints' own auxiliary variables (which runs are a single
    # block) are left to the solver, as in planning.
    prob += x
    prob.solve(_solver(10.0, 0.0))
    return prob.status == pulp.LpStatusOptimal


CASES = [
    (replace(MODEL_PRESETS["llama3-8b"], n_layers=5), 8, 256 * K, {"dp_shard": 8}),
    (replace(MODEL_PRESETS["llama3-8b"], n_layers=5), 8, 128 * K, {"dp_shard": 4, "cp": 2}),
    (replace(MODEL_PRESETS["llama3.2-1b"], n_layers=4), 8, 512 * K, {"dp_shard": 2, "cp": 2, "tp": 2}),
    (replace(MODEL_PRESETS["llama3-70b"], n_layers=3), 16, 64 * K, {"dp_shard": 2, "tp": 8}),
    # TP only (no FSDP sharding): a block's fp32 grads outweigh a gathered bf16 block, so
    # block 0's backward binds, where one block fewer is gathered (a single full block
    # at the bottom is priced as block 0 only through the ILP's alone_bottom).
    (replace(MODEL_PRESETS["llama3-70b"], n_layers=3), 8, 16 * K, {"tp": 8}),
    # Short sequences: the loss phase binds (its constraint carries the last block's gathered
    # params); two blocks of TP 8: every run is an end, and block 0's backward binds too.
    (replace(MODEL_PRESETS["llama3-8b"], n_layers=4), 8, 4 * K, {"dp_shard": 8}),
    (replace(MODEL_PRESETS["llama3-70b"], n_layers=2), 8, 8 * K, {"tp": 8}),
    # Found by a search over cases for splits where one side of a run binds (mutation
    # testing: benchmarks/mutation_results.md). Torchtitan's profile keeps the last block
    # gathered through the loss, which binds here:
    (replace(MODEL_PRESETS["llama3-70b"], n_layers=2), 8, 64 * K, {"dp_shard": 2, "tp": 4}, "torchtitan"),
    # ... a none run whose bottom side binds (saved bytes per block below a block's grads):
    (replace(MODEL_PRESETS["llama3-70b"], n_layers=3), 8, 4 * K, {"tp": 4, "cp": 2}, "torchtitan"),
    # ... and a full run's top with a none run directly above it (no selective between).
    (replace(MODEL_PRESETS["llama3-70b"], n_layers=3), 8, 256 * K, {"cp": 8}),
    # Two blocks under torchtitan's profile with TP 8 at a short length (every run is a
    # single block: alone_top / alone_bottom carry the ends).
    (replace(MODEL_PRESETS["llama3.2-1b"], n_layers=2), 16, 2 * K, {"tp": 8, "dp_shard": 2}, "torchtitan"),
]
CASES = [case + ("autoplan",) * (5 - len(case)) for case in CASES]  # the executor profile


@pytest.mark.parametrize("model, gpus, seq, pins, executor", CASES)
def test_constraints_accept_exactly_the_splits_that_fit(model, gpus, seq, pins, executor):
    space = build_search_space(model, GPU, [gpus], [seq], 8, pins, batches=(1,))
    assert space.candidates, space.rejections[:3]
    priced = price(model, GPU, space.candidates[0], EXECUTOR_PROFILES[executor], 8, 10 * GPU.memory_bytes)
    L = model.n_layers
    checked = 0
    for n_full in range(L + 1):
        for n_sel in range(L + 1 - n_full):
            counts = {"full": n_full, "selective": n_sel, "none": L - n_full - n_sel}
            peak = _walk_peak(priced.memory, counts)
            above = replace(priced, tensor_budget_bytes=peak * (1 + 1e-6))
            below = replace(priced, tensor_budget_bytes=peak * (1 - 1e-6))
            assert _accepts(above, counts), f"{counts}: fits at {peak / 2**30:.3f} GiB, constraints refuse it"
            assert not _accepts(below, counts), f"{counts}: exceeds the budget, constraints accept it"
            checked += 1
    assert checked == (L + 1) * (L + 2) // 2


@pytest.mark.parametrize("allowed", [("full", "selective"), ("selective", "none"), ("full", "none"), ("none",),
                                     ("full",)])
@pytest.mark.parametrize("case", [0, 5, 6])
def test_constraints_with_some_modes_ruled_out(allowed, case):
    """``--ac`` can rule modes out: the ILP then has no variables for them (the constraints
    read a plain 0 there). The constraints must still accept exactly the splits over the
    allowed modes that fit."""
    model, gpus, seq, pins = CASES[case][:4]
    space = build_search_space(model, GPU, [gpus], [seq], 8, pins, batches=(1,))
    priced = price(model, GPU, space.candidates[0], EXECUTOR_PROFILES["autoplan"], 8, 10 * GPU.memory_bytes,
                   None, allowed)
    L = model.n_layers
    splits = [dict(zip(allowed, split)) for split in _compositions(L, len(allowed))]
    for split in splits:
        counts = {m: split.get(m, 0) for m in ("full", "selective", "none")}
        peak = _walk_peak(priced.memory, counts)
        assert _accepts(replace(priced, tensor_budget_bytes=peak * (1 + 1e-6)), split), split
        assert not _accepts(replace(priced, tensor_budget_bytes=peak * (1 - 1e-6)), split), split


def _compositions(total: int, parts: int):
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)
