"""Launch scripts: run them with stand-in torchrun/srun/scontrol and check that what reaches
the launcher equals the plan; parse the TOML back; check every torchtitan key exists in
torchtitan; shellcheck every generated script."""

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from autoplan.emit import TARGETS, emit, write_bundle
from autoplan.emit.torchtitan import cli_overrides
from autoplan.errors import UsageError
from autoplan.plan import Plan
from cost_models.specs import resolve_gpu, resolve_model

DATA = Path(__file__).resolve().parents[1] / "autoplan" / "data"
KEYS_03 = json.loads((DATA / "torchtitan_keys_0.3.0.json").read_text())
KEYS_01 = json.loads((DATA / "torchtitan_keys_0.1.0.json").read_text())
BASH = shutil.which("bash")


def make_plan(degrees=None, per_node=8, model="llama3-8b", ac=None, cp_impl=None, seq_len=262144,
              local_batch_size=1, grad_accum_steps=2, **extra):
    degrees = degrees or {"dp_shard": 4, "cp": 8, "tp": 2}
    spec = resolve_model(model) if isinstance(model, str) else model
    if ac is None:
        ac = {"mode": "full"}
    elif isinstance(ac, list):
        ac = {"mode": "mixed", "layers": ac}
    if cp_impl is None:
        cp_impl = "ring-alltoall" if degrees.get("cp", 1) > 1 else "none"
    return Plan(seq_len=seq_len, local_batch_size=local_batch_size, grad_accum_steps=grad_accum_steps,
                parallelism=degrees, model=spec.to_dict(),
                hardware={"gpu": resolve_gpu("h100").to_dict(), "gpus_per_node": per_node},
                activation_checkpoint=ac, cp_impl=cp_impl, **extra)


# ----------------------------------------------------------------------- running the scripts

FAKE_LAUNCHER = """#!/usr/bin/env bash
# Records how it was called: one argument per line, then the environment it saw.
printf '%s\\n' "$@" > "$RECORD_DIR/$(basename "$0").args"
env > "$RECORD_DIR/$(basename "$0").env"
"""
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD_DIR/srun.args"
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 2
for node in gpu-node-07 gpu-node-08 gpu-node-09; do echo "$node"; done
"""


@pytest.fixture
def fakes(tmp_path):
    """A bin/ folder with stand-in torchrun, srun and scontrol; returns a runner."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("torchrun", FAKE_LAUNCHER), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)

    def run(script, *args, cwd=None, env=None, check=True):
        full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(record), "HOME": str(tmp_path)}
        full_env.update(env or {})
        result = subprocess.run([BASH, str(script), *args], cwd=cwd or tmp_path, env=full_env,
                                capture_output=True, text=True)
        if check:
            assert result.returncode == 0, result.stderr
        calls = {}
        for name in ("torchrun", "srun"):
            if (record / f"{name}.args").exists():
                calls[name] = (record / f"{name}.args").read_text().splitlines()
        if (record / "torchrun.env").exists():
            calls["env"] = dict(line.split("=", 1) for line in (record / "torchrun.env").read_text().splitlines()
                                if "=" in line)
        return result, calls

    return run


def flag_values(args):
    """torchrun's '--name=value' flags as a dict (up to the module flag '-m')."""
    head = args[:args.index("-m")]
    return {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else True) for a in head}


needs_bash = pytest.mark.skipif(BASH is None, reason="bash not installed")


@needs_bash
def test_torchrun_single_node_runs_runtime_train_on_the_plan_beside_it(tmp_path, fakes):
    plan = make_plan({"dp_shard": 8})
    out = tmp_path / "out dir"
    emit(plan, "torchrun", out)
    _, calls = fakes(out / "torchrun.sh", "--steps", "3")
    args = calls["torchrun"]
    assert flag_values(args) == {"--standalone": True, "--nproc-per-node": "8"}
    assert args[args.index("-m"):] == ["-m", "runtime.train", "--plan", str(out / "plan.yaml"), "--steps", "3"]
    assert Plan.load(out / "plan.yaml") == plan
    assert calls["env"]["OMP_NUM_THREADS"] == "8"


