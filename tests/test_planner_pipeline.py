"""The planner's pipeline choices: against a brute force written here, pins, explanations.

The brute force enumerates the pipeline search space as the README states it - pp pinned,
inner degrees dp_shard x cp x tp over the rest (dp_replicate 1, tp within a node and
dividing the heads), 1F1B or interleaved with 2 chunks per rank, pp or 2 pp micro-batches
of 1, 2, 4 or 8 sequences, and every per-rank AC mix of two modes (the first n layers of
each rank in one, the rest in the other) - and prices each with ``estimate_step``. It uses
neither ``build_search_space`` / ``pipeline_candidates`` nor the planner's bisection.
"""

import random
from dataclasses import replace

import pytest

from autoplan.fix import parse_fix
from autoplan.planner import PlanRequest, make_plan
from autoplan.units import MemoryHeadroom
from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.specs import MODEL_PRESETS, ClusterSpec, resolve_gpu
from cost_models.step import estimate_step

NO_HEADROOM = MemoryHeadroom()
H100 = resolve_gpu("h100")
SHAPES = [replace(MODEL_PRESETS["llama3-8b"], name="8b-8layer", n_layers=8),
          replace(MODEL_PRESETS["llama3-70b"], name="70b-4layer", n_layers=4),
          replace(MODEL_PRESETS["llama3-8b"], name="8b-6layer", n_layers=6)]
ORDER = ("full", "selective", "none")  # most recompute first


def _rank_layers(n_layers, pp, v):
    """Earlier stages take the remainder; rank r holds stages r, r + pp, ..."""
    stages, start = [], 0
    for s in range(pp * v):
        size = n_layers // (pp * v) + (1 if s < n_layers % (pp * v) else 0)
        stages.append(list(range(start, start + size)))
        start += size
    return [[i for c in range(v) for i in stages[r + c * pp]] for r in range(pp)]


def _policy(n_layers, pp, v, heavy, light, n):
    modes = [None] * n_layers
    for layers in _rank_layers(n_layers, pp, v):
        for j, i in enumerate(layers):
            modes[i] = heavy if j < n else light
    return ACPolicy(tuple(modes))


