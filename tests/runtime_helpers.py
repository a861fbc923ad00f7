"""Helpers for runtime tests: write a tiny plan, run it under torchrun with a timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from autoplan.plan import ActivationCheckpointDoc, Plan
from cost_models.config import ACPolicy
from cost_models.specs import ModelSpec

TINY = ModelSpec("tiny", vocab_size=128, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=96,
                 rope_theta=10000.0)


def write_plan(path: Path, parallelism: dict, seq_len: int = 32, local_batch_size: int = 2,
               grad_accum_steps: int = 1, modes=None, mesh_order=None, model: ModelSpec = TINY,
               loss_chunk_tokens: int | None = 24) -> Path:
    ac = ActivationCheckpointDoc.from_policy(ACPolicy(tuple(modes))) if modes else ActivationCheckpointDoc()
    dp = parallelism.get("dp_replicate", 1) * parallelism.get("dp_shard", 1)
    plan = Plan(seq_len=seq_len, local_batch_size=local_batch_size, grad_accum_steps=grad_accum_steps,
                parallelism=parallelism, model=model.to_dict(), precision={"param_dtype": "float32"},
                optimizer={"lr": 3e-3, "warmup_steps": 3, "total_steps": 30}, activation_checkpoint=ac,
                loss_chunk_tokens=loss_chunk_tokens,
                **({"mesh_order": list(mesh_order)} if mesh_order else {}))
    assert plan.global_batch_tokens == seq_len * local_batch_size * grad_accum_steps * dp
    return plan.save(path)


def free_port() -> int:
    """A port free now (for single-process runs only: another process may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plan(plan_path: Path, nproc: int, steps: int, tmp: Path, extra=(), timeout: float = 240.0):
    """Run runtime.train under torchrun; returns (returncode, losses, stderr)."""
    metrics = tmp / f"metrics-{plan_path.stem}-{nproc}.jsonl"
    if metrics.exists():
        metrics.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: torchrun's c10d store binds port 0 itself, so no port is picked here and
    # raced for (free_port() bound, released and reused a port across launches).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "runtime.train", "--plan", str(plan_path),
               "--steps", str(steps), *(() if "--device" in extra else ("--device", "cpu")), "--metrics", str(metrics), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    losses = []
    if metrics.exists():
        losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    return result.returncode, losses, result.stderr


def failure_text(stderr: str, keep: int = 40) -> str:
    """What a failed torchrun launch said, for an assertion message: the workers' own error
    lines (an abort's "terminate called ..." comes before torchrun's long summary, which a
    plain tail cuts off), then the tail."""
    lines = stderr.splitlines()
    marks = ("terminate", "Error", "error:", "Abort", "abort", "Traceback", "Signal")
    own = [line for line in lines if any(mark in line for mark in marks)][:keep]
    return "\n".join(own) + "\n...\n" + stderr[-1500:]