@needs_bash
def test_torchrun_multi_node_uses_c10d_rendezvous(tmp_path, fakes):
    plan = make_plan()  # 64 GPUs, 8 per node
    emit(plan, "torchrun", tmp_path)
    _, calls = fakes(tmp_path / "torchrun.sh", env={"MASTER_ADDR": "10.0.0.1"})
    assert flag_values(calls["torchrun"]) == {
        "--nnodes": "8", "--nproc-per-node": "8", "--rdzv-backend": "c10d",
        "--rdzv-endpoint": "10.0.0.1:29500", "--rdzv-id": "autoplan"}
    # Without MASTER_ADDR the script stops with a message instead of launching.
    (tmp_path / "record" / "torchrun.args").unlink()
    result, calls = fakes(tmp_path / "torchrun.sh", check=False)
    assert result.returncode != 0 and "MASTER_ADDR" in result.stderr and "torchrun" not in calls


@needs_bash
def test_torchrun_nodes_follow_gpus_per_node(tmp_path, fakes):
    plan = make_plan({"dp_shard": 4, "tp": 4}, per_node=4)  # 16 GPUs as 4 nodes of 4
    emit(plan, "torchrun", tmp_path)
    _, calls = fakes(tmp_path / "torchrun.sh", env={"MASTER_ADDR": "h", "MASTER_PORT": "1234", "RDZV_ID": "r"})
    flags = flag_values(calls["torchrun"])
    assert flags["--nnodes"] == "4" and flags["--nproc-per-node"] == "4" and flags["--rdzv-endpoint"] == "h:1234"


@needs_bash
def test_plan_path_with_spaces_and_quotes_reaches_torchrun_verbatim(tmp_path, fakes):
    plan = make_plan({"dp_shard": 8})
    weird = "my plans/it's $(rm -rf ~) `x` \"q\".yaml"
    text = emit(plan, "torchrun", plan_path=weird)["torchrun.sh"]
    assert f"PLAN={shlex.quote(weird)}" in text
    script = tmp_path / "launch.sh"
    script.write_text(text)
    _, calls = fakes(script)
    assert calls["torchrun"][calls["torchrun"].index("--plan") + 1] == weird


