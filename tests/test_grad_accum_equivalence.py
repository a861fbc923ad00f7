"""Gradient accumulation trains exactly like one big batch (one process, fp32).

Reference: the same global batch (4 sequences of 32 tokens) as one micro-batch of 4.
Accumulating 2 x 2 or 4 x 1 must give the same loss and grad norm every step (to 1e-5)
and the same parameters after the last step (read back from the checkpoint). A loss
that is not divided by the accumulation steps reports (and back-propagates) the sum of
the micro-batch losses instead of their mean, and fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from runtime_helpers import free_port, write_plan

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
GLOBAL_SEQUENCES = 4


def _train(tmp: Path, local_batch: int, accum: int) -> tuple[list[dict], dict]:
    name = f"b{local_batch}_accum{accum}"
    plan = write_plan(tmp / f"{name}.yaml", {}, seq_len=32, local_batch_size=local_batch, grad_accum_steps=accum)
    metrics, ckpt = tmp / f"{name}.jsonl", tmp / f"{name}-ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(plan), "--device", "cpu",
                           "--steps", str(STEPS), "--metrics", str(metrics), "--checkpoint-dir", str(ckpt),
                           "--checkpoint-every", str(STEPS)],
                          capture_output=True, text=True, timeout=150, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    flat = tmp / f"{name}.pt"
    dcp_to_torch_save(str(ckpt / f"step-{STEPS}"), str(flat))
    model = torch.load(flat, weights_only=False)["model"]
    return records, {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}


@pytest.mark.timeout(480)
def test_grad_accumulation_matches_one_big_batch(tmp_path):
    big_records, big_params = _train(tmp_path, GLOBAL_SEQUENCES, 1)
    assert len(big_records) == STEPS and len(big_params) > 5
    losses = [r["loss"] for r in big_records]
    assert losses[-1] < losses[0]  # it trains: the comparison is not between constants
    for accum in (2, 4):
        records, params = _train(tmp_path, GLOBAL_SEQUENCES // accum, accum)
        for mine, ref in zip(records, big_records, strict=True):
            assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5), (accum, mine["step"])
            assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5, abs=1e-6), (accum, mine["step"])
        assert params.keys() == big_params.keys()
        worst = max((params[k] - big_params[k]).abs().max().item() for k in params)
        assert worst < 1e-5, f"accum={accum}: parameters differ by {worst:.2e}"


@pytest.mark.timeout(300)
def test_grad_accumulation_under_tensor_parallel(tmp_path):
    """TP's loss_parallel context is entered once per micro-batch (it cannot be re-entered):
    2 TP ranks accumulating 2 x 2 sequences match one process with a batch of 4."""
    from runtime_helpers import run_plan

    single = write_plan(tmp_path / "single.yaml", {}, seq_len=32, local_batch_size=GLOBAL_SEQUENCES)
    tp_accum = write_plan(tmp_path / "tp2_accum2.yaml", {"tp": 2}, seq_len=32, local_batch_size=2, grad_accum_steps=2)
    rc1, reference, err1 = run_plan(single, 1, STEPS, tmp_path)
    rc2, losses, err2 = run_plan(tp_accum, 2, STEPS, tmp_path)
    assert rc1 == 0 and rc2 == 0, (err1 + err2)[-3000:]
    assert len(losses) == len(reference) == STEPS
    assert max(abs(a - b) for a, b in zip(reference, losses)) <= 1e-5
