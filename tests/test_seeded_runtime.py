"""Runtime facts the seeded-bug run (benchmarks/seeded_bugs.py) showed untested.

- Head-tail CP: rank r holds chunks r and 2cp-1-r, and every rank's tokens attend the
  same number of (query, key) pairs, counted by brute force over positions.
- Step metrics against hand arithmetic: tokens/s per GPU = global tokens per step /
  step time / world size; MFU from 6 N + 12 L H d S with N counted by hand.
- ``autoplan run`` hands --resume and --checkpoint-dir to the training command, which
  runtime.train's own parser then reads back.
"""


import pytest
import torch
from runtime_helpers import TINY, write_plan

from autoplan.cli import main as autoplan_main
from autoplan.plan import Plan
from runtime.context_parallel import head_tail_chunks, shard_sequence
from runtime.metrics import StepMetrics, summarize_run
from runtime.model import Transformer
from runtime.train import parse_args as train_parse_args

# ----------------------------------------------------------------------------- head-tail CP


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_head_tail_chunks_per_rank(cp):
    chunk = 3
    seq = torch.arange(2 * cp * chunk)
    for rank in range(cp):
        head, tail = rank, 2 * cp - 1 - rank
        assert tuple(head_tail_chunks(rank, cp)) == (head, tail)
        expected = list(range(head * chunk, (head + 1) * chunk)) + list(range(tail * chunk, (tail + 1) * chunk))
        assert shard_sequence(seq, rank, cp, dim=0).tolist() == expected
        # Along the sequence dim of a (batch, seq) tensor too, rows untouched.
        batch = torch.stack([seq, seq + 100])
        assert shard_sequence(batch, rank, cp).tolist() == [expected, [p + 100 for p in expected]]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_every_cp_rank_does_equal_causal_work(cp):
    chunk = 5
    length = 2 * cp * chunk
    work = []
    covered = []
    for rank in range(cp):
        queries = shard_sequence(torch.arange(length), rank, cp, dim=0).tolist()
        covered += queries
        # Causal: query position q attends every key position k <= q. Brute force.
        work.append(sum(1 for q in queries for k in range(length) if k <= q))
    assert sorted(covered) == list(range(length))  # every token on exactly one rank
    assert sum(work) == length * (length + 1) // 2
    assert len(set(work)) == 1, f"causal (query, key) pairs per rank: {work}"


# ----------------------------------------------------------------------------- metrics


def _tiny_non_embedding_params() -> int:
    d, layers, q_dim, kv_dim, ffn, vocab = 48, 2, 6 * 8, 2 * 8, 96, 128
    block = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * ffn + 2 * d  # wq wk wv wo w1 w3 w2 + 2 norms
    return layers * block + d + vocab * d  # + final norm + output projection (untied)


def test_step_metrics_against_hand_arithmetic(tmp_path):
    # Hand count agrees with the runtime model's own parameters (minus the embedding).
    model = Transformer(TINY)
    counted = sum(p.numel() for p in model.parameters()) - 128 * 48
    assert counted == _tiny_non_embedding_params() == 46320
    plan = Plan.load(write_plan(tmp_path / "plan.yaml", {"dp_shard": 2, "cp": 2}, seq_len=32,
                                local_batch_size=2, grad_accum_steps=2))
    world = 4
    global_tokens = 32 * 2 * 2 * 2  # seq x local batch x accum x dp (cp ranks share sequences)
    flops_per_token = 6 * 46320 + 12 * 2 * 6 * 8 * 32  # 6N + 12 L H d S
    metrics = StepMetrics(plan, torch.device("cpu"), world, None, write=False)
    assert metrics.peak is None  # no GPU: MFU is null, not guessed
    raw = {"loss": 4.5, "lr": 1e-3, "grad_norm": 0.7}
    first = metrics.record(1, raw, step_time_s=2.0)
    assert first["tokens_per_second_per_gpu"] == pytest.approx(global_tokens / 2.0 / world) == 32.0
    assert first["mfu"] is None
    metrics.peak = 1e9  # a made-up 1 GFLOP/s device
    second = metrics.record(2, raw, step_time_s=0.5)
    third = metrics.record(3, raw, step_time_s=0.25)
    assert second["tokens_per_second_per_gpu"] == pytest.approx(128.0)
    assert third["tokens_per_second_per_gpu"] == pytest.approx(256.0)
    assert second["mfu"] == pytest.approx(flops_per_token * 128.0 / 1e9)
    assert third["mfu"] == pytest.approx(314784 * 256.0 / 1e9)
    summary = summarize_run(plan, metrics.records)  # the warm-up step is dropped
    assert summary["steps"] == 3
    assert summary["step_time_s"] == pytest.approx(0.375)
    assert summary["tokens_per_second_per_gpu"] == pytest.approx(192.0)
    assert summary["mfu"] == pytest.approx(314784 * 192.0 / 1e9)


# ----------------------------------------------------------------------------- autoplan run


def test_run_passes_resume_and_checkpoint_dir_to_training(tmp_path, monkeypatch):
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 2})
    launched = []

    from autoplan.commands import run as run_command

    def stand_in(command, env):  # torchrun's place: record what it was asked to run
        launched.append(list(command))
        return 0

    monkeypatch.setattr(run_command, "_run_torchrun", stand_in)
    # The parent's checks before torchrun (an empty folder cannot be resumed) are tested in
    # tests/test_runtime_resume.py; here only what reaches the training command counts.
    monkeypatch.setattr(run_command, "_preflight", lambda args, plan: None)
    ckpt = tmp_path / "ckpt"
    assert autoplan_main(["run", str(plan), "--resume", "--checkpoint-dir", str(ckpt), "--steps", "7"]) == 0
    assert autoplan_main(["run", str(plan), "--steps", "3"]) == 0
    with_resume, without = launched
    assert "--nproc-per-node=2" in with_resume
    # What follows "-m runtime.train" is read by runtime.train's own parser.
    args = train_parse_args(with_resume[with_resume.index("runtime.train") + 1:])
    assert args.resume is True and args.checkpoint_dir == str(ckpt) and args.steps == 7
    assert args.plan == str(plan)
    plain = train_parse_args(without[without.index("runtime.train") + 1:])
    assert plain.resume is False and plain.checkpoint_dir is None and plain.steps == 3
