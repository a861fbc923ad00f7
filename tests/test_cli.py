"""The command line: the headline command, bad input, and a fuzz test for tracebacks."""

import json
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoplan.cli import main
from autoplan.errors import UsageError
from autoplan.fix import parse_fix
from autoplan.plan import Plan
from autoplan.units import format_tokens, parse_batch_tokens, parse_seq_len, parse_train_tokens
from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.specs import ClusterSpec, resolve_gpu, resolve_model
from cost_models.step import estimate_step


def test_sizes():
    assert parse_seq_len("256k") == 262144 == parse_seq_len("262144") == parse_seq_len("256K")
    assert parse_seq_len("1M") == 1048576
    assert parse_batch_tokens("4M") == 4 * 1024 * 1024
    assert parse_train_tokens("1T") == 10**12 and parse_train_tokens("300B") == 3 * 10**11
    assert format_tokens(262144) == "256k" and format_tokens(1048576) == "1M" and format_tokens(1000) == "1000"
    for bad in ("abc", "-5", "0", "1.5", "12q"):
        with pytest.raises(UsageError, match="--target-seqlen"):
            parse_seq_len(bad)


def test_fix_parsing():
    assert parse_fix("dp_shard=8,cp=2,tp=1,local_batch_size=1") == {"dp_shard": 8, "cp": 2, "tp": 1,
                                                                    "local_batch_size": 1}
    assert parse_fix("cp_impl=ring-alltoall,ac=full")["cp_impl"] == "ring-alltoall"
    assert parse_fix("mesh_order=dp_replicate/cp/dp_shard/tp")["mesh_order"] == ("dp_replicate", "cp", "dp_shard", "tp")
    for bad, flag in (("tp", "knob=value"), ("foo=1", "unknown knob"), ("tp=x", "positive integer"),
                      ("cp_impl=ring", "cp_impl"), ("mesh_order=tp/cp", "mesh_order")):
        with pytest.raises(UsageError, match=flag):
            parse_fix(bad)


def test_headline_command_plans_and_names_the_defaults(capsys):
    assert main(["--gpus", "64", "--target-seqlen", "256k"]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b" in out and "h100-sxm-80gb" in out
    assert "dp_shard=" in out and "tokens/s/GPU" in out and "alternatives" in out


def test_json_plan_reprices_to_itself_and_its_static_memory_is_hand_derived(capsys):
    assert main(["--gpus", "16", "--target-seqlen", "128k", "--format", "json", "--top", "1"]) == 0
    plan = Plan.model_validate(json.loads(capsys.readouterr().out))
    assert plan.parallelism.world_size == 16 and plan.seq_len == 131072
    model = resolve_model("llama3-8b")
    cfg = TrainConfig(Parallelism(**plan.parallelism.model_dump()), plan.seq_len, plan.local_batch_size,
                      plan.grad_accum_steps, ACPolicy(plan.activation_checkpoint.layer_modes(model.n_layers)),
                      plan.cp_impl, tuple(plan.mesh_order))
    # The JSON document carries everything needed to price the plan again (a round trip) ...
    est = estimate_step(model, ClusterSpec(resolve_gpu("h100"), 16), cfg)
    assert plan.predicted.peak_memory_bytes == pytest.approx(est.peak_memory_bytes)
    assert plan.predicted.peak_memory_bytes <= plan.predicted.memory_usable_bytes
    # ... and its static memory is what hand arithmetic gives: 8,030,261,248 parameters
    # sharded over tp x dp_shard x cp, fp32 master copy (4 B) and two fp32 AdamW states (8 B).
    p = plan.parallelism
    shard = 8_030_261_248 / (p.tp * p.dp_shard * p.cp)
    assert plan.predicted.memory_breakdown_bytes["params"] == pytest.approx(4 * shard)
    assert plan.predicted.memory_breakdown_bytes["optimizer"] == pytest.approx(8 * shard)


def test_fix_pins_degrees(capsys):
    assert main(["--gpus", "32", "--target-seqlen", "64k", "--fix", "tp=4,cp=2", "--format", "yaml"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["parallelism"]["tp"] == 4 and plan["parallelism"]["cp"] == 2


def test_infeasible_target_gets_advice(capsys):
    assert main(["--gpus", "8", "--target-seqlen", "4M"]) == 1
    out = capsys.readouterr().out
    assert "no layout fits" in out and "GPUs" in out and "longest sequence" in out


@pytest.mark.parametrize("argv, flag", [
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "8", "--target-seqlen", "abc"], "--target-seqlen"),
    (["--gpus", "8", "--target-seqlen", "8k", "--fix", "tp=3"], "tp=3"),
    (["--gpus", "8", "--gpu", "tpu-v9"], "--gpu"),
    (["--gpus", "8", "--model", "gpt-9"], "--model"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and flag in err[-1] and "Traceback" not in "\n".join(err)


tokens = st.sampled_from(["--gpus", "--target-seqlen", "--model", "--gpu", "--fix", "--objective", "--ac",
                          "--format", "--top", "--executor", "--global-batch-tokens", "--gpus-per-node", "plan",
                          "probe", "8", "64", "0", "-1", "256k", "1M", "abc", "tp=8", "cp=3", "full", "json",
                          "llama3-70b", "h100", "x=y", "", "1.5", "max-seqlen", "min-gpus", "4M"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(tokens, max_size=6))
def test_fuzzed_arguments_never_escape_a_traceback(argv, capsys):
    try:
        code = main(["--time-limit", "5"] + argv if argv and argv[0] not in ("plan", "probe") else argv)
    except SystemExit as exit_:  # argparse: usage error, exit 2 (or 0 for --help)
        code = exit_.code
    captured = capsys.readouterr()
    assert code in (0, 1, 2)
    assert "Traceback" not in captured.err + captured.out


def test_planning_does_not_import_torch():
    code = ("import sys; from autoplan.cli import main; main(['--gpus', '8', '--target-seqlen', '8k']);"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_out_is_checked_before_planning(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "bundle"):
        assert main(["--model", "debug", "--gpus", "1", "--target-seqlen", "1k", "--out", str(out)]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and printed.err.count("\n") == 1 and f"--out {out}: " in printed.err


def test_closed_stdout_is_not_a_traceback():
    """`autoplan ... | head`: the reader goes away; no BrokenPipeError traceback."""
    process = subprocess.Popen([sys.executable, "-m", "autoplan", "--model", "debug", "--gpus", "8",
                                "--target-seqlen", "1k", "--format", "json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the plan is printed: every write meets a closed pipe
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-2000:]
    assert process.returncode == 141
