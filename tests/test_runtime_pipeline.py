"""Pipeline parallelism trains exactly like one process: same seed, same global batch, fp32, gloo.

Reference: one plain process with the same plan shape (global batch 4 x 32 tokens). Each
pipelined layout runs STEPS steps under torchrun; max |loss difference| must stay <= 1e-4.
Negative control: PyTorch's default loss scaling (a per-micro-batch mean, the schedule
dividing gradients by the micro-batch count) under gradient accumulation divides the
earlier micro-steps' gradients twice; it must diverge.

The stage split and the plan fields are checked by hand without processes.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from runtime_helpers import TINY, run_plan, write_plan

from autoplan.plan import Plan, PlanError
from runtime.model import Transformer
from runtime.pipeline import LocalStages, Stage, stage_layers, stages_of_rank

STEPS = 12
SEQ = 32
GLOBAL_BATCH = 4
FOUR_LAYERS = dataclasses.replace(TINY, n_layers=4)

# name: (parallelism, plan fields, write_plan options, reference)
LAYOUTS = {
    "pp2_1f1b": ({"pp": 2}, {}, {}, "single"),
    "pp2_gpipe_accum2": ({"pp": 2}, {"pp_schedule": "gpipe"}, {"grad_accum_steps": 2}, "single_accum2"),
    "pp2_dp_shard2": ({"pp": 2, "dp_shard": 2}, {"pp_microbatches": 2}, {"modes": ["full", "none"]}, "single"),
    "pp2_tp2": ({"pp": 2, "tp": 2}, {"pp_microbatches": 2}, {}, "single"),
    "pp2_cp2": ({"pp": 2, "cp": 2}, {}, {}, "single"),
    "pp2_interleaved_v2": ({"pp": 2}, {"pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 2},
                           {"model": FOUR_LAYERS, "modes": ["selective", "none", "full", "none"]}, "single_4layers"),
}
REFERENCES = {"single": {}, "single_accum2": {"grad_accum_steps": 2}, "single_4layers": {"model": FOUR_LAYERS}}
NEGATIVE = "negative_schedule_scales_grads"  # as pp2_gpipe_accum2, with PyTorch's default scaling


def _plan(tmp: Path, name: str, parallelism: dict, fields: dict, options: dict) -> tuple[Path, int]:
    dp = parallelism.get("dp_replicate", 1) * parallelism.get("dp_shard", 1)
    accum = options.get("grad_accum_steps", 1)
    path = write_plan(tmp / f"{name}.yaml", parallelism, seq_len=SEQ,
                      local_batch_size=GLOBAL_BATCH // dp // accum, **options)
    if fields:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **fields}))
    world = 1
    for degree in parallelism.values():
        world *= degree
    return path, world


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    out: dict = {}
    runs = {name: (({}, {}, options), []) for name, options in REFERENCES.items()}
    runs.update({name: ((parallelism, fields, options), []) for name, (parallelism, fields, options, _) in LAYOUTS.items()})
    runs[NEGATIVE] = (LAYOUTS["pp2_gpipe_accum2"][:3], ["--debug-pp-schedule-scales-grads"])
    for name, ((parallelism, fields, options), extra) in runs.items():
        path, world = _plan(tmp, name, parallelism, fields, options)
        code, losses, err = run_plan(path, world, STEPS, tmp, extra=extra, timeout=240)
        out[name] = losses if code == 0 else []
        out[f"{name}_stderr"] = err[-3000:]
    return out


def _worst(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_trains(name, results):
    losses = results[name]
    assert len(losses) == STEPS, results[f"{name}_stderr"]
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_matches_single_process(name, results):
    losses, reference = results[name], results[LAYOUTS[name][3]]
    assert len(losses) == STEPS, results[f"{name}_stderr"]
    assert len(reference) == STEPS
    worst = _worst(losses, reference)
    print(f"{name}: max |loss diff| {worst:.2e}")
    assert worst <= 1e-4, f"{name}: max |loss diff| {worst:.2e}"


@pytest.mark.timeout(900)
def test_negative_control_schedule_scaling_under_accumulation_diverges(results):
    """The schedule's scale_grads divides every gradient present at the end of a step,
    including those accumulated by earlier micro-steps: training must visibly differ."""
    losses = results[NEGATIVE]
    assert len(losses) == STEPS, results[f"{NEGATIVE}_stderr"]
    assert losses[0] == pytest.approx(results["single_accum2"][0], abs=1e-5)  # same first forward
    worst = _worst(losses, results["single_accum2"])
    print(f"{NEGATIVE}: max |loss diff| {worst:.2e}")
    assert worst > 1e-3


# ------------------------------------------------------------------- the split, by hand


def test_stage_layers_by_hand():
    assert stage_layers(2, 2) == [[0], [1]]
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]  # the extra layer goes to the earlier stage
    assert stage_layers(7, 4) == [[0, 1], [2, 3], [4, 5], [6]]
    assert stage_layers(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="3 layers cannot fill"):
        stage_layers(3, 4)


def test_interleaved_placement_by_hand():
    # pp=2, 2 virtual stages, 4 layers: rank 0 holds stages 0 and 2 (layers 0 and 2).
    assert stages_of_rank(0, 2, 2) == [0, 2] and stages_of_rank(1, 2, 2) == [1, 3]
    assert stages_of_rank(3, 4, 1) == [3]
    split = stage_layers(4, 4)
    assert [split[s] for s in stages_of_rank(0, 2, 2)] == [[0], [2]]
    assert [split[s] for s in stages_of_rank(1, 2, 2)] == [[1], [3]]


def test_stages_keep_the_whole_models_names():
    with torch.device("meta"):
        model = Transformer(FOUR_LAYERS)
    first, last = Stage(model, [0, 1], True, False), Stage(model, [2, 3], False, True)
    names = lambda module: {name for name, _ in module.named_parameters()}  # noqa: E731
    assert {n.split(".")[0] for n in names(first)} == {"tok_embeddings", "layers"}
    assert {n.split(".")[1] for n in names(first) if n.startswith("layers.")} == {"0", "1"}
    assert {n.split(".")[0] for n in names(last)} == {"layers", "norm", "output"}
    assert names(first) | names(last) == names(model) and not names(first) & names(last)
    # Interleaved: one rank's two stages, seen as one model, keep the names too.
    local = LocalStages([Stage(model, [0], True, False), Stage(model, [2], False, False)])
    assert names(local) == {n for n in names(model) if n.startswith(("tok_embeddings", "layers.0.", "layers.2."))}


# ------------------------------------------------------------------------ plan fields


def _doc(**fields) -> dict:
    return {"seq_len": 32, "local_batch_size": 4, "model": TINY.to_dict(), **fields}


def test_existing_plans_keep_their_meaning():
    plan = Plan.from_dict(_doc())
    assert plan.parallelism.pp == 1 and plan.pp_schedule == "1f1b"
    assert plan.microbatches == plan.local_batch_size and plan.pp_virtual_stages == 1


def test_pipeline_fields_are_checked():
    assert Plan.from_dict(_doc(parallelism={"pp": 2}, pp_microbatches=2)).microbatches == 2
    with pytest.raises(PlanError, match="pp_microbatches=1 with pp=2"):
        Plan.from_dict(_doc(parallelism={"pp": 2}, pp_microbatches=1))
    with pytest.raises(PlanError, match="pp_microbatches=3"):
        Plan.from_dict(_doc(parallelism={"pp": 2}, pp_microbatches=3))  # does not divide 4
    with pytest.raises(PlanError, match="pp_virtual_stages=2"):
        Plan.from_dict(_doc(parallelism={"pp": 2}, pp_virtual_stages=2))  # needs interleaved-1f1b
    with pytest.raises(PlanError, match="pp_virtual_stages=1"):
        Plan.from_dict(_doc(parallelism={"pp": 2}, pp_schedule="interleaved-1f1b"))


def test_cost_models_price_the_plans_pipeline():
    """The plan's pipeline fields reach the cost model (cost_models/pipeline.py prices them)
    and its stage split is the one this module runs."""
    from cost_models.pipeline import stage_layers as priced_split
    from cost_models.specs import ClusterSpec, resolve_gpu
    from cost_models.step import estimate_step

    plan = Plan.from_dict(_doc(parallelism={"pp": 2}, pp_microbatches=2))
    cfg = plan.train_config()
    assert (cfg.parallelism.pp, cfg.pp_schedule, cfg.pp_microbatches, cfg.pp_virtual_stages) == (2, "1f1b", 2, 1)
    estimate = estimate_step(plan.model_spec(), ClusterSpec(resolve_gpu("h100"), 2), cfg)
    assert len(estimate.stage_peak_bytes) == 2
    assert priced_split(TINY.n_layers, 2) == stage_layers(TINY.n_layers, 2)
