"""The planner's choice equals a brute-force enumeration over the same cost model.

The brute force prices every candidate with every per-layer AC assignment through
``estimate_step`` (the per-layer phase walk, not the ILP's closed-form constraints), so
it checks the integer program's encoding as well as its optimization.
"""

import random
from dataclasses import replace

import pytest

from autoplan.planner import PlanRequest, make_plan
from autoplan.units import MemoryHeadroom
from autoplan.search import build_search_space
from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.specs import MODEL_PRESETS, ClusterSpec, resolve_gpu
from cost_models.step import estimate_step

NO_HEADROOM = MemoryHeadroom()

SHAPES = [replace(MODEL_PRESETS["llama3-8b"], name="8b-5layer", n_layers=5),
          replace(MODEL_PRESETS["llama3.2-1b"], name="1b-4layer", n_layers=4),
          replace(MODEL_PRESETS["llama3-70b"], name="70b-3layer", n_layers=3)]


def _best_brute_force(model, gpu, gpu_counts, seq_lens, capacity, allowed=("none", "selective", "full"),
                      batches=(1, 2, 4, 8)):
    """(seconds per token, candidate, counts) of the fastest fitting plan, or None."""
    space = build_search_space(model, gpu, gpu_counts, seq_lens, batches=batches)
    best = None
    L = model.n_layers
    for cand in space.candidates:
        cluster = ClusterSpec(gpu, cand.num_gpus)
        for n_full in range(L + 1):
            for n_sel in range(L + 1 - n_full):
                counts = {"full": n_full, "selective": n_sel, "none": L - n_full - n_sel}
                if any(counts[m] for m in counts if m not in allowed):
                    continue
                cfg = TrainConfig(cand.parallelism, cand.seq_len, cand.local_batch_size, cand.grad_accum_steps,
                                  ACPolicy.mix(L, n_full, n_sel), cand.cp_impl, cand.mesh_order)
                est = estimate_step(model, cluster, cfg)
                if est.peak_memory_bytes > capacity:
                    continue
                tokens = cand.seq_len * cand.local_batch_size * cand.grad_accum_steps / (
                    cand.parallelism.cp * cand.parallelism.tp)
                score = est.step_time_s / tokens
                if best is None or score < best[0] - 1e-15:
                    best = (score, cand, counts)
    return best


def _cases(seed, n):
    """Random cases whose memory cap lands between the all-full and all-none peaks of a
    plain FSDP layout, so checkpointing decisions and the cap actually bind."""
    rng = random.Random(seed)
    gpu = resolve_gpu("h100")
    for _ in range(n):
        model, gpus, seq = rng.choice(SHAPES), rng.choice([4, 8, 16]), rng.choice([4096, 16384, 65536, 131072])
        cfg = lambda mode: TrainConfig(Parallelism(dp_shard=gpus), seq, ac=ACPolicy.uniform(mode, model.n_layers))
        cluster = ClusterSpec(gpu, gpus)
        low = estimate_step(model, cluster, cfg("full")).peak_memory_bytes
        high = estimate_step(model, cluster, cfg("none")).peak_memory_bytes
        yield model, gpus, seq, rng.uniform(0.8 * low, 1.05 * high)


@pytest.mark.parametrize("model, gpus, seq, capacity", list(_cases(1, 12)))
def test_throughput_choice_matches_brute_force(model, gpus, seq, capacity):
    gpu = resolve_gpu("h100")
    result = make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=gpus, target_seq_len=seq, top_k=0,
                                   memory_capacity_bytes=capacity, memory_headroom=NO_HEADROOM))
    brute = _best_brute_force(model, gpu, [gpus], [seq], capacity)
    if brute is None:
        assert result.plan is None
        return
    assert result.plan is not None
    tokens = result.plan.seq_len * result.plan.local_batch_size * result.plan.grad_accum_steps / (
        result.plan.parallelism.cp * result.plan.parallelism.tp)
    assert result.proven_optimal
    # Within the solver's relative gap (1e-4) of the true optimum, never better than it.
    assert brute[0] * (1 - 1e-9) <= result.estimate.step_time_s / tokens <= brute[0] * (1 + 1e-4)
    assert result.estimate.peak_memory_bytes <= capacity


@pytest.mark.parametrize("model, gpus, seq, capacity", list(_cases(2, 6)))
def test_max_seqlen_choice_matches_brute_force(model, gpus, seq, capacity):
    gpu = resolve_gpu("h100")
    result = make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=gpus, objective="max-seqlen", top_k=0,
                                   memory_capacity_bytes=capacity, memory_headroom=NO_HEADROOM))
    # Certificate against the cost model: the answer fits (full AC, brute force), and for
    # every layout the next length it can run does not (each layout's memory grows with
    # the length, so nothing longer fits either).
    if result.plan is None:
        assert _best_brute_force(model, gpu, [gpus], [1024], capacity, ("full",)) is None
        return
    longest = result.plan.seq_len
    assert longest % 1024 == 0
    assert _best_brute_force(model, gpu, [gpus], [longest], capacity, ("full",)) is not None
    # On <= 16 GPUs every layout runs every multiple of 1k (2 x cp x tp <= 32 divides 1024)
    assert _best_brute_force(model, gpu, [gpus], [longest + 1024], capacity, ("full",), batches=(1,)) is None
    brute = _best_brute_force(model, gpu, [gpus], [longest], capacity)
    tokens = longest * result.plan.local_batch_size * result.plan.grad_accum_steps / (
        result.plan.parallelism.cp * result.plan.parallelism.tp)
    assert result.proven_optimal
    assert brute[0] * (1 - 1e-9) <= result.estimate.step_time_s / tokens <= brute[0] * (1 + 1e-4)


