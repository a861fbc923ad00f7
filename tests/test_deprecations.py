"""Planning emits no DeprecationWarning (pulp's 4.0 migration warnings included).

Planning never imports torch, so whatever is recorded here comes from autoplan, the
cost models, or the libraries they call (pulp, HiGHS, pydantic, yaml).
"""

from __future__ import annotations

import warnings

import pytest

from autoplan.capacity import capacity
from autoplan.planner import PlanRequest, make_plan
from cost_models.specs import resolve_gpu, resolve_model


@pytest.mark.parametrize("objective,target", [("throughput", 8192), ("max-seqlen", None), ("min-gpus", 8192)])
def test_planning_emits_no_deprecation_warning(objective, target):
    request = PlanRequest(model=resolve_model("debug"), gpu=resolve_gpu("h100"), num_gpus=16, gpus_per_node=8,
                          target_seq_len=target, objective=objective, top_k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make_plan(request)
        plan = result.plan
        assert plan is not None
        plan.to_yaml()
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecations == []


def test_capacity_emits_no_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capacity(resolve_model("debug"), resolve_gpu("h100"), 8192, 64, 8)
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
