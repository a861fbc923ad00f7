"""The ILP's objective alone, with the exact pre-solve pruning switched off.

``_prune_by_bounds`` drops every candidate whose lower bound exceeds the best feasible
time, and its bounds are nearly tight, so the solver usually sees one or two
candidates: an objective that ignores gradient accumulation (``micro`` instead of
``accum x micro`` per step) then still lands on the right answer and survived the
seeded-bug run. Pruning is documented as exact (it never changes the optimum), so the
planner must give the same answer without it; with every candidate in the program, the
objective alone has to rank layouts that differ in accumulation steps. Reference: the
brute force of tests/test_planner_reference.py (``estimate_step`` over every layout and
AC split, sharing no code with the ILP).
"""

from dataclasses import replace

import pytest

import autoplan.ilp as ilp
from cost_models.specs import MODEL_PRESETS
from test_planner_reference import GAP, GPU, K, _planned, _reference_best

CASES = [  # pinned global batches: layouts need 2 to 16 accumulation steps
    (replace(MODEL_PRESETS["llama3-8b"], n_layers=3), 16, 16 * K, 0.5, 8),
    (replace(MODEL_PRESETS["llama3-70b"], n_layers=3), 16, 4 * K, 0.5, 8),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, gpus, seq, capacity_fraction, steps_of_batch", CASES)
def test_objective_counts_accumulation_without_pruning(model, gpus, seq, capacity_fraction, steps_of_batch,
                                                       monkeypatch):
    capacity = capacity_fraction * GPU.memory_bytes
    tokens = gpus * seq * steps_of_batch
    reference = _reference_best(model, gpus, seq, capacity, tokens)
    assert reference is not None
    pruned_result, pruned = _planned(model, gpus, seq, capacity, tokens)
    seen = []

    def keep_all(priced, indices, allowed_modes):
        seen.append(sorted({priced[i].candidate.grad_accum_steps for i in indices}))
        return indices

    monkeypatch.setattr(ilp, "_prune_by_bounds", keep_all)
    result, score = _planned(model, gpus, seq, capacity, tokens)
    assert seen and len(seen[-1]) >= 3, seen  # the program really holds several accumulation counts
    assert result.plan.global_batch_tokens == tokens
    for value in (score, pruned):
        assert reference[0] * (1 - 1e-9) <= value <= reference[0] * (1 + GAP), reference[1]