def sbatch_directives(text):
    pairs = [line[len("#SBATCH "):].split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH")]
    return {pair[0]: pair[1] if len(pair) == 2 else True for pair in pairs}


@needs_bash
def test_slurm_script_header_and_launch(tmp_path, fakes):
    plan = make_plan()
    emit(plan, "slurm", tmp_path)
    text = (tmp_path / "slurm.sbatch").read_text()
    assert sbatch_directives(text) == {"--job-name": "autoplan-llama3-8b", "--nodes": "8", "--ntasks-per-node": "1",
                                       "--gpus-per-node": "8", "--cpus-per-task": "64", "--time": "24:00:00",
                                       "--mem": "0", "--exclusive": True, "--output": "%x-%j.out"}
    assert text.splitlines()[1].startswith("#SBATCH")  # directives before any command
    env = {"SLURM_JOB_NODELIST": "gpu-node-[07-09]", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(tmp_path)}
    _, calls = fakes(tmp_path / "slurm.sbatch", "--steps", "5", env=env)
    assert calls["srun"][0] == "--kill-on-bad-exit=1" and calls["srun"][1] == "torchrun"
    args = calls["torchrun"]
    assert flag_values(args) == {"--nnodes": "8", "--nproc-per-node": "8", "--rdzv-backend": "c10d",
                                 "--rdzv-endpoint": "gpu-node-07:29742", "--rdzv-id": "4242"}
    assert args[args.index("-m"):] == ["-m", "runtime.train", "--plan", str(tmp_path / "plan.yaml"), "--steps", "5"]
    assert calls["env"]["MASTER_ADDR"] == "gpu-node-07"
    assert calls["env"]["OMP_NUM_THREADS"] == "8"
    assert calls["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "NCCL_ASYNC_ERROR_HANDLING" not in calls["env"]  # the deprecated name (torch < 2.2) is gone
    assert "NCCL_IB_DISABLE" not in calls["env"]


@needs_bash
def test_slurm_script_reads_its_own_plan_when_submitted_elsewhere(tmp_path, fakes):
    """sbatch runs a copy of the script from its spool folder, in the submit folder: the
    plan it reads must still be the one beside the original, and exactly that plan."""
    bundle, elsewhere, spool = tmp_path / "bundle", tmp_path / "elsewhere", tmp_path / "spool"
    plan = make_plan()
    emit(plan, "slurm", bundle)
    elsewhere.mkdir()
    spool.mkdir()
    make_plan({"dp_shard": 8}).save(elsewhere / "plan.yaml")  # a different plan where it is submitted from
    shutil.copy(bundle / "slurm.sbatch", spool / "slurm_script")
    env = {"SLURM_JOB_NODELIST": "gpu-node-07", "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(elsewhere)}
    _, calls = fakes(spool / "slurm_script", env=env, cwd=elsewhere)
    args = calls["torchrun"]
    assert args[args.index("--plan") + 1] == str((bundle / "plan.yaml").resolve())
    (tmp_path / "record" / "srun.args").unlink()
    (bundle / "plan.yaml").write_text((bundle / "plan.yaml").read_text().replace("seq_len: 262144", "seq_len: 8192"))
    result, calls = fakes(spool / "slurm_script", env=env, cwd=elsewhere, check=False)
    assert result.returncode == 2 and "srun" not in calls
    assert result.stderr.strip().count("\n") == 0 and "changed since this script was written" in result.stderr
    (bundle / "plan.yaml").unlink()
    result, calls = fakes(spool / "slurm_script", env=env, cwd=elsewhere, check=False)
    assert result.returncode == 2 and "srun" not in calls and "not found" in result.stderr


def test_slurm_options_and_bad_values():
    plan = make_plan({"dp_shard": 8})
    from autoplan.emit.slurm import slurm_script
    text = slurm_script(plan, "p.yaml", "0" * 64, time_limit="2-00:00:00", cpus_per_task=96, partition="gpu,debug",
                        account="proj_1", exclusive=False, mem="500G")
    assert sbatch_directives(text) == {"--job-name": "autoplan-llama3-8b", "--nodes": "1", "--ntasks-per-node": "1",
                                       "--gpus-per-node": "8", "--cpus-per-task": "96", "--time": "2-00:00:00",
                                       "--mem": "500G", "--partition": "gpu,debug", "--account": "proj_1",
                                       "--output": "%x-%j.out"}
    assert "export OMP_NUM_THREADS=12" in text
    for bad in ({"time_limit": "1 day; rm -rf /"}, {"mem": "lots"}, {"partition": "a b"}, {"account": "$(x)"}):
        with pytest.raises(UsageError, match=f"^--{next(iter(bad)).split('_')[0]} "):
            slurm_script(plan, "p.yaml", "0" * 64, **bad)


def test_emit_command_takes_slurm_flags_and_checks_out_first(tmp_path, capsys):
    from autoplan.cli import main
    plan_path = make_plan({"dp_shard": 8}).save(tmp_path / "mine.yaml")
    assert main(["emit", str(plan_path), "--target", "slurm", "--out", str(tmp_path / "b"), "--time", "1:00:00",
                 "--partition", "h100", "--account", "lab", "--no-exclusive", "--mem", "900G"]) == 0
    directives = sbatch_directives((tmp_path / "b" / "slurm.sbatch").read_text())
    assert (directives["--time"], directives["--partition"], directives["--account"], directives["--mem"]) == (
        "1:00:00", "h100", "lab", "900G") and "--exclusive" not in directives
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["emit", str(plan_path), "--target", "slurm", "--out", str(out)]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and printed.err.count("\n") == 1 and "is a file, not a folder" in printed.err


# ----------------------------------------------------------------------- torchtitan 0.3


def titan_args(calls):
    """The torchtitan.train arguments the stand-in torchrun received."""
    args = calls["torchrun"]
    return args[args.index("-m") + 2:]


def override_pairs(args):
    pairs, rest = {}, []
    i = 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs[args[i]] = args[i + 1]
            i += 2
        else:
            rest.append(args[i])
            i += 1
    return pairs, rest


@needs_bash
def test_torchtitan_03_launch_carries_the_plan(tmp_path, fakes):
    plan = make_plan({"dp_replicate": 2, "dp_shard": 4, "cp": 4, "tp": 2}, local_batch_size=2, grad_accum_steps=3,
                     seq_len=131072, ac={"mode": "selective"}, cp_impl="ring-allgather")
    emit(plan, "torchtitan", tmp_path, force=True)
    _, calls = fakes(tmp_path / "torchtitan_v0.3.sh", "--training.steps", "9", env={"MASTER_ADDR": "m"})
    assert flag_values(calls["torchrun"])["--nnodes"] == "8"
    pairs, rest = override_pairs(titan_args(calls))
    assert pairs == {
        "--module": "llama3", "--config": "llama3_8b",
        "--parallelism.data_parallel_replicate_degree": "2", "--parallelism.data_parallel_shard_degree": "4",
        "--parallelism.tensor_parallel_degree": "2", "--parallelism.context_parallel_degree": "4",
        "--training.seq_len": "131072", "--training.local_batch_size": "2",
        "--training.global_batch_size": str(2 * 3 * 2 * 4),  # local x accum x dp_replicate x dp_shard
        "--training.mixed_precision_param": "bfloat16", "--training.mixed_precision_reduce": "float32",
        "--training.max_norm": "1.0", "--lr_scheduler.warmup_steps": "10",
        "--training.steps": "9",  # the user's override, passed through
    }
    assert rest == ["activation-checkpoint:selective"]


@pytest.mark.parametrize("ac, expected", [
    ({"mode": "none"}, "none"), ({"mode": "full"}, "full"), ({"mode": "selective"}, "selective"),
    (["full"] * 10 + ["none"] * 22, "full"), (["selective"] * 5 + ["none"] * 27, "selective"),
    (["full"] * 1 + ["selective"] * 31, "full"),
])
def test_ac_modes_map_to_torchtitan(ac, expected):
    files = emit(make_plan(ac=ac), "torchtitan", force=True)
    script = files["torchtitan_v0.3.sh"]
    assert script.rstrip().endswith(f'"$@" activation-checkpoint:{expected}')
    assert tomllib.loads(files["torchtitan_v0.1.toml"])["activation_checkpoint"]["mode"] == expected
    mixed = isinstance(ac, list)
    for text in files.values():
        assert ("torchtitan has no per-layer mix" in text) == mixed


def test_half_full_mix_suggests_torchtitan_01_layer_option():
    text = emit(make_plan(ac=["full"] * 8 + ["none"] * 24), "torchtitan", force=True)["torchtitan_v0.1.toml"]
    assert 'selective_ac_option = "4" checkpoints one block in every 4' in text


@pytest.mark.parametrize("cp_impl, rotate, note_03, note_01", [
    ("ring-allgather", "allgather", None, None),
    ("ring-alltoall", "alltoall", "no rotate-method option", None),
    ("allgather-kv", "allgather", "allgather-kv (all-gather K/V) has no torchtitan equivalent",
     "allgather-kv (all-gather K/V) has no torchtitan equivalent"),
])
def test_cp_impl_maps_to_rotate_method(cp_impl, rotate, note_03, note_01):
    files = emit(make_plan(cp_impl=cp_impl), "torchtitan", force=True)
    assert tomllib.loads(files["torchtitan_v0.1.toml"])["parallelism"]["context_parallel_rotate_method"] == rotate
    script = files["torchtitan_v0.3.sh"]
    assert "rotate_method" not in script.replace("set_rotate_method", "")  # 0.3 has no such key
    for text, note in ((script, note_03), (files["torchtitan_v0.1.toml"], note_01)):
        comments = "\n".join(l for l in text.splitlines() if l.startswith("#"))
        if note:
            assert note in comments
        else:
            assert "rotate" not in comments.replace("--rdzv", "") and "all-gather K/V" not in comments


# ----------------------------------------------------------------------- torchtitan 0.1 TOML


def test_torchtitan_01_toml_round_trips():
    plan = make_plan({"dp_replicate": 2, "dp_shard": 2, "cp": 8, "tp": 2}, model="llama3-70b", local_batch_size=1,
                     grad_accum_steps=4, optimizer={"lr": 1.5e-4, "weight_decay": 0.05, "betas": (0.9, 0.99),
                                                    "warmup_steps": 100, "max_norm": 0.5, "total_steps": 1000})
    doc = tomllib.loads(emit(plan, "torchtitan", force=True)["torchtitan_v0.1.toml"])
    assert doc == {
        "job": {"description": "autoplan plan for llama3-70b", "dump_folder": "./outputs"},
        "model": {"name": "llama3", "flavor": "70B"},
        "optimizer": {"name": "AdamW", "lr": 1.5e-4, "weight_decay": 0.05, "beta1": 0.9, "beta2": 0.99},
        "lr_scheduler": {"warmup_steps": 100},
        "training": {"local_batch_size": 1, "global_batch_size": 1 * 4 * 2 * 2, "seq_len": 262144,
                     "max_norm": 0.5, "mixed_precision_param": "bfloat16", "mixed_precision_reduce": "float32",
                     "steps": 1000},
        "parallelism": {"data_parallel_replicate_degree": 2, "data_parallel_shard_degree": 2,
                        "tensor_parallel_degree": 2, "context_parallel_degree": 8,
                        "context_parallel_rotate_method": "alltoall"},
        "activation_checkpoint": {"mode": "full", "selective_ac_option": "op"},
    }


@pytest.mark.parametrize("model, flavor, config", [
    ("llama3-8b", "8B", "llama3_8b"), ("llama3-70b", "70B", "llama3_70b"), ("llama3.1-405b", "405B", "llama3_405b"),
])
def test_models_map_to_torchtitan_by_shape(model, flavor, config):
    files = emit(make_plan({"dp_shard": 8, "tp": 8}, model=model), "torchtitan", force=True)
    assert tomllib.loads(files["torchtitan_v0.1.toml"])["model"]["flavor"] == flavor
    assert f'CONFIG="${{CONFIG:-{config}}}"' in files["torchtitan_v0.3.sh"]
    assert flavor in KEYS_01["llama3_flavors"] and config in KEYS_03["llama3_configs"]


def test_a_renamed_model_with_a_known_shape_maps_too(tmp_path):
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "_name_or_path": "meta-llama/Llama-3.1-8B"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    files = emit(make_plan(model=resolve_model(str(tmp_path / "config.json"))), "torchtitan", force=True)
    assert tomllib.loads(files["torchtitan_v0.1.toml"])["model"]["flavor"] == "8B"


@needs_bash
def test_unknown_model_shape_needs_a_config_and_says_so(tmp_path, fakes):
    plan = make_plan({"dp_shard": 2}, model="debug", seq_len=256)  # not torchtitan's debugmodel shape
    files = emit(plan, "torchtitan", tmp_path, force=True)
    assert tomllib.loads(files["torchtitan_v0.1.toml"])["model"]["flavor"] == "custom"
    assert "matches no torchtitan llama3 model" in files["torchtitan_v0.1.toml"]
    result, calls = fakes(tmp_path / "torchtitan_v0.3.sh", check=False)
    assert result.returncode != 0 and "set CONFIG" in result.stderr and "torchrun" not in calls
    _, calls = fakes(tmp_path / "torchtitan_v0.3.sh", env={"CONFIG": "my_debug"})
    assert override_pairs(titan_args(calls))[0]["--config"] == "my_debug"


def test_mesh_order_and_bf16_reduce_are_noted():
    plan = make_plan(mesh_order=["dp_replicate", "cp", "dp_shard", "tp"], precision={"reduce_dtype": "bfloat16"})
    for text in emit(plan, "torchtitan", force=True).values():
        assert "torchtitan's mesh is always dp_replicate/dp_shard/cp/tp" in text
        assert "reduces gradients in float32 only" in text


# ----------------------------------------------------------------------- keys exist in torchtitan


def _installed_torchtitan():
    if importlib.util.find_spec("torchtitan") is None:
        return None
    try:
        return importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        return None


def _keys_03():
    """Section -> keys, from torchtitan's own classes when 0.3 is importable, else the checked-in list."""
    version = _installed_torchtitan()
    if version and version.startswith("0.3"):
        from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
        from torchtitan.config.configs import ParallelismConfig, TrainingConfig
        return {"parallelism": [f.name for f in dataclasses.fields(ParallelismConfig)],
                "training": [f.name for f in dataclasses.fields(TrainingConfig)],
                "lr_scheduler": [f.name for f in dataclasses.fields(LRSchedulersContainer.Config)]}, "installed"
    return KEYS_03, "checked-in list"


def _keys_01():
    version = _installed_torchtitan()
    if version and version.startswith("0.1"):
        from torchtitan.config_manager import JobConfig
        return {f.name: [g.name for g in dataclasses.fields(f.default_factory)]
                for f in dataclasses.fields(JobConfig)}, "installed"
    return KEYS_01, "checked-in list"


@pytest.mark.parametrize("plan", [make_plan(), make_plan({"dp_shard": 8}, optimizer={"total_steps": 10}),
                                  make_plan(ac=["full"] * 16 + ["none"] * 16, cp_impl="allgather-kv")])
def test_every_torchtitan_03_key_exists(plan):
    keys, source = _keys_03()
    for flag, _ in cli_overrides(plan):
        section, key = flag[2:].split(".", 1)
        assert key in keys[section], f"{flag} is not a torchtitan 0.3 key ({source})"
    script = emit(plan, "torchtitan", force=True)["torchtitan_v0.3.sh"]
    subcommand = script.rstrip().rsplit(" ", 1)[-1]
    assert subcommand in KEYS_03["activation_checkpoint_subcommands"]
    config = next(l for l in script.splitlines() if l.startswith("CONFIG="))
    assert config.split(":-", 1)[1].rstrip('}"') in KEYS_03["llama3_configs"]


@pytest.mark.parametrize("plan", [make_plan(), make_plan({"dp_shard": 8}, optimizer={"total_steps": 10})])
def test_every_torchtitan_01_key_exists(plan):
    keys, source = _keys_01()
    doc = tomllib.loads(emit(plan, "torchtitan", force=True)["torchtitan_v0.1.toml"])
    # Values read back equal the plan's own fields (not the emitter's intermediate dict).
    p = plan.parallelism
    assert doc["parallelism"]["data_parallel_shard_degree"] == p.dp_shard
    assert doc["parallelism"]["data_parallel_replicate_degree"] == p.dp_replicate
    assert doc["parallelism"]["tensor_parallel_degree"] == p.tp
    assert doc["parallelism"]["context_parallel_degree"] == p.cp
    assert doc["training"]["seq_len"] == plan.seq_len
    assert doc["training"]["local_batch_size"] == plan.local_batch_size
    assert doc["training"]["global_batch_size"] == plan.local_batch_size * plan.grad_accum_steps * p.dp_replicate * p.dp_shard
    assert doc["training"].get("steps") == plan.optimizer.total_steps
    assert doc["optimizer"]["lr"] == plan.optimizer.lr
    assert doc["activation_checkpoint"]["mode"] in ("none", "selective", "full")
    for section, values in doc.items():
        assert section in keys, f"[{section}] is not a torchtitan 0.1 section ({source})"
        for key in values:
            assert key in keys[section], f"[{section}] {key} is not a torchtitan 0.1 key ({source})"


def test_checked_in_key_lists_say_where_they_came_from():
    for keys, version in ((KEYS_03, "0.3.0"), (KEYS_01, "0.1.0")):
        assert f"torchtitan {version} wheel from PyPI" in keys["_source"]
    assert "data_parallel_shard_degree" in KEYS_03["parallelism"]
    assert "context_parallel_rotate_method" not in KEYS_03["parallelism"]  # gone in 0.3
    assert "context_parallel_rotate_method" in KEYS_01["parallelism"]


@pytest.mark.skipif(importlib.util.find_spec("tyro") is None or not (_installed_torchtitan() or "").startswith("0.3"),
                    reason="torchtitan 0.3 and tyro not installed")
def test_torchtitan_03_cli_parses_with_its_own_classes():
    """Parse the emitted overrides with tyro over torchtitan's real config classes."""
    from typing import Any

    import tyro
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.config import ConfigManager
    from torchtitan.config.configs import ParallelismConfig, TrainingConfig
    from torchtitan.config.manager import custom_registry
    from torchtitan.distributed.activation_checkpoint import ActivationCheckpointingConfig, FullAC, SelectiveAC

    @dataclasses.dataclass(kw_only=True)
    class Section:
        training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
        parallelism: ParallelismConfig = dataclasses.field(default_factory=ParallelismConfig)
        lr_scheduler: LRSchedulersContainer.Config = dataclasses.field(default_factory=LRSchedulersContainer.Config)
        activation_checkpoint: ActivationCheckpointingConfig = dataclasses.field(default_factory=SelectiveAC.Config)

    ConfigManager()  # registers torchtitan's tyro rules
    plan = make_plan()
    args: list[Any] = [word for flag, value in cli_overrides(plan) for word in (flag, value)] + ["activation-checkpoint:full"]
    parsed = tyro.cli(Section, args=args, registry=custom_registry)
    assert parsed.parallelism.context_parallel_degree == 8 and parsed.training.seq_len == 262144
    assert parsed.training.global_batch_size == 8 and isinstance(parsed.activation_checkpoint, FullAC.Config)


# ----------------------------------------------------------------------- general


def test_bundle_writes_the_plan_and_every_script(tmp_path):
    plan = make_plan()
    written = write_bundle(plan, tmp_path)
    assert sorted(p.name for p in written) == sorted(["plan.yaml", "torchrun.sh", "slurm.sbatch",
                                                      "torchtitan_v0.3.sh", "torchtitan_v0.1.toml"])
    assert all(p.exists() for p in written) and Plan.load(tmp_path / "plan.yaml") == plan
    for path in written:
        if path.suffix in (".sh", ".sbatch"):
            assert path.stat().st_mode & stat.S_IXUSR
            assert path.read_text().splitlines()[0] == "#!/usr/bin/env bash"
            assert "set -euo pipefail" in path.read_text().splitlines()


def test_without_out_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = emit(make_plan(), "slurm")
    assert list(files) == ["slurm.sbatch"] and list(tmp_path.iterdir()) == []
    assert f"PLAN={tmp_path / 'plan.yaml'}" in files["slurm.sbatch"]


def test_bad_target_and_partial_nodes_are_usage_errors():
    with pytest.raises(UsageError, match=r"^--target 'k8s': use one of torchrun, slurm, torchtitan$"):
        emit(make_plan(), "k8s")
    plan = make_plan({"dp_shard": 12}, per_node=8)
    with pytest.raises(UsageError, match="12 GPUs are not a whole number of nodes of 8"):
        emit(plan, "torchrun")


def evil_plan():
    spec = dataclasses.replace(resolve_model("debug"), name="evil\nrm -rf ~ # $(touch pwned) 'q' \"dq\"")
    return make_plan({"dp_shard": 2}, model=spec, seq_len=256)


@needs_bash
def test_model_names_cannot_inject_shell_or_toml(tmp_path, fakes):
    plan = evil_plan()
    files = {}
    for target in TARGETS:
        files.update(emit(plan, target, tmp_path))
    for name, text in files.items():
        for line in text.splitlines():
            assert not line.startswith("rm "), (name, line)
    assert tomllib.loads(files["torchtitan_v0.1.toml"])["job"]["description"] == f"autoplan plan for {plan.model['name']}"
    assert "#SBATCH --job-name=autoplan-evil-rm-rf-touch-pwned-q-dq" in files["slurm.sbatch"]
    fakes(tmp_path / "torchrun.sh")
    assert not (tmp_path / "pwned").exists()


SHELL_PLANS = {
    "single-node": lambda: make_plan({"dp_shard": 8}),
    "multi-node": lambda: make_plan(),
    "mixed-ac-allgather-kv": lambda: make_plan(ac=["full"] * 4 + ["selective"] * 28, cp_impl="allgather-kv",
                                               mesh_order=["dp_replicate", "cp", "dp_shard", "tp"]),
    "unknown-model-evil-name": evil_plan,
}


# CI (CI=true) must run this test: there a missing shellcheck fails instead of skipping.
@pytest.mark.skipif(shutil.which("shellcheck") is None and os.environ.get("CI") != "true",
                    reason="shellcheck not installed (apt-get install -y shellcheck)")
@pytest.mark.parametrize("name", list(SHELL_PLANS))
def test_generated_shell_is_shellcheck_clean(tmp_path, name):
    plan = SHELL_PLANS[name]()
    written = write_bundle(plan, tmp_path) + [tmp_path / name for name in emit(plan, "torchtitan", tmp_path, force=True)]
    scripts = sorted({p for p in written if p.suffix in (".sh", ".sbatch")})
    printed = tmp_path / "printed.sh"  # the form `autoplan emit` prints, with a user's plan path
    printed.write_text(emit(plan, "torchrun", plan_path="my plans/it's.yaml")["torchrun.sh"])
    scripts.append(printed)
    assert len(scripts) == 4
    result = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", *map(str, scripts)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("schedule, virtual, name", [("1f1b", 1, "1F1B"), ("gpipe", 1, "GPipe"),
                                                     ("interleaved-1f1b", 2, "Interleaved1F1B")])
def test_torchtitan_pipeline_keys(schedule, virtual, name):
    """pp > 1: degree, schedule (torch's get_schedule_class name), sequences per micro-batch
    (torchtitan counts those, the plan counts micro-batches), and a stage split like the
    runtime's; every key is one of the wheel's (checked-in lists from the 0.3.0 / 0.1.0 wheels)."""
    plan = make_plan({"dp_shard": 2, "cp": 2, "tp": 2, "pp": 4}, cp_impl="allgather-kv", local_batch_size=16,
                     grad_accum_steps=1, pp_schedule=schedule, pp_virtual_stages=virtual, pp_microbatches=8)
    flags = dict(cli_overrides(plan))
    assert flags["--parallelism.pipeline_parallel_degree"] == "4"
    assert flags["--parallelism.pipeline_parallel_schedule"] == name
    assert flags["--parallelism.pipeline_parallel_microbatch_size"] == "2"  # 16 sequences / 8 micro-batches
    assert flags["--parallelism.pipeline_parallel_first_stage_less_layers"] == "0"
    assert flags["--parallelism.pipeline_parallel_last_stage_less_layers"] == "0"
    if virtual > 1:  # 32 layers / (4 x 2) stages = 4 layers per stage
        assert flags["--parallelism.pipeline_parallel_layers_per_stage"] == "4"
    else:
        assert "--parallelism.pipeline_parallel_layers_per_stage" not in flags
    keys, source = _keys_03()
    for flag in flags:
        section, key = flag[2:].split(".", 1)
        assert key in keys[section], f"{flag} is not a torchtitan 0.3 key ({source})"
    doc = tomllib.loads(emit(plan, "torchtitan", force=True)["torchtitan_v0.1.toml"])
    assert doc["parallelism"]["pipeline_parallel_degree"] == 4
    assert doc["parallelism"]["pipeline_parallel_schedule"] == name
    assert doc["parallelism"]["pipeline_parallel_microbatch_size"] == 2
    # 0.1 asserts (layers + 2) / pp a multiple of layers per stage: none is given (its default: 2 per rank).
    assert "pipeline_parallel_layers_per_stage" not in doc["parallelism"]
    keys01, source01 = _keys_01()
    for key in doc["parallelism"]:
        assert key in keys01["parallelism"], f"[parallelism] {key} is not a torchtitan 0.1 key ({source01})"


def test_torchtitan_pp_one_has_no_pipeline_keys():
    assert not any("pipeline" in flag for flag, _ in cli_overrides(make_plan()))
