"""``autoplan check``: the traced program is named, a ring plan gets no verdict from a trace
of another path, and the traced peak is the independent reference for the prediction."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def _autoplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoplan", *args], capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = {}
    for impl in ("allgather-kv", "ring-allgather"):
        folder = tmp_path_factory.mktemp(impl)
        made = _autoplan("--model", "debug", "--gpu", "h100", "--gpus", "4", "--gpus-per-node", "4",
                         "--fix", f"dp_shard=2,cp=2,tp=1,cp_impl={impl}", "--target-seqlen", "4k", "--out", str(folder))
        assert made.returncode == 0, made.stderr
        out[impl] = folder / "plan.yaml"
    return out


def _peaks(stdout: str) -> tuple[float, float]:
    row = next(line for line in stdout.splitlines() if line.startswith("fwd+bwd peak"))
    predicted, traced = row.split()[2:4]
    return float(predicted), float(traced)


def test_traced_path_gets_a_verdict_and_matches_the_prediction(plans):
    result = _autoplan("check", str(plans["allgather-kv"]))
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("traced: this project's runtime on CPU") and "all-gather-K/V (portable)" in first
    assert "standing in" not in first and "not the CUDA program" in first
    predicted, traced = _peaks(result.stdout)
    assert traced > 0 and abs(predicted / traced - 1) < 0.05
    assert result.stdout.rstrip().endswith(": fits")
    # Almost no usable memory left: the trace's verdict says so, exit 1.
    tight = _autoplan("check", str(plans["allgather-kv"]), "--memory-headroom", "79.64GiB")
    assert tight.returncode == 1 and "DOES NOT FIT" in tight.stdout


def test_ring_plan_is_never_judged_by_a_trace_of_another_path(plans):
    result = _autoplan("check", str(plans["ring-allgather"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "standing in for ring-allgather" in result.stdout.splitlines()[0]
    assert "ring-allgather was not traced" in result.stdout and "no verdict from the trace" in result.stdout
    assert "fits (model only" in result.stdout
    tight = _autoplan("check", str(plans["ring-allgather"]), "--memory-headroom", "79.64GiB")
    assert tight.returncode == 1
    assert "DOES NOT FIT" not in tight.stdout and "does not fit (model only" in tight.stdout
