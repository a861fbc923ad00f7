"""The ILP's memory constraints at splits where each backward phase is the binding one.

tests/test_ilp_memory.py checks the constraints against a per-layer walk of
``MemoryTerms.phases`` (code shared with none of the constraints), but its long
sequences let the loss phase dominate, so a constraint could drop a backward-phase
term unseen: the seeded bug "the 'none on top' phase without its working set" survived
it. Short sequences of a large model make the last non-checkpointed layer's backward
(every layer's saved activations + that layer's recompute working set) the peak; this
file first checks that it is, then that the constraints accept exactly the splits that
fit budgets just above and just below the walked peak.
"""

from dataclasses import replace

import pytest

from autoplan.ilp import price
from autoplan.search import build_search_space
from cost_models.executors import EXECUTOR_PROFILES
from cost_models.specs import MODEL_PRESETS
from test_ilp_memory import GPU, K, SPLIT_FREE_PHASES, _accepts, _walk_peak

L70B = MODEL_PRESETS["llama3-70b"]
CASES = [
    (replace(L70B, n_layers=3), 4 * K, {"dp_shard": 8}, "autoplan"),
    (replace(L70B, n_layers=3), 4 * K, {"dp_shard": 4, "cp": 2}, "torchtitan"),
    (replace(L70B, n_layers=2), 8 * K, {"dp_shard": 4, "cp": 2}, "autoplan"),
]


@pytest.mark.parametrize("model, seq, pins, executor", CASES)
def test_backward_phases_bind_and_constraints_match_the_walk(model, seq, pins, executor):
    space = build_search_space(model, GPU, [8], [seq], 8, pins, batches=(1,))
    assert space.candidates, space.rejections[:3]
    priced = price(model, GPU, space.candidates[0], EXECUTOR_PROFILES[executor], 8, 10 * GPU.memory_bytes)
    L = model.n_layers
    # The case is worth having: with no checkpointing, the backward of the last layer
    # (saved activations of every layer + its working set) is the largest phase.
    memory = priced.memory
    phases = memory.phases(("none",) * L)
    sizes = {name: sum(v for k, v in phase.items() if k != "comm_buffers")
             for name, phase in phases.items() if name not in SPLIT_FREE_PHASES}
    assert max(sizes, key=sizes.get) == "backward", sizes
    # The top block, or the one below it: that one also holds the top block's reduce-
    # scatter input (a 70B block's grads in fp32: 3.2 GiB without TP).
    top, below = memory.top_layer_working["none"], memory.layer.working["none"]
    assert phases["backward"]["recompute_working"] in (top, below) and top > 0
    grads = phases["backward"]["grads"]
    assert grads == (0 if phases["backward"]["recompute_working"] == top else memory.sharded_grad_bytes_per_layer)
    for n_full in range(L + 1):
        for n_sel in range(L + 1 - n_full):
            counts = {"full": n_full, "selective": n_sel, "none": L - n_full - n_sel}
            peak = _walk_peak(memory, counts)
            above = replace(priced, tensor_budget_bytes=peak * (1 + 1e-6))
            below = replace(priced, tensor_budget_bytes=peak * (1 - 1e-6))
            assert _accepts(above, counts), f"{counts}: fits at {peak / 2**30:.3f} GiB, constraints refuse it"
            assert not _accepts(below, counts), f"{counts}: exceeds the budget, constraints accept it"
