"""Runtime pieces against independent references: fp64 full attention, autograd, a file."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.context_parallel import chunked_causal_attention, head_tail_chunks, reorder_gathered, shard_sequence
from runtime.data import DataError, TokenSource
from runtime.model import RMSNormFunction
from runtime_helpers import failure_text, free_port, run_plan, write_plan


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4), (3, 1)])
def test_portable_cp_attention_is_exact_in_fp64(cp, heads, kv_heads):
    torch.manual_seed(cp * 10 + heads)
    batch, seq, dim = 2, 6 * cp, 8
    q = torch.randn(batch, heads, seq, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, dim, dtype=torch.float64, requires_grad=True)
    group = heads // kv_heads
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                               is_causal=True)
    grad_out = torch.randn_like(reference)
    dq, dk, dv = torch.autograd.grad(reference, (q, k, v), grad_out)
    dk_sum, dv_sum = torch.zeros_like(k), torch.zeros_like(v)
    for rank in range(cp):  # every rank's view; K/V as the all-gather delivers them
        q_local = shard_sequence(q.detach(), rank, cp, dim=2).requires_grad_()
        k_full, v_full = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
        out = chunked_causal_attention(q_local, k_full, v_full, head_tail_chunks(rank, cp))
        assert (out - shard_sequence(reference, rank, cp, dim=2)).abs().max() < 1e-12
        gq, gk, gv = torch.autograd.grad(out, (q_local, k_full, v_full), shard_sequence(grad_out, rank, cp, dim=2))
        assert (gq - shard_sequence(dq, rank, cp, dim=2)).abs().max() < 1e-12
        dk_sum += gk  # the all-gather's backward is a reduce-scatter: a sum over ranks
        dv_sum += gv
    assert (dk_sum - dk).abs().max() < 1e-12 and (dv_sum - dv).abs().max() < 1e-12


def test_gathered_chunks_reorder_to_the_sequence():
    cp = 3
    seq = torch.arange(12).view(1, 1, 12, 1)
    gathered = torch.cat([shard_sequence(seq, r, cp, dim=2) for r in range(cp)], dim=2)
    assert torch.equal(reorder_gathered(gathered, cp), seq)


def test_rmsnorm_function_gradcheck():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x, w))
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(RMSNormFunction.apply(x, w, 1e-5), expected)


def test_token_file_and_too_short_file(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 100
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    source = TokenSource(vocab_size=128, seq_len=31, path=str(path), dtype="uint16")
    assert torch.equal(source.sample(1), torch.from_numpy(ids[32:64].astype(np.int64)))
    (tmp_path / "short.bin").write_bytes(ids[:10].tobytes())
    with pytest.raises(DataError, match="fewer than one step needs"):
        TokenSource(vocab_size=128, seq_len=31, path=str(tmp_path / "short.bin"), dtype="uint16")
    with pytest.raises(DataError, match=r"fewer than one step needs \(64 sequences"):
        TokenSource(vocab_size=128, seq_len=31, path=str(path), sequences_per_step=64, dtype="uint16")


@pytest.mark.timeout(300)
def test_resume_continues_bit_for_bit(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 2}, local_batch_size=2)
    code, straight, err = run_plan(plan, 2, 10, tmp_path)
    assert code == 0, failure_text(err)
    ckpt = tmp_path / "ckpt"
    code, first, err = run_plan(plan, 2, 5, tmp_path, extra=["--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"])
    assert code == 0, failure_text(err)
    assert (ckpt / "step-5" / "COMPLETE").exists()
    code, second, err = run_plan(plan, 2, 10, tmp_path, extra=["--checkpoint-dir", str(ckpt), "--resume"])
    assert code == 0, failure_text(err)
    assert first + second == straight  # exact equality, not approximately


def _run_single(plan, tmp_path, *extra, world: int = 1):
    """One plain process (no torchrun), so the exit code is runtime.train's own."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(world), RANK="0", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(plan), "--device", "cpu", *extra],
                          capture_output=True, text=True, timeout=100, env=env)


def _one_clear_line(result, text):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1 and text in lines[0], result.stderr[-2000:]


@pytest.mark.timeout(240)
def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 4}, local_batch_size=1)
    _one_clear_line(_run_single(plan, tmp_path, world=2), "= 4, but 2 processes were started")
    code, _, err = run_plan(plan, 2, 2, tmp_path, timeout=100)  # under torchrun: fails, no hang
    assert code != 0 and "= 4, but 2 processes were started" in err
    ids = np.arange(10, dtype=np.uint16)
    (tmp_path / "short.bin").write_bytes(ids.tobytes())
    plan1 = write_plan(tmp_path / "one.yaml", {}, local_batch_size=1)
    _one_clear_line(_run_single(plan1, tmp_path, "--data", str(tmp_path / "short.bin"), "--data-dtype", "uint16"), "fewer than one step needs")
    broken = tmp_path / "ckpt" / "step-3"
    broken.mkdir(parents=True)
    (broken / "COMPLETE").write_text("3")
    (broken / "trainer_state.json").write_text("{not json")
    _one_clear_line(_run_single(plan1, tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"),
                    "cannot be loaded")
    partial = tmp_path / "ckpt2" / "step-4.tmp"
    partial.mkdir(parents=True)
    _one_clear_line(_run_single(plan1, tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt2"), "--resume"),
                    "no complete checkpoint")


@pytest.mark.timeout(180)
def test_autoplan_run_wraps_torchrun(tmp_path):
    import subprocess
    import sys
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 2}, local_batch_size=1)
    metrics = tmp_path / "m.jsonl"
    record = tmp_path / "record.jsonl"
    result = subprocess.run([sys.executable, "-m", "autoplan", "run", str(plan), "--steps", "3", "--device", "cpu",
                             "--metrics", str(metrics), "--record", str(record)],
                            capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["peak_memory_bytes"] is None
    assert json.loads(record.read_text())["measured"]["steps"] == 3
    wrong = subprocess.run([sys.executable, "-m", "autoplan", "run", str(plan), "--nproc", "3"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "--nproc 3" in wrong.stderr and "Traceback" not in wrong.stderr
