"""Capacity and sweeps: monotone answers, a min-gpus answer that fits while one node
fewer cannot (brute force over every layout), round-trips, time-to-train by hand."""

import json

import pytest

from autoplan.capacity import capacity
from autoplan.cli import main
from autoplan.search import build_search_space
from autoplan.sweep import SweepSetup, rows_from_csv, rows_to_csv, sweep
from cost_models.config import ACPolicy, TrainConfig
from cost_models.specs import ClusterSpec, resolve_gpu, resolve_model
from cost_models.step import estimate_step

MODEL, GPU = resolve_model("llama3-8b"), resolve_gpu("h100")


def test_longest_sequence_never_shrinks_with_more_gpus():
    rows = sweep(SweepSetup(MODEL, GPU, 8, 8, {}, None), "gpus", [1, 2, 4, 8, 16, 32, 64])
    longest = [r["max_seq_len"] for r in rows]
    assert longest == sorted(longest) and longest[-1] > longest[0]


def _any_layout_fits(gpus, seq):
    space = build_search_space(MODEL, GPU, [gpus], [seq], batches=(1,))
    for cand in space.candidates:
        cfg = TrainConfig(cand.parallelism, seq, 1, 1, ACPolicy.uniform("full", MODEL.n_layers), cand.cp_impl,
                          cand.mesh_order)
        if estimate_step(MODEL, ClusterSpec(GPU, gpus), cfg).fits:
            return True
    return False


def test_min_gpus_answer_fits_and_one_node_fewer_does_not():
    seq = 1024 * 1024
    result = capacity(MODEL, GPU, seq, max_gpus=256, gpus_per_node=8, train_tokens=10**12)
    fewest = result.fewest_gpus
    assert fewest is not None and fewest % 8 == 0
    plan = result.plan.plan
    cfg = plan.train_config()
    assert estimate_step(MODEL, ClusterSpec(GPU, fewest, 8), cfg).peak_memory_bytes <= GPU.memory_bytes
    assert not _any_layout_fits(fewest - 8, seq)  # brute force, every layout, full AC


def test_time_to_train_arithmetic():
    result = capacity(MODEL, GPU, 128 * 1024, max_gpus=64, gpus_per_node=8, train_tokens=10**12, neighbours=1)
    for row in result.rows:
        seconds = 10**12 / (row.tokens_per_second_per_gpu * row.gpus)
        assert row.time_to_train_s == pytest.approx(seconds)
        assert row.gpu_hours == pytest.approx(seconds * row.gpus / 3600)


def test_csv_and_json_round_trip(tmp_path, capsys):
    rows = sweep(SweepSetup(MODEL, GPU, 8, 8, {"dp_shard": 8, "tp": 1}, 32 * 1024), "cp", [1, 2])
    assert rows_from_csv(rows_to_csv(rows)) == rows
    out = tmp_path / "rows.json"
    assert main(["sweep", "--knob", "cp", "--values", "1,2", "--fix", "dp_shard=8,tp=1", "--target-seqlen", "32k",
                 "--format", "json", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "cp.png"
    assert main(["sweep", "--knob", "cp", "--values", "1,2,4", "--fix", "dp_shard=8,tp=1", "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_sweep_bad_values_are_one_line(capsys):
    assert main(["sweep", "--knob", "cp", "--values", "a,b"]) == 2
    assert "--values" in capsys.readouterr().err
