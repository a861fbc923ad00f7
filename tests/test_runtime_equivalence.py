"""Every layout trains exactly like one process: same seed, same global batch, fp32, gloo.

Reference: one plain process running the same plan shape (global batch 4 x 64 tokens).
Each layout runs 20 steps; max |loss difference| must stay <= 1e-4. The 4-process
layouts share one torchrun launch (tests/runtime_layout_worker.py); the 8-process one
goes through the CLI. A negative control (FSDP sharded over dp_shard only while cp=2)
must diverge.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import free_port, run_plan, write_plan

STEPS = 20
GLOBAL_BATCH = 4
SEQ = 64
ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "dp_shard4": dict(parallelism={"dp_shard": 4}),
    "dp_shard2_cp2": dict(parallelism={"dp_shard": 2, "cp": 2}, modes=["full", "selective"]),
    "cp4": dict(parallelism={"cp": 4}),
    "tp2_cp2": dict(parallelism={"tp": 2, "cp": 2}, modes=["selective", "none"]),
    "hsdp_rep2_shard2": dict(parallelism={"dp_replicate": 2, "dp_shard": 2}),
    "tp2_dp_shard2": dict(parallelism={"tp": 2, "dp_shard": 2}, modes=["full", "full"]),
    "cp_outermost_order": dict(parallelism={"dp_shard": 2, "cp": 2},
                               mesh_order=["cp", "tp", "dp_replicate", "dp_shard"]),
    "hsdp_cp_8proc_reordered": dict(parallelism={"dp_replicate": 2, "dp_shard": 2, "cp": 2},
                                       mesh_order=["cp", "dp_shard", "tp", "dp_replicate"]),
}
NEGATIVE = "negative_fsdp_over_dp_shard_only"


def _plan(tmp: Path, name: str) -> tuple[Path, int]:
    spec = dict(LAYOUTS.get(name, LAYOUTS["dp_shard2_cp2"] if name == NEGATIVE else {}))
    parallelism = spec.pop("parallelism", {})
    dp = parallelism.get("dp_replicate", 1) * parallelism.get("dp_shard", 1)
    world = dp * parallelism.get("cp", 1) * parallelism.get("tp", 1)
    path = write_plan(tmp / f"{name}.yaml", parallelism, seq_len=SEQ, local_batch_size=GLOBAL_BATCH // dp, **spec)
    return path, world


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = {}
    # Reference: one plain process through the CLI.
    reference, _ = _plan(tmp, "single")
    single = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(reference), "--steps", str(STEPS),
                             "--device", "cpu", "--metrics", str(tmp / "single.jsonl")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=dict(env, MASTER_PORT=str(free_port())))
    assert single.returncode == 0, single.stderr[-3000:]
    out["single"] = _losses(tmp / "single.jsonl")
    # All 4-process layouts (and the negative control) in one launch.
    jobs = []
    for name in [n for n in LAYOUTS if "8proc" not in n] + [NEGATIVE]:
        path, world = _plan(tmp, name)
        assert world == 4
        jobs.append({"plan": str(path), "metrics": str(tmp / f"{name}.jsonl"), "steps": STEPS,
                     "shard_over_cp": name != NEGATIVE})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    # --standalone: torchrun binds its store on a free port itself (no port picked here and raced for).
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                             str(ROOT / "tests" / "runtime_layout_worker.py"),
                             str(tmp / "jobs.json")], capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    out["launch_stderr"] = launch.stderr[-3000:]
    for job in jobs:
        out[Path(job["plan"]).stem] = _losses(Path(job["metrics"]))
    # The 8-process layout through the CLI (torchrun + runtime.train).
    path, world = _plan(tmp, "hsdp_cp_8proc_reordered")
    code, losses, err = run_plan(path, world, STEPS, tmp, timeout=300)
    out["hsdp_cp_8proc_reordered"] = losses if code == 0 else []
    out["8proc_stderr"] = err[-3000:]
    return out


def test_reference_trains(results):
    losses = results["single"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, results):
    losses = results[name]
    assert len(losses) == STEPS, results["8proc_stderr" if "8proc" in name else "launch_stderr"]
    worst = max(abs(a - b) for a, b in zip(losses, results["single"]))
    assert worst <= 1e-4, f"{name}: max |loss diff| {worst:.2e}"


def test_negative_control_fsdp_over_dp_shard_only_diverges(results):
    """CP ranks hold different tokens: not reducing their gradients must break training."""
    losses = results[NEGATIVE]
    assert len(losses) == STEPS, results["launch_stderr"]
    assert max(abs(a - b) for a, b in zip(losses, results["single"])) > 1e-3
