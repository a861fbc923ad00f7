"""GPU checks (skipped without CUDA): PyTorch's ring attention through the runtime's
native CP path against one process, and a short FSDP + TP + CP run in bf16."""

import pytest
import torch

from runtime_helpers import run_plan, write_plan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for CP")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cp_impl", ["ring-allgather", "ring-alltoall", "allgather-kv"])
def test_cuda_context_parallel_matches_single_process(tmp_path, cp_impl):
    ref = write_plan(tmp_path / "ref.yaml", {}, seq_len=64, local_batch_size=2)
    code, base, err = run_plan(ref, 1, 10, tmp_path, extra=["--device", "cuda"])
    assert code == 0, err[-2000:]
    plan = write_plan(tmp_path / "cp.yaml", {"cp": 2}, seq_len=64, local_batch_size=2)
    text = plan.read_text().replace("cp_impl: allgather-kv", f"cp_impl: {cp_impl}")
    plan.write_text(text)
    code, losses, err = run_plan(plan, 2, 10, tmp_path, extra=["--device", "cuda"])
    assert code == 0, err[-2000:]
    assert max(abs(a - b) for a, b in zip(losses, base)) < 2e-3  # TF32 / kernel order differences


@pytest.mark.timeout(600)
@pytest.mark.skipif(torch.cuda.device_count() < 8, reason="needs 8 GPUs")
def test_fsdp_tp_cp_run_on_cuda(tmp_path):
    plan = write_plan(tmp_path / "p.yaml", {"dp_shard": 2, "tp": 2, "cp": 2}, seq_len=128, local_batch_size=1)
    code, losses, err = run_plan(plan, 8, 5, tmp_path, extra=["--device", "cuda"])
    assert code == 0 and len(losses) == 5, err[-2000:]