def _brute(model, gpus, seq, pp, usable, allowed=ORDER):
    best = None
    inner = gpus // pp
    L = model.n_layers
    for tp in (1, 2, 4, 8):
        if inner % tp or tp > min(8, gpus) or model.n_heads % tp or model.n_kv_heads % tp or model.ffn_dim % tp:
            continue
        for cp in [c for c in range(1, inner // tp + 1) if (inner // tp) % c == 0]:
            if cp > 1 and seq % (2 * cp):
                continue
            par = Parallelism(1, inner // tp // cp, cp, tp, pp)
            for schedule, v in (("1f1b", 1), ("interleaved-1f1b", 2)):
                if pp * v > L:
                    continue
                k = max(len(r) for r in _rank_layers(L, pp, v))
                for m in (pp, 2 * pp):
                    for b in (1, 2, 4, 8):
                        if b > 1 and b * seq // cp > 32768 or (b * seq // cp) % tp:
                            continue
                        mixes = {(a, c, n) for i, a in enumerate(allowed) for c in allowed[i + 1:]
                                 for n in range(k + 1)} | {(a, a, k) for a in allowed}
                        for heavy, light, n in mixes:
                            cfg = TrainConfig(par, seq, m * b, 1, _policy(L, pp, v, heavy, light, n),
                                              "allgather-kv" if cp > 1 else "none", pp_schedule=schedule,
                                              pp_microbatches=m, pp_virtual_stages=v)
                            est = estimate_step(model, ClusterSpec(H100, gpus), cfg)
                            if est.peak_memory_bytes > usable:
                                continue
                            score = est.step_time_s / (seq * m * b / (cp * tp * pp))
                            if best is None or score < best[0]:
                                best = (score, cfg)
    return best


def _cases(seed, n):
    rng = random.Random(seed)
    for _ in range(n):
        model, gpus, seq = rng.choice(SHAPES), rng.choice([8, 16]), rng.choice([4096, 16384])
        pp = rng.choice([2, 4])
        # A cap between the full-AC and no-AC peaks of one pipeline layout: AC and layout choices bind.
        par = Parallelism(dp_shard=gpus // pp, pp=pp)
        peaks = [estimate_step(model, ClusterSpec(H100, gpus),
                               TrainConfig(par, seq, pp, 1, ACPolicy.uniform(mode, model.n_layers), "none",
                                           pp_microbatches=pp)).peak_memory_bytes for mode in ("full", "none")]
        yield model, gpus, seq, pp, rng.uniform(0.7 * peaks[0], 1.1 * peaks[1])


@pytest.mark.parametrize("model, gpus, seq, pp, capacity", list(_cases(7, 8)))
def test_pinned_pp_choice_matches_brute_force(model, gpus, seq, pp, capacity):
    result = make_plan(PlanRequest(model=model, gpu=H100, num_gpus=gpus, target_seq_len=seq, fixed={"pp": pp},
                                   top_k=0, memory_capacity_bytes=capacity, memory_headroom=NO_HEADROOM))
    brute = _brute(model, gpus, seq, pp, capacity)
    if brute is None:
        assert result.plan is None
        return
    assert result.plan is not None and result.plan.parallelism.pp == pp
    p = result.plan.parallelism
    tokens = result.plan.seq_len * result.plan.local_batch_size / (p.cp * p.tp * p.pp)
    assert brute[0] * (1 - 1e-9) <= result.estimate.step_time_s / tokens <= brute[0] * (1 + 1e-4)
    assert result.estimate.peak_memory_bytes <= capacity
    assert max(result.estimate.stage_peak_bytes) <= capacity


def test_pins_are_respected():
    model = SHAPES[0]
    fixed = parse_fix("pp=2,schedule=gpipe,microbatches=4,tp=2")
    assert fixed == {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 4, "tp": 2}
    result = make_plan(PlanRequest(model=model, gpu=H100, num_gpus=16, target_seq_len=8192, fixed=fixed, top_k=2))
    plan = result.plan
    assert plan is not None
    assert (plan.parallelism.pp, plan.parallelism.tp, plan.pp_schedule, plan.pp_microbatches) == (2, 2, "gpipe", 4)
    assert plan.pp_virtual_stages == 1 and plan.local_batch_size % 4 == 0
    assert all(a["parallelism"]["pp"] == 2 and a["pp_schedule"] == "gpipe" for a in plan.alternatives)
    inter = make_plan(PlanRequest(model=model, gpu=H100, num_gpus=16, target_seq_len=8192,
                                  fixed=parse_fix("pp=4,virtual=2"), top_k=0)).plan
    assert inter is not None and (inter.parallelism.pp, inter.pp_schedule, inter.pp_virtual_stages) == (
        4, "interleaved-1f1b", 2)
    # pp=1 pinned rules pipelines out.
    flat = make_plan(PlanRequest(model=model, gpu=H100, num_gpus=16, target_seq_len=8192, fixed={"pp": 1}, top_k=3))
    assert flat.plan.parallelism.pp == 1 and all(a["parallelism"]["pp"] == 1 for a in flat.plan.alternatives)


def test_explanation_names_the_bubble_and_the_plan_runs():
    result = make_plan(PlanRequest(model=SHAPES[0], gpu=H100, num_gpus=16, target_seq_len=8192,
                                   fixed={"pp": 4, "pp_microbatches": 8, "pp_schedule": "1f1b"}, top_k=0))
    assert "bubble 27%" in result.plan.explanation[0]  # (4 - 1) / (8 + 4 - 1)
    assert result.plan.predicted.model_extra["pipeline_bubble_fraction"] == pytest.approx(3 / 11)
    assert len(result.plan.predicted.model_extra["stage_peak_memory_bytes"]) == 4
    # The plan document reloads with its pipeline fields (the runtime reads them).
    from autoplan.plan import Plan
    again = Plan.model_validate(result.plan.model_dump(mode="json"))
    assert (again.parallelism.pp, again.pp_schedule, again.microbatches) == (4, "1f1b", 8)
    cfg = again.train_config()
    assert cfg.parallelism.pp == 4 and cfg.pp_microbatches == 8


def test_405b_on_16k_gpus_considers_pipelines():
    """The 405B / 16,384-GPU case considers pipelines and says what became of them: each is
    ruled out before pricing (rank 0 cannot hold its own weights and activations, or its
    lower bound is slower than the plan found), counted in the rejections."""
    result = make_plan(PlanRequest(model=MODEL_PRESETS["llama3.1-405b"], gpu=H100, num_gpus=16384,
                                   target_seq_len=131072, top_k=1))
    assert result.plan.parallelism.pp == 1
    line = next(line for line in result.explanation if line.startswith("pipelines (pp "))
    ruled_out = [r for r in result.rejections if r.what == "pipeline (pp > 1)"]
    assert ruled_out and f"none of {sum(r.count for r in ruled_out):,} priced" in line
    pinned = make_plan(PlanRequest(model=MODEL_PRESETS["llama3.1-405b"], gpu=H100, num_gpus=16384,
                                   target_seq_len=131072, top_k=0, fixed={"tp": 8, "cp": 16, "pp": 16}))
    assert pinned.estimate.tokens_per_second_per_gpu < result.estimate.tokens_per_second_per_gpu


@pytest.mark.parametrize("model, gpus, seq", [(SHAPES[0], 16, 16384), (SHAPES[1], 16, 4096),
                                              (MODEL_PRESETS["llama3-70b"], 64, 16384)])
def test_pipeline_lower_bound_never_beats_the_best_mix(model, gpus, seq):
    """The planner does not price a pipeline whose lower bound is slower than the plan it
    has: that bound must not exceed the candidate's best per-rank AC mix (every two-mode
    mix, priced by estimate_step), and must be infinite only where no mix fits."""
    from autoplan.planner import _pipeline_lower_bound
    from autoplan.search import pipeline_candidates

    full = ACPolicy.uniform("full", model.n_layers)
    probe = estimate_step(model, ClusterSpec(H100, gpus),
                          TrainConfig(Parallelism(dp_shard=gpus // 2, pp=2), seq, 4, 1, full, "none",
                                      pp_schedule="1f1b", pp_microbatches=4, pp_virtual_stages=1))
    request = PlanRequest(model=model, gpu=H100, num_gpus=gpus, target_seq_len=seq,
                          memory_capacity_bytes=probe.peak_memory_bytes * 1.3)
    candidates, _ = pipeline_candidates(model, H100, gpus, seq, None, {}, None)
    checked = 0
    for c in candidates[::max(1, len(candidates) // 12)]:
        cfg = c.train_config()
        par = cfg.parallelism
        k = max(len(r) for r in _rank_layers(model.n_layers, par.pp, cfg.pp_virtual_stages))
        best = None
        for heavy, light, n in {(a, b, n) for i, a in enumerate(ORDER) for b in ORDER[i + 1:] for n in range(k + 1)}:
            trial = replace(cfg, ac=_policy(model.n_layers, par.pp, cfg.pp_virtual_stages, heavy, light, n))
            est = estimate_step(model, ClusterSpec(H100, gpus), trial)
            if est.peak_memory_bytes <= request.usable_bytes:
                score = est.step_time_s / (seq * cfg.local_batch_size / (par.cp * par.tp * par.pp))
                best = score if best is None else min(best, score)
        lower = _pipeline_lower_bound(request, c)
        if best is None:
            continue
        assert lower <= best * (1 + 1e-9), (c.describe(), lower, best)
        checked += 1
    assert checked >= 3


def test_cost_command_prices_a_pipeline(capsys):
    from autoplan.cli import main

    rc = main(["cost", "--model", "llama3-8b", "--gpu", "h100", "--dp-shard", "2", "--tp", "2", "--pp", "4",
               "--seq-len", "8k", "--local-batch-size", "8", "--pp-schedule", "interleaved-1f1b", "--ac", "full"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "interleaved-1f1b v=2 m=8 bubble 16%" in out  # (3 / 2) / (8 + 3 / 2)
    assert out.count("pp rank ") >= 4 and "(output + loss)" in out and "pipeline_bubble" in out


def test_sweep_pp_knob():
    from autoplan.errors import UsageError
    from autoplan.sweep import SweepSetup, sweep

    setup = SweepSetup(model=SHAPES[0], gpu=H100, gpus=16, target_seq_len=8192)
    rows = sweep(setup, "pp", [1, 2, 4], jobs=1)
    assert [r["value"] for r in rows] == [1, 2, 4] and all(r["fits"] for r in rows)
    assert "pp=" not in rows[0]["layout"] and rows[0]["max_seq_len"] > 0
    for row, pp in zip(rows[1:], (2, 4)):
        assert f"pp={pp}" in row["layout"] and "bubble" in row["layout"] and row["max_seq_len"] == 0
    with pytest.raises(UsageError, match="--knob pp needs --target-seqlen"):
        sweep(SweepSetup(model=SHAPES[0], gpu=H100, gpus=16), "pp", [2], jobs=1)


def test_pipeline_prefilter_is_a_lower_bound():
    """The planner skips pipelines whose stage-0 weights alone exceed the memory: that
    bound must stay below the priced peak of pp rank 0 (else it would drop plans that fit)."""
    from autoplan.planner import _pipeline_static_bytes
    from autoplan.search import pipeline_candidates

    model = MODEL_PRESETS["llama3-70b"]
    request = PlanRequest(model=model, gpu=H100, num_gpus=64, target_seq_len=16384)
    candidates, _ = pipeline_candidates(model, H100, 64, 16384, None, {}, None)
    assert len(candidates) > 50
    for c in candidates[::7]:
        cfg = replace(c.train_config(), ac=ACPolicy.uniform("full", model.n_layers))
        rank0 = estimate_step(model, ClusterSpec(H100, 64), cfg).pipeline.stages[0]
        assert _pipeline_static_bytes(request, c) <= rank0.peak_bytes


@pytest.mark.parametrize("model, fixed, message", [
    (SHAPES[0], {"pp": 3}, r"multiply to 3, which does not divide --gpus 16"),
    (SHAPES[0], {"pp": 8, "pp_virtual_stages": 2}, r"16 pipeline stages exceed the model's 8 layers"),
    (MODEL_PRESETS["llama3.2-1b"], {"pp": 2}, r"ties its embeddings"),
    (SHAPES[0], {"pp": 1, "pp_microbatches": 4}, r"pipeline knobs need --fix pp=N"),
])
def test_impossible_pipeline_pins_are_one_line_errors(model, fixed, message):
    from cost_models.specs import SpecError

    with pytest.raises(SpecError, match=message):
        make_plan(PlanRequest(model=model, gpu=H100, num_gpus=16, target_seq_len=8192, fixed=fixed))
