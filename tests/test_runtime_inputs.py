"""runtime.train's inputs and output: contradictory flags, unwritable paths, the token
file's dtype, progress lines and the measured-vs-predicted summary. One plain process
each (no torchrun), so the exit code and stderr are runtime.train's own."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime.data import DataError, TokenSource
from runtime_helpers import free_port, run_plan, write_plan


def train(plan, *extra, timeout=100):
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(plan), "--device", "cpu",
                           *map(str, extra)], capture_output=True, text=True, timeout=timeout, env=env)


def one_line(result, *texts):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all(text in lines[0] for text in texts), lines[0]


@pytest.mark.timeout(200)
def test_contradictory_flags_are_one_line_errors(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {}, local_batch_size=1)
    metrics = tmp_path / "m.jsonl"
    ck = tmp_path / "ck"
    one_line(train(plan, "--steps", 0, "--metrics", metrics), "--steps 0")
    one_line(train(plan, "--steps", -3, "--metrics", metrics), "--steps -3")
    one_line(train(plan, "--checkpoint-every", -1, "--checkpoint-dir", ck), "--checkpoint-every -1")
    one_line(train(plan, "--resume"), "--resume needs --checkpoint-dir")
    one_line(train(plan, "--resume", "--checkpoint-dir", ck), "no checkpoint in", "without --resume")
    assert not metrics.exists() and not ck.exists()  # nothing trained, nothing written
    assert train(plan, "--steps", 2, "--checkpoint-dir", ck, "--log-every", 0).returncode == 0
    one_line(train(plan, "--steps", 4, "--checkpoint-dir", ck), "already holds checkpoints (step-2)", "--resume")
    one_line(train(plan, "--steps", 2, "--checkpoint-dir", ck, "--resume"), "at step 2 and --steps is 2")


@pytest.mark.timeout(200)
def test_unwritable_outputs_are_found_before_training(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {}, local_batch_size=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    metrics = tmp_path / "m.jsonl"
    one_line(train(plan, "--metrics", blocker / "m.jsonl"), "--metrics", "is a file, not a folder")
    one_line(train(plan, "--metrics", tmp_path), "--metrics", "is a folder")
    one_line(train(plan, "--checkpoint-dir", blocker / "ck"), "--checkpoint-dir", "is a file, not a folder")
    # --record was only opened after the whole run; now nothing trains (no metrics line)
    one_line(train(plan, "--metrics", metrics, "--record", blocker / "r.jsonl"), "--record", "is a file")
    assert not metrics.exists()


def test_token_file_dtype_comes_from_a_sidecar_or_the_flag(tmp_path):
    ids = (np.arange(2000, dtype=np.int64) * 7) % 128
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    with pytest.raises(DataError, match="dtype unknown; pass --data-dtype"):  # was read as uint16: garbage
        TokenSource(vocab_size=128, seq_len=31, path=str(path))
    (tmp_path / "tokens.bin.json").write_text(json.dumps({"dtype": "int64"}))
    source = TokenSource(vocab_size=128, seq_len=31, path=str(path))
    assert torch.equal(source.sample(3), torch.from_numpy(ids[96:128]))
    with pytest.raises(DataError, match="--data-dtype uint16 contradicts"):
        TokenSource(vocab_size=128, seq_len=31, path=str(path), dtype="uint16")
    with pytest.raises(DataError, match=r"max token id 127 >= the model's vocab_size 100"):
        TokenSource(vocab_size=100, seq_len=31, path=str(path))
    flagged = tmp_path / "flagged.bin"
    ids.astype(np.uint32).tofile(flagged)
    assert torch.equal(TokenSource(128, 31, path=str(flagged), dtype="uint32").sample(0), torch.from_numpy(ids[:32]))


@pytest.mark.timeout(100)
def test_odd_byte_count_is_one_line(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {}, local_batch_size=1)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(np.arange(500, dtype=np.uint16).tobytes() + b"\x01")
    one_line(train(plan, "--data", odd, "--data-dtype", "uint16"), "1001 bytes is not a whole number of uint16")


@pytest.mark.timeout(100)
def test_progress_lines_and_no_cross_device_ratio(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {}, local_batch_size=1)
    metrics = tmp_path / "m.jsonl"
    result = train(plan, "--steps", 5, "--log-every", 2, "--metrics", metrics)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    progress = [line for line in result.stdout.splitlines() if re.match(r"step \d", line)]
    assert [line.split("  ")[:2] for line in progress] == [["step 2/5", f"loss {losses[1]:.4f}"],
                                                           ["step 4/5", f"loss {losses[3]:.4f}"],
                                                           ["step 5/5", f"loss {losses[4]:.4f}"]]
    assert all("tokens/s/GPU" in line and "GiB" in line for line in progress)
    assert "ratio" not in result.stdout and "nothing to compare" in result.stdout and "this run is on cpu" in result.stdout


def test_summary_compares_only_on_the_planned_gpu(tmp_path, capsys):
    from autoplan.cli import main
    from autoplan.plan import Plan
    from runtime.metrics import format_summary

    assert main(["--model", "debug", "--gpus", "1", "--gpu", "h100", "--target-seqlen", "1k", "--format", "yaml",
                 "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    plan = Plan.load(tmp_path / "plan.yaml")
    predicted = plan.predicted.step_time_s
    summary = {"step_time_s": 3 * predicted, "tokens_per_second_per_gpu": None, "mfu": None, "peak_memory_bytes": None}
    same = format_summary(plan, summary, "h100-sxm-80gb")
    assert "ratio" in same and [line.split()[-1] for line in same.splitlines() if "step time" in line] == ["3.00"]
    other = format_summary(plan, summary, "cpu")
    assert "ratio" not in other and f"{predicted:.4f}" not in other and "nothing to compare" in other


@pytest.mark.timeout(150)
def test_dtensor_rank_warning_printed_once(tmp_path):
    plan = write_plan(tmp_path / "tp.yaml", {"tp": 2}, local_batch_size=1)
    code, losses, err = run_plan(plan, 2, 2, tmp_path, timeout=140)
    assert code == 0 and len(losses) == 2, err[-2000:]
    assert err.count("inconsistent results between ranks") == 1  # was once per TP rank


@pytest.mark.timeout(100)
def test_autoplan_run_checks_before_torchrun(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 2}, local_batch_size=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    metrics = tmp_path / "m.jsonl"
    for extra, text in ((["--record", blocker / "r.jsonl"], "--record"), (["--resume"], "--resume needs"),
                        (["--checkpoint-dir", blocker], "--checkpoint-dir")):
        result = subprocess.run([sys.executable, "-m", "autoplan", "run", str(plan), "--device", "cpu",
                                 "--metrics", str(metrics), *map(str, extra)],
                                capture_output=True, text=True, timeout=90, env=dict(os.environ, OMP_NUM_THREADS="1"))
        one_line(result, "autoplan: error:", text)
        assert not metrics.exists()  # torchrun never started


@pytest.mark.timeout(100)
def test_worker_error_under_autoplan_run_is_one_line(tmp_path):
    """An error only the workers find (here: seq_len 34 does not split into 2 x cp chunks)
    is printed once, without each rank's copy or torchrun's ChildFailedError."""
    plan = write_plan(tmp_path / "plan.yaml", {"cp": 2}, seq_len=34, local_batch_size=1)
    result = subprocess.run([sys.executable, "-m", "autoplan", "run", str(plan), "--device", "cpu"],
                            capture_output=True, text=True, timeout=90, env=dict(os.environ, OMP_NUM_THREADS="1"))
    one_line(result, "autoplan: error: seq_len=34 must split into 2 x cp = 4 equal chunks")


@pytest.mark.timeout(100)
def test_error_printed_by_rank_0_only_under_torchrun(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 2}, local_batch_size=1)
    code, losses, err = run_plan(plan, 2, 3, tmp_path, extra=["--checkpoint-every", "-1", "--checkpoint-dir",
                                                             str(tmp_path / "ck")], timeout=90)
    assert code != 0 and losses == [] and err.count("runtime.train: error: --checkpoint-every -1") == 1, err[-2000:]
