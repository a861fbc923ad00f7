"""Capacity planning: the min-gpus answer fits (priced afresh by estimate_step) while one
step fewer fits for no layout at all (brute force over the search space with full AC),
answers grow with the target, neighbouring counts by hand, time-to-train by hand, rows
that read back equal from CSV and JSON, and one-line errors."""

import json

import pytest

from autoplan.capacity import (
    CapacityRow,
    capacity,
    neighbour_counts,
    time_to_train,
    valid_gpu_counts,
)
from autoplan.cli import build_parser, main
from autoplan.planner import DEFAULT_MEMORY_HEADROOM
from autoplan.units import MemoryHeadroom
from autoplan.report.rows import read_rows, rows_to_csv
from autoplan.search import build_search_space
from cost_models.config import ACPolicy, TrainConfig
from cost_models.specs import ClusterSpec, resolve_gpu, resolve_model
from cost_models.step import estimate_step

GPU = resolve_gpu("h100")
K, M = 1024, 1024 * 1024


def _any_layout_fits(model, gpus: int, seq: int, per_node: int = 8) -> bool:
    """Brute force: every layout of the search space (degrees, mesh orders, CP
    implementations) at local batch 1 with full activation checkpointing - the lightest
    configuration of each layout - priced by estimate_step."""
    node = min(per_node, gpus)
    space = build_search_space(model, GPU, [gpus], [seq], node, batches=(1,))
    assert space.candidates or space.rejections
    for cand in space.candidates:
        cfg = TrainConfig(cand.parallelism, seq, 1, 1, ACPolicy.uniform("full", model.n_layers), cand.cp_impl,
                          cand.mesh_order)
        if estimate_step(model, ClusterSpec(GPU, gpus, node), cfg).fits:
            return True
    return False


@pytest.mark.parametrize("model_name, seq", [
    ("llama3-8b", M), ("llama3-8b", 256 * K), ("llama3.2-1b", 128 * K), ("llama3.2-3b", 256 * K),
    ("llama3.2-3b", 512 * K), ("llama3-70b", 256 * K),
])
def test_fewest_gpus_fit_and_one_step_fewer_fits_for_no_layout(model_name, seq):
    model = resolve_model(model_name)
    result = capacity(model, GPU, seq, max_gpus=256, gpus_per_node=8, train_tokens=10**12,
                      memory_headroom=MemoryHeadroom())  # the reference below prices the whole GPU
    fewest = result.fewest_gpus
    assert fewest in valid_gpu_counts(256, 8)
    plan = result.plan.plan
    assert plan.parallelism.world_size == fewest and plan.seq_len == seq
    priced = estimate_step(model, ClusterSpec(GPU, fewest, min(8, fewest)), plan.train_config())
    assert priced.peak_memory_bytes <= GPU.memory_bytes
    smaller = [c for c in valid_gpu_counts(256, 8) if c < fewest]
    if smaller:
        assert not _any_layout_fits(model, smaller[-1], seq)  # one node (or sub-node step) fewer
    assert _any_layout_fits(model, fewest, seq)  # and the brute force agrees that the answer fits


def test_fewest_gpus_never_shrink_as_the_target_grows():
    model = resolve_model("llama3-8b")
    answers = [capacity(model, GPU, seq, max_gpus=512, gpus_per_node=8, neighbours=0).fewest_gpus
               for seq in (16 * K, 64 * K, 256 * K, M, 4 * M)]
    assert None not in answers
    assert answers == sorted(answers) and answers[-1] > answers[0]


def test_target_out_of_reach_gives_no_answer_and_exit_code_1(capsys):
    model = resolve_model("llama3-70b")
    result = capacity(model, GPU, 16 * M, max_gpus=16, gpus_per_node=8)
    assert result.fewest_gpus is None and result.rows == [] and result.plan.plan is None
    assert not _any_layout_fits(model, 16, 16 * M)
    assert main(["capacity", "--model", "llama3-70b", "--target-seqlen", "16M", "--max-gpus", "16"]) == 1
    out = capsys.readouterr().out
    assert "does not fit on 16 GPUs or fewer" in out and "--max-gpus" in out


def test_valid_and_neighbouring_counts_by_hand():
    assert valid_gpu_counts(40, 8) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert valid_gpu_counts(3, 8) == [1, 2]
    assert valid_gpu_counts(16, 4) == [1, 2, 4, 8, 12, 16]
    assert neighbour_counts(16, 4096, 8) == [4, 8, 16, 32, 64]
    assert neighbour_counts(64, 4096, 8) == [16, 32, 56, 64, 128, 256]
    assert neighbour_counts(64, 64, 8) == [16, 32, 56, 64]  # nothing above the cluster
    assert neighbour_counts(24, 4096, 8) == [4, 8, 16, 24, 48, 96]  # 12 and 6 snap down to 8 and 4
    assert neighbour_counts(1, 4096, 8) == [1, 2, 4]
    assert neighbour_counts(2, 4096, 8, neighbours=1) == [1, 2, 4]