@pytest.mark.parametrize("model, gpus, seq, capacity", list(_cases(3, 6)))
def test_min_gpus_choice_matches_brute_force(model, gpus, seq, capacity):
    gpu = resolve_gpu("h100")
    upper = 32
    result = make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=upper, target_seq_len=seq, objective="min-gpus",
                                   top_k=0, memory_capacity_bytes=capacity, memory_headroom=NO_HEADROOM))
    fewest = None
    for count in (1, 2, 4, 8, 16, 24, 32):
        if _best_brute_force(model, gpu, [count], [seq], capacity, ("full",)) is not None:
            fewest = count
            break
    if fewest is None:
        assert result.plan is None
        return
    assert result.plan.parallelism.world_size == fewest
    brute = _best_brute_force(model, gpu, [fewest], [seq], capacity)
    tokens = seq * result.plan.local_batch_size * result.plan.grad_accum_steps / (
        result.plan.parallelism.cp * result.plan.parallelism.tp)
    assert result.proven_optimal
    assert brute[0] * (1 - 1e-9) <= result.estimate.step_time_s / tokens <= brute[0] * (1 + 1e-4)


@pytest.mark.parametrize("model, gpus, seq, capacity", list(_cases(4, 4)))
@pytest.mark.parametrize("headroom", [MemoryHeadroom(fraction=0.05), MemoryHeadroom(fixed_bytes=3 * 2**30)])
def test_headroom_is_respected_by_every_objective(model, gpus, seq, capacity, headroom):
    """With a headroom, each objective answers what brute force answers on the usable memory
    (capacity less the headroom), and no plan's peak enters the headroom."""
    gpu = resolve_gpu("h100")
    usable = capacity - headroom.bytes_of(capacity)
    request = dict(model=model, gpu=gpu, top_k=0, memory_capacity_bytes=capacity, memory_headroom=headroom)

    fast = make_plan(PlanRequest(num_gpus=gpus, target_seq_len=seq, **request))
    brute = _best_brute_force(model, gpu, [gpus], [seq], usable)
    assert (fast.plan is None) == (brute is None)
    if brute is not None:
        tokens = seq * fast.plan.local_batch_size * fast.plan.grad_accum_steps / (
            fast.plan.parallelism.cp * fast.plan.parallelism.tp)
        assert fast.proven_optimal
        assert brute[0] * (1 - 1e-9) <= fast.estimate.step_time_s / tokens <= brute[0] * (1 + 1e-4)
        assert fast.estimate.peak_memory_bytes <= usable
        assert fast.plan.predicted.memory_usable_bytes == pytest.approx(usable)

    fewest = make_plan(PlanRequest(num_gpus=16, target_seq_len=seq, objective="min-gpus", **request))
    expected = next((n for n in (1, 2, 4, 8, 16) if _best_brute_force(model, gpu, [n], [seq], usable, ("full",))),
                    None)
    assert (fewest.plan.parallelism.world_size if fewest.plan else None) == expected
    if fewest.plan:
        assert fewest.estimate.peak_memory_bytes <= usable

    longest = make_plan(PlanRequest(num_gpus=gpus, objective="max-seqlen", **request))
    if longest.plan:
        assert longest.estimate.peak_memory_bytes <= usable
        assert _best_brute_force(model, gpu, [gpus], [longest.plan.seq_len], usable, ("full",)) is not None


@pytest.mark.parametrize("model, gpus, seq, capacity", list(_cases(5, 4)))
@pytest.mark.parametrize("ac", ["selective", "none", "full"])
def test_one_ac_mode_choice_matches_brute_force(model, gpus, seq, capacity, ac):
    """--ac MODE: every layer in that mode. The pre-solve filter and the pruning bounds
    must use that mode's memory and recompute, not another's."""
    gpu = resolve_gpu("h100")
    result = make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=gpus, target_seq_len=seq, top_k=0, ac=ac,
                                   memory_capacity_bytes=capacity, memory_headroom=NO_HEADROOM))
    brute = _best_brute_force(model, gpu, [gpus], [seq], capacity, (ac,))
    assert (result.plan is None) == (brute is None)
    if brute is None:
        return
    assert result.plan.activation_checkpoint.layer_modes(model.n_layers) == (ac,) * model.n_layers
    tokens = result.plan.seq_len * result.plan.local_batch_size * result.plan.grad_accum_steps / (
        result.plan.parallelism.cp * result.plan.parallelism.tp)
    assert result.proven_optimal
    assert brute[0] * (1 - 1e-9) <= result.estimate.step_time_s / tokens <= brute[0] * (1 + 1e-4)
