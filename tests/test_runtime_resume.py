"""Checkpoints and resume, end to end through ``autoplan run``: saved by default, resumed
without duplicate metrics, damaged ones skipped, other plans' refused. The reference is
an uninterrupted run of the same plan without checkpoints."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import TINY, run_plan, write_plan

REPO = Path(__file__).resolve().parents[1]


def autoplan_run(plan, *extra, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "autoplan", "run", str(plan), "--device", "cpu", *map(str, extra)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def steps_and_losses(metrics: Path):
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def single_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.mark.timeout(400)
def test_autoplan_run_checkpoints_resumes_and_falls_back(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 2}, local_batch_size=1)
    code, straight, err = run_plan(plan, 2, 6, tmp_path)  # the reference: one run, no checkpoints
    assert code == 0 and len(straight) == 6, err[-2000:]
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"

    first = autoplan_run(plan, "--steps", 3, "--checkpoint-dir", ck, "--metrics", metrics)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (ck / "step-3" / "COMPLETE").exists()  # no --checkpoint-every: saved at the end anyway
    with metrics.open("a") as out:  # a crash after step 3 left a line the checkpoint does not cover
        out.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")

    second = autoplan_run(plan, "--steps", 6, "--checkpoint-dir", ck, "--resume", "--checkpoint-every", 2,
                          "--metrics", metrics)
    assert second.returncode == 0, second.stderr[-3000:]
    assert steps_and_losses(metrics) == (list(range(1, 7)), straight)  # exact, and no step twice
    assert (ck / "step-4" / "COMPLETE").exists() and (ck / "step-6" / "COMPLETE").exists()

    # another model's plan, and another layout's, are refused in one line before torchrun starts
    other = write_plan(tmp_path / "other.yaml", {"dp_shard": 2}, local_batch_size=1,
                       model=dataclasses.replace(TINY, n_layers=3))
    line = single_line(autoplan_run(other, "--steps", 8, "--checkpoint-dir", ck, "--resume"))
    assert "another model or layout" in line and "n_layers=2, this plan has 3" in line
    wider = write_plan(tmp_path / "wider.yaml", {"dp_shard": 2}, local_batch_size=2)
    line = single_line(autoplan_run(wider, "--steps", 8, "--checkpoint-dir", ck, "--resume"))
    assert "local_batch_size=1, this plan has 2" in line

    # rank 1's shard of the newest checkpoint cut short: step-4 is used, with one warning
    shard = ck / "step-6" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    third = autoplan_run(plan, "--steps", 6, "--checkpoint-dir", ck, "--resume", "--metrics", metrics)
    assert third.returncode == 0, third.stderr[-3000:]
    warnings = [line for line in third.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step-6" in warnings[0] and "truncated" in warnings[0] and "step-4" in warnings[0]
    assert steps_and_losses(metrics) == (list(range(1, 7)), straight)

    # nothing whole left: one line, before torchrun starts
    for step in (4, 6):
        (ck / f"step-{step}" / "__1_0.distcp").write_bytes(b"")
    for step in (3,):
        (ck / f"step-{step}" / "__0_0.distcp").unlink()
    line = single_line(autoplan_run(plan, "--steps", 8, "--checkpoint-dir", ck, "--resume"))
    assert "no complete checkpoint" in line and "step-3 cannot be loaded: shard __0_0.distcp is missing" in line
