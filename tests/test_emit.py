"""Launch scripts: values parsed back equal the plan's; keys exist in torchtitan; shellcheck-clean."""

import importlib.util
import json
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from autoplan.emit import emit, write_bundle
from autoplan.emit.torchtitan import cli_overrides
from autoplan.plan import Plan
from cost_models.config import ACPolicy
from autoplan.plan import ActivationCheckpointDoc
from cost_models.specs import resolve_gpu, resolve_model

DATA = Path(__file__).resolve().parents[1] / "autoplan" / "data"


def make_plan(world=64, per_node=8, modes=None, model="llama3-8b", **degrees):
    spec = resolve_model(model)
    degrees = degrees or {"dp_shard": 4, "cp": 8, "tp": 2}
    ac = ActivationCheckpointDoc.from_policy(ACPolicy(tuple(modes))) if modes else ActivationCheckpointDoc(mode="full")
    plan = Plan(seq_len=262144, local_batch_size=1, grad_accum_steps=2, parallelism=degrees, model=spec.to_dict(),
                hardware={"gpu": resolve_gpu("h100").to_dict(), "gpus_per_node": per_node},
                activation_checkpoint=ac, cp_impl="ring-alltoall" if degrees.get("cp", 1) > 1 else "none")
    assert plan.parallelism.world_size == world
    return plan


def _torchrun_flags(text):
    line = next(l for l in text.splitlines() if "torchrun " in l and not l.startswith("#"))
    return dict(tok.split("=", 1) for tok in shlex.split(line.replace("${", "{")) if tok.startswith("--") and "=" in tok)


def test_torchrun_multi_node_and_single_node():
    flags = _torchrun_flags(emit(make_plan(), "torchrun")["torchrun.sh"])
    assert flags["--nnodes"] == "8" and flags["--nproc-per-node"] == "8" and flags["--rdzv-backend"] == "c10d"
    single = emit(make_plan(world=8, dp_shard=8), "torchrun")["torchrun.sh"]
    assert "--standalone" in single and "--nproc-per-node=8" in single


def test_slurm_header_matches_plan():
    text = emit(make_plan(), "slurm")["slurm.sbatch"]
    directives = dict(line[len("#SBATCH "):].split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH"))
    assert directives["--nodes"] == "8" and directives["--gpus-per-node"] == "8"
    assert directives["--ntasks-per-node"] == "1"
    assert "srun" in text and "scontrol show hostnames" in text


def test_torchtitan_toml_round_trips_and_keys_exist():
    plan = make_plan(modes=["full"] * 10 + ["none"] * 22)
    text = emit(plan, "torchtitan")["torchtitan_v0.1.toml"]
    doc = tomllib.loads(text)
    assert doc["parallelism"]["data_parallel_shard_degree"] == 4
    assert doc["parallelism"]["context_parallel_degree"] == 8
    assert doc["parallelism"]["tensor_parallel_degree"] == 2
    assert doc["parallelism"]["context_parallel_rotate_method"] == "alltoall"
    assert doc["training"]["seq_len"] == 262144
    assert doc["training"]["global_batch_size"] == 1 * 2 * 4  # local x accum x dp
    assert doc["activation_checkpoint"]["mode"] == "full"  # closest to the per-layer mix
    assert "torchtitan applies one mode" in text
    keys = json.loads((DATA / "torchtitan_keys_0.1.0.json").read_text())
    for section, values in doc.items():
        for key in values:
            assert key in keys[section], f"[{section}] {key} is not a torchtitan 0.1 key"


def test_torchtitan_cli_keys_exist_in_its_config_classes():
    plan = make_plan()
    script = emit(plan, "torchtitan")["torchtitan_v0.3.sh"]
    keys = json.loads((DATA / "torchtitan_keys_0.3.0.json").read_text())
    if importlib.util.find_spec("torchtitan") is not None:  # check against the installed classes
        import dataclasses
        from torchtitan.config.configs import ParallelismConfig, TrainingConfig
        keys = {"parallelism": [f.name for f in dataclasses.fields(ParallelismConfig)],
                "training": [f.name for f in dataclasses.fields(TrainingConfig)],
                "activation_checkpoint_subcommands": keys["activation_checkpoint_subcommands"]}
    for flag, value in cli_overrides(plan):
        section, key = flag[2:].split(".", 1)
        assert key in keys[section], f"{flag} is not a torchtitan 0.3 key"
        assert f"{flag} {shlex.quote(value)}" in script
    assert "activation-checkpoint:full" in script
    assert any(script.rstrip().endswith(sub) for sub in keys["activation_checkpoint_subcommands"])


def test_paths_are_quoted(tmp_path):
    plan = make_plan(world=8, dp_shard=8)
    text = emit(plan, "torchrun", plan_path="my plans/it's.yaml")["torchrun.sh"]
    assert "PLAN='my plans/it'\"'\"'s.yaml'" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("world, degrees", [(8, {"dp_shard": 8}), (64, {"dp_shard": 4, "cp": 8, "tp": 2})])
def test_generated_shell_is_shellcheck_clean(tmp_path, world, degrees):
    written = write_bundle(make_plan(world=world, **degrees), tmp_path)
    scripts = [p for p in written if p.suffix in (".sh", ".sbatch")]
    assert len(scripts) == 3
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
