"""max-seqlen answers the longest length that fits, at a runnable granularity.

Independent of the planner's bisection: every layout of the GPU count (degrees by brute
force, the rules from cost_models.rules through TrainConfig), every multiple of 1k up
to a bound, full activation checkpointing (the lightest), priced by ``estimate_step``
and compared with the memory capacity. The answer must be the longest length that fits
there, and no layout fits answer + its granularity.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from autoplan.planner import PlanRequest, make_plan
from autoplan.search import divisors
from autoplan.units import MemoryHeadroom
from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.memory import memory_terms
from cost_models.rules import layout_violations
from cost_models.specs import MODEL_PRESETS, ClusterSpec, SpecError, resolve_gpu
from cost_models.step import estimate_step

GPU = resolve_gpu("h100")
K = 1024
SMALL = replace(MODEL_PRESETS["llama3.2-1b"], name="1b-2layer", n_layers=2)


def _layouts(gpus: int, per_node: int):
    """Every (dp_replicate, dp_shard, cp, tp) with product ``gpus``; replicate only across
    nodes (the planner's search policy: replicating inside a node only adds memory)."""
    for dp_rep, dp_shard, cp, tp in itertools.product(range(1, gpus + 1), repeat=4):
        if dp_rep * dp_shard * cp * tp == gpus and (dp_rep == 1 or dp_rep <= gpus // per_node):
            for impl in (("allgather-kv", "ring-allgather") if cp > 1 else ("none",)):
                yield Parallelism(dp_rep, dp_shard, cp, tp), impl


def _fits(model, gpus, per_node, seq, capacity, par, impl) -> bool | None:
    """None when the layout cannot run this length at all."""
    try:
        cfg = TrainConfig(par, seq, 1, 1, ACPolicy.uniform("full", model.n_layers), impl)
    except SpecError:
        return None
    cluster = ClusterSpec(GPU, gpus, per_node)
    if layout_violations(model, cfg, cluster):
        return None
    return estimate_step(model, cluster, cfg).peak_memory_bytes <= capacity


CASES = [  # (model, gpus, per node, capacity): answers off the old 2^k / 1.5 x 2^k grid
    (SMALL, 1, 1, 30e9),
    (SMALL, 4, 4, 22e9),
    (SMALL, 6, 6, 25e9),  # answers with cp = 6: granularity lcm(1024, 2 x 6) = 3k
]


@pytest.mark.parametrize("model, gpus, per_node, capacity", CASES)
def test_longest_is_the_longest_that_fits_on_a_fine_grid(model, gpus, per_node, capacity):
    result = make_plan(PlanRequest(model=model, gpu=GPU, num_gpus=gpus, gpus_per_node=per_node,
                                   objective="max-seqlen", top_k=0, memory_capacity_bytes=capacity,
                                   memory_headroom=MemoryHeadroom()))
    assert result.plan is not None
    answer = result.plan.seq_len
    assert answer % K == 0 and not result.seq_len_capped
    bound = 2 * answer + 64 * K
    longest = 0
    for par, impl in _layouts(gpus, per_node):
        for seq in range(K, bound + 1, K):
            if _fits(model, gpus, per_node, seq, capacity, par, impl):
                longest = max(longest, seq)
    assert longest < bound  # the scan went past every length that fits
    assert answer == longest
    par = result.plan.parallelism.to_spec()
    step = math.lcm(K, 2 * par.cp if par.cp > 1 else 1, par.cp * par.tp)  # what the layout can run
    assert _fits(model, gpus, per_node, answer, capacity, par, result.plan.cp_impl)
    assert not _fits(model, gpus, per_node, answer + step, capacity, par, result.plan.cp_impl)


def test_cap_and_impractical_step_are_said():
    """Nothing stops llama3-8b on 10^8 GPUs below 16M: the answer is the cap, said as such,
    and its step (over an hour) is flagged."""
    request = PlanRequest(model=MODEL_PRESETS["llama3-8b"], gpu=GPU, num_gpus=100_000_000, gpus_per_node=8,
                          objective="max-seqlen", top_k=0)
    result = make_plan(request)
    assert result.plan.seq_len == 16 * K * K and result.seq_len_capped
    assert result.estimate.step_time_s > 300 and result.impractical
    text = "\n".join(result.explanation)
    assert "16M or more" in text and "impractical" in text


@pytest.mark.parametrize("n", [1, 2, 12, 36, 97, 360, 1000, 1024, 7919 * 2])
def test_divisors_match_a_linear_scan(n):
    assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("cp, tp, seq", [(1, 1, 8 * K), (2, 2, 16 * K), (4, 8, 32 * K), (8, 4, 8 * K)])
def test_unreplicated_split_needs_the_least_memory(cp, tp, seq):
    """The dominance FitCheck.any_fits relies on: on 64 GPUs, for the same cp and tp,
    dp_shard = every data-parallel rank needs no more memory than any replicated split."""
    model = MODEL_PRESETS["llama3-8b"]
    dp = 64 // (cp * tp)
    impl = "allgather-kv" if cp > 1 else "none"

    def need(dp_rep):
        mem = memory_terms(model, TrainConfig(Parallelism(dp_rep, dp // dp_rep, cp, tp), seq, 1, 1, None, impl))
        peak = mem.peak_tensor_bytes_for_counts(model.n_layers, 0, 0)
        return peak * (1 + mem.fragmentation) + mem.fixed_overhead_bytes + mem.comm_buffer_bytes

    assert all(need(1) <= need(r) for r in divisors(dp) if r > 1)
