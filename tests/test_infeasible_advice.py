"""When no plan fits, the advice: the layout that needs least memory and how much, the
GPU count where the target fits, the longest length that fits here, and what to relax.

References are independent of the planner: every layout of a GPU count by brute force
(degrees, CP implementations, the rules through TrainConfig), each priced at full
activation checkpointing by ``estimate_step`` (the phase walk, not the planner's closed
form), the lengths by the max-seqlen objective (itself checked against a brute force in
tests/test_longest.py), and rule rejections counted by hand.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from autoplan.planner import PlanRequest, make_plan
from autoplan.units import MemoryHeadroom, format_tokens
from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.rules import layout_violations
from cost_models.specs import MODEL_PRESETS, ClusterSpec, SpecError, resolve_gpu
from cost_models.step import estimate_step

GPU = resolve_gpu("h100")
K = 1024
GiB = 2**30
SMALL = replace(MODEL_PRESETS["llama3.2-1b"], name="1b-2layer", n_layers=2)
TARGET = 512 * K
USABLE = 20 * GiB  # no headroom: capacity = usable
REQUEST = PlanRequest(SMALL, GPU, 2, gpus_per_node=2, target_seq_len=TARGET, memory_capacity_bytes=USABLE,
                      memory_headroom=MemoryHeadroom())


def _least_need(gpus: int, per_node: int, seq: int) -> tuple[float, Parallelism, str]:
    """The smallest full-AC peak of any runnable layout, and that layout."""
    best = None
    for dp_rep, dp_shard, cp, tp in itertools.product(range(1, gpus + 1), repeat=4):
        if dp_rep * dp_shard * cp * tp != gpus or dp_rep > max(1, gpus // per_node):
            continue
        for impl in (("allgather-kv", "ring-allgather") if cp > 1 else ("none",)):
            par = Parallelism(dp_rep, dp_shard, cp, tp)
            try:
                cfg = TrainConfig(par, seq, 1, 1, ACPolicy.uniform("full", SMALL.n_layers), impl)
            except SpecError:
                continue
            cluster = ClusterSpec(GPU, gpus, per_node)
            if layout_violations(SMALL, cfg, cluster):
                continue
            need = estimate_step(SMALL, cluster, cfg).peak_memory_bytes
            if best is None or need < best[0]:
                best = (need, par, impl)
    assert best is not None
    return best


@pytest.mark.parametrize("target, factor", [(TARGET, 4), (2048 * K, 16)])
def test_closest_layout_more_gpus_and_longest_length_against_brute_force(target, factor):
    result = make_plan(replace(REQUEST, target_seq_len=target))
    assert result.plan is None
    need, par, impl = _least_need(2, 2, target)
    assert need > USABLE
    closest, more, longest = result.explanation[:3]
    assert closest.startswith("no layout fits: the closest, ")
    assert f"cp={par.cp} tp={par.tp} {impl}" in closest
    assert closest.endswith(f"at seq_len {format_tokens(target)}, needs {need / GiB:.1f} GiB of 20.0 usable even "
                            "with full AC")
    # The fewest GPUs (doubling) where the lightest layout fits, and not on half as many.
    assert _least_need(2 * factor, 2, target)[0] <= USABLE < _least_need(factor, 2, target)[0]
    assert more == (f"the target fits on {2 * factor} GPUs ({factor}x): try --gpus {2 * factor} "
                    f"or --objective min-gpus --gpus {2 * factor}")
    answer = make_plan(replace(REQUEST, target_seq_len=None, objective="max-seqlen", top_k=0)).plan
    assert answer is not None and answer.seq_len < TARGET
    assert longest == f"on 2 GPUs the longest sequence that fits is {format_tokens(answer.seq_len)} " \
                      "(--objective max-seqlen)"


@pytest.mark.parametrize("target, factor", [(TARGET, 4), (2048 * K, 16)])
def test_min_gpus_says_how_many_it_needs_first(target, factor):
    result = make_plan(replace(REQUEST, objective="min-gpus", target_seq_len=target))
    assert result.plan is None
    assert _least_need(2 * factor, 2, target)[0] <= USABLE < _least_need(factor, 2, target)[0]
    assert result.explanation[0] == (f"needs more than 2 GPUs: the target fits on {2 * factor} ({factor}x); "
                                     f"try --objective min-gpus --gpus {2 * factor}")
    assert result.explanation[1].startswith("no layout fits: the closest, ")
    assert not any("longest sequence" in line for line in result.explanation)


def test_what_to_relax_is_said_only_when_it_was_set():
    plain = make_plan(REQUEST).explanation
    assert not any(line.startswith(("try --ac", "try fewer pins")) for line in plain)
    selective = make_plan(replace(REQUEST, ac="selective")).explanation
    assert "try --ac auto (full activation checkpointing lowers memory)" in selective
    pinned = make_plan(replace(REQUEST, fixed={"cp": 2})).explanation
    assert "try fewer pins than --fix cp=2" in pinned


def test_no_layout_passes_the_rules():
    # 3 GPUs with dp_shard pinned to 1: cp = 3 needs seq_len divisible by 6 (512k is not;
    # both CP implementations are rejected), tp = 3 does not divide 32 heads (one layout).
    result = make_plan(replace(REQUEST, num_gpus=3, gpus_per_node=3, fixed={"dp_shard": 1}))
    assert result.plan is None and result.candidates_priced == 0
    assert result.explanation[0] == "no layout passes the structural rules for this model and GPU count"
    assert "try fewer pins than --fix dp_shard=1" in result.explanation
    assert result.explanation[-1] == ("rejected 2 layout(s) before pricing: seq_len must be divisible by "
                                      "2 x cp = 6 (head-tail load balancing)")


def test_longest_with_a_pinned_global_batch_and_accumulation():
    # A global batch of 1M tokens in 2 accumulation steps: every plan runs 512k tokens per
    # step, so the longest sequence is 512k (batch 1, no data parallelism), which fits 4 GPUs.
    result = make_plan(PlanRequest(SMALL, GPU, 4, gpus_per_node=4, objective="max-seqlen", top_k=0,
                                   global_batch_tokens=2**20, fixed={"grad_accum_steps": 2}))
    assert result.plan is not None
    assert (result.plan.seq_len, result.plan.local_batch_size, result.plan.grad_accum_steps) == (512 * K, 1, 2)
    assert result.plan.parallelism.dp_replicate * result.plan.parallelism.dp_shard == 1


def test_an_unknown_ac_mode_is_refused_by_name():
    with pytest.raises(SpecError) as error:
        make_plan(replace(REQUEST, ac="most"))
    assert str(error.value) == "--ac 'most': use auto, none, selective or full"