def test_time_to_train_by_hand():
    # 1e12 tokens at 1000 tokens/s/GPU on 64 GPUs: 64,000 tokens/s -> 15,625,000 s;
    # 15,625,000 s x 64 GPUs / 3600 = 277,777.8 GPU-hours (= 1e12 / 1000 / 3600).
    seconds, hours = time_to_train(10**12, 1000.0, 64)
    assert seconds == pytest.approx(15_625_000)
    assert hours == pytest.approx(277_777.777, rel=1e-6)


def test_rows_carry_time_to_train_and_gpu_hours():
    model = resolve_model("llama3-8b")
    result = capacity(model, GPU, 128 * K, max_gpus=64, gpus_per_node=8, train_tokens=2 * 10**12, neighbours=2)
    fitting = [r for r in result.rows if r.fits]
    assert [r.gpus for r in result.rows] == neighbour_counts(result.fewest_gpus, 64, 8)
    assert len(fitting) >= 2 and sum(r.fewest for r in result.rows) == 1
    for row in fitting:
        assert row.global_tokens_per_second == pytest.approx(row.tokens_per_second_per_gpu * row.gpus)
        assert row.time_to_train_s * row.tokens_per_second_per_gpu * row.gpus == pytest.approx(2e12)
        assert row.gpu_hours == pytest.approx(2e12 / row.tokens_per_second_per_gpu / 3600)
    for row in result.rows:
        assert row.fits == (row.gpus >= result.fewest_gpus)  # below the answer nothing fits, by definition
    # Each row is the fastest plan on its count: no layout of the rules with one AC mode for
    # every layer (priced directly, within the usable memory) beats it.
    usable = GPU.memory_bytes - DEFAULT_MEMORY_HEADROOM.bytes_of(GPU.memory_bytes)
    for row in fitting:
        space = build_search_space(model, GPU, [row.gpus], [128 * K], min(8, row.gpus))
        for cand in space.candidates:
            for mode in ("none", "selective", "full"):
                cfg = TrainConfig(cand.parallelism, cand.seq_len, cand.local_batch_size, cand.grad_accum_steps,
                                  ACPolicy.uniform(mode, model.n_layers), cand.cp_impl, cand.mesh_order)
                est = estimate_step(model, ClusterSpec(GPU, row.gpus, min(8, row.gpus)), cfg)
                if est.peak_memory_bytes <= usable:
                    assert est.tokens_per_second_per_gpu <= row.tokens_per_second_per_gpu * (1 + 1e-4), cand


def _parser():
    return build_parser()


def handle(args):
    return args.func(args)


def test_csv_and_json_round_trip(capsys):
    parser = _parser()
    argv = ["capacity", "--model", "llama3-8b", "--target-seqlen", "1M", "--train-tokens", "1T", "--max-gpus", "64"]
    result = capacity(resolve_model("llama3-8b"), GPU, M, max_gpus=64, gpus_per_node=8, train_tokens=10**12)
    rows = result.to_rows()
    assert any(not r["fits"] for r in rows) and any(r["fits"] for r in rows)  # None and strings both travel
    assert read_rows(rows_to_csv(rows), "csv") == rows
    assert list(rows[0]) == [f for f in CapacityRow.__dataclass_fields__]

    args = parser.parse_args(argv + ["--format", "csv"])
    assert handle(args) == 0
    assert read_rows(capsys.readouterr().out, "csv") == rows
    args = parser.parse_args(argv + ["--format", "json"])
    assert handle(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fewest_gpus"] == result.fewest_gpus and doc["rows"] == rows
    fewest = result.plan.plan.parallelism
    assert doc["plan"]["parallelism"] == fewest.model_dump() and doc["plan"]["seq_len"] == M
    degrees = doc["plan"]["parallelism"]
    assert degrees["dp_replicate"] * degrees["dp_shard"] * degrees["cp"] * degrees["tp"] == doc["fewest_gpus"]
    args = parser.parse_args(argv)
    assert handle(args) == 0
    table = capsys.readouterr().out
    assert f"fewest GPUs = {result.fewest_gpus}" in table and "time for 1T" in table and "<- fewest" in table


@pytest.mark.parametrize("argv, flag", [
    (["--target-seqlen", "1X"], "--target-seqlen"),
    (["--target-seqlen", "1M", "--train-tokens", "lots"], "--train-tokens"),
    (["--target-seqlen", "1M", "--max-gpus", "0"], "--max-gpus"),
    (["--target-seqlen", "1M", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["--target-seqlen", "1M", "--gpu", "tpu-v9"], "--gpu"),
    (["--target-seqlen", "1M", "--model", "gpt-9"], "--model"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    assert main(["capacity"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err
