"""``autoplan check``: the traced program is named, a ring plan gets no verdict from a trace
of another path, and the traced peak is the independent reference for the prediction.

Both programs are checked: the CPU program (``--program cpu``) and the CUDA program on the
fake CUDA device (``--program cuda``: needs torch 2.13.0 and g++, both on CI's machine)."""

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
    result = _autoplan("check", str(plans["allgather-kv"]), "--program", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("traced: this project's runtime on CPU") and "all-gather-K/V (portable)" in first
    assert "standing in" not in first and "not the CUDA program" in first
    predicted, traced = _peaks(result.stdout)
    assert traced > 0 and abs(predicted / traced - 1) < 0.05
    assert result.stdout.rstrip().endswith(": fits")
    # Almost no usable memory left: the trace's verdict says so, exit 1.
    tight = _autoplan("check", str(plans["allgather-kv"]), "--memory-headroom", "79.64GiB", "--program", "cpu")
    assert tight.returncode == 1 and "DOES NOT FIT" in tight.stdout


def test_ring_plan_is_never_judged_by_a_trace_of_another_path(plans):
    result = _autoplan("check", str(plans["ring-allgather"]), "--program", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "standing in for ring-allgather" in result.stdout.splitlines()[0]
    assert "ring-allgather was not traced" in result.stdout and "no verdict from the trace" in result.stdout
    assert "fits (model only" in result.stdout
    tight = _autoplan("check", str(plans["ring-allgather"]), "--memory-headroom", "79.64GiB", "--program", "cpu")
    assert tight.returncode == 1
    assert "DOES NOT FIT" not in tight.stdout and "does not fit (model only" in tight.stdout


def test_cuda_program_traces_pytorch_ring_attention_and_judges_it(plans):
    result = _autoplan("check", str(plans["ring-allgather"]), "--program", "cuda")
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("traced: the CUDA program on a fake CUDA device")
    assert "ring-allgather (PyTorch's context_parallel)" in first and "SDPA flash" in first
    assert "was not traced" not in result.stdout and result.stdout.rstrip().endswith(": fits")
    tight = _autoplan("check", str(plans["ring-allgather"]), "--memory-headroom", "79.64GiB", "--program", "cuda")
    assert tight.returncode == 1 and "DOES NOT FIT" in tight.stdout


@pytest.fixture(scope="module")
def ring_8b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ring8b")
    made = _autoplan("--gpus", "8", "--gpu", "h100", "--fix", "dp_shard=2,cp=4,tp=1,cp_impl=ring-allgather",
                     "--target-seqlen", "32k", "--out", str(folder))
    assert made.returncode == 0, made.stderr
    return folder / "plan.yaml"


def test_ring_memory_model_within_5_percent_of_the_traced_cuda_program(ring_8b):
    """Llama 3 8B, FSDP 2 x ring CP 4 at 32k: the model's peak against PyTorch's own ring
    attention, FSDP2 bf16 mixed precision and flash SDPA, traced on the fake CUDA device."""
    result = _autoplan("check", str(ring_8b), "--program", "cuda")
    assert result.returncode in (0, 1), result.stderr
    predicted, traced = _peaks(result.stdout)
    assert abs(predicted / traced - 1) < 0.05, result.stdout


def test_fake_cuda_refuses_other_torch_versions(monkeypatch):
    from runtime import fake_cuda

    monkeypatch.setattr(fake_cuda, "torch_version", lambda: "2.12.1")
    with pytest.raises(fake_cuda.FakeCudaUnavailable, match="tested on torch 2.13.0 only"):
        fake_cuda.library_path()
