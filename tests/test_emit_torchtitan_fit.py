"""Launch files for torchtitan must fit as torchtitan runs them (issue: files that OOM)."""

from pathlib import Path

import yaml

from autoplan.cli import main
from autoplan.emit import emit
from autoplan.errors import UsageError
from autoplan.plan import Plan
from cost_models.config import DEFAULT_MESH_ORDER, ACPolicy, TrainConfig
from cost_models.executors import EXECUTOR_PROFILES
from cost_models.specs import ClusterSpec, resolve_gpu, resolve_model
from cost_models.step import estimate_step


def _torchtitan_peak(plan: Plan) -> float:
    """Independent pricing of what the emitted files launch: torchtitan's profile, the one
    AC mode the files set for every block, torchtitan's ring CP and mesh order."""
    model = resolve_model("llama3-8b")
    modes = plan.activation_checkpoint.layer_modes(model.n_layers)
    mode = modes[0] if len(set(modes)) == 1 else ("full" if "full" in modes else "selective")
    cp_impl = "ring-allgather" if plan.cp_impl == "allgather-kv" else plan.cp_impl
    cfg = TrainConfig(plan.parallelism.to_spec(), plan.seq_len, plan.local_batch_size, plan.grad_accum_steps,
                      ACPolicy.uniform(mode, model.n_layers), cp_impl, DEFAULT_MESH_ORDER)
    cluster = ClusterSpec(resolve_gpu("h100"), plan.parallelism.world_size, 8)
    return estimate_step(model, cluster, cfg, EXECUTOR_PROFILES["torchtitan"]).peak_memory_bytes


def test_plan_out_writes_torchtitan_files_that_fit_for_torchtitan(tmp_path, capsys):
    assert main(["--gpus", "64", "--target-seqlen", "512k", "--top", "0", "--out", str(tmp_path)]) == 0
    plan = Plan.load(tmp_path / "plan.yaml")
    usable = plan.predicted.memory_usable_bytes
    assert _torchtitan_peak(plan) > usable  # the runtime's plan would not fit under torchtitan ...
    titan = Plan.load(tmp_path / "plan_torchtitan.yaml")  # ... so torchtitan's files carry their own plan
    assert titan.executor == "torchtitan" and _torchtitan_peak(titan) <= usable
    script = (tmp_path / "torchtitan_v0.3.sh").read_text()
    p = titan.parallelism
    assert f"--parallelism.context_parallel_degree {p.cp}" in script
    assert f"--parallelism.data_parallel_shard_degree {p.dp_shard}" in script
    assert "priced for torchtitan" in script and ": fits;" in script
    assert "torchtitan would not fit this layout" in capsys.readouterr().out


def test_emit_refuses_torchtitan_files_that_would_not_fit(tmp_path):
    assert main(["--gpus", "64", "--target-seqlen", "512k", "--top", "0", "--out", str(tmp_path)]) == 0
    plan = Plan.load(tmp_path / "plan.yaml")
    try:
        emit(plan, "torchtitan")
    except UsageError as error:
        assert "would not fit" in str(error) and "--executor torchtitan" in str(error)
    else:
        raise AssertionError("emit wrote torchtitan files for a layout torchtitan cannot fit")
    forced = emit(plan, "torchtitan", force=True)["torchtitan_v0.3.sh"]
    assert "DOES NOT FIT" in forced  # never claims a fit the torchtitan model denies
    assert yaml.safe_load(Path(tmp_path / "plan_torchtitan.yaml").read_text())["executor"] == "torchtitan"
