"""Sweeps and frontiers: more GPUs never shrink the longest sequence, the longest
sequence fits while the next length fits for no layout under the same pins (brute
force), frontier families keep their constraints and together equal the unconstrained
planner, rows read back equal from CSV and JSON, charts are PNGs, and errors are one
line."""

import json
import sys

import pytest

from autoplan.cli import build_parser, main
from autoplan.planner import DEFAULT_MEMORY_HEADROOM, PlanRequest, make_plan
from autoplan.report.plots import PLOT_MISSING
from autoplan.report.rows import MEMORY_KEYS, read_rows, rows_to_csv, rows_to_json
from autoplan.search import build_search_space
from autoplan.sweep import (
    FAMILIES,
    FRONTIER_FIELDS,
    SWEEP_FIELDS,
    SweepSetup,
    _plan,
    frontier,
    grid,
    sweep,
)
from cost_models.config import ACPolicy, TrainConfig
from cost_models.specs import ClusterSpec, resolve_gpu, resolve_model
from cost_models.step import estimate_step

MODEL, GPU = resolve_model("llama3-8b"), resolve_gpu("h100")
K = 1024
PNG = b"\x89PNG\r\n\x1a\n"


def _degrees(layout: str) -> dict:
    """'dp_rep=1 dp_shard=8 cp=2 tp=1 ring-allgather b=1' -> {'dp_rep': 1, ..., 'b': 1}"""
    return {k: int(v) for k, v in (part.split("=") for part in layout.split() if "=" in part)}


def _fits_any(gpus: int, seq: int, fixed: dict) -> bool:
    """Brute force under pins: every layout of the search space at local batch 1 with
    full activation checkpointing (the lightest form of each), priced by estimate_step,
    within the GPU's memory less the default headroom."""
    usable = GPU.memory_bytes - DEFAULT_MEMORY_HEADROOM.bytes_of(GPU.memory_bytes)
    space = build_search_space(MODEL, GPU, [gpus], [seq], min(8, gpus), fixed, batches=(1,))
    for cand in space.candidates:
        cfg = TrainConfig(cand.parallelism, seq, 1, 1, ACPolicy.uniform("full", MODEL.n_layers), cand.cp_impl,
                          cand.mesh_order)
        if estimate_step(MODEL, ClusterSpec(GPU, gpus, min(8, gpus)), cfg).peak_memory_bytes <= usable:
            return True
    return False


def test_more_gpus_never_shrink_the_longest_sequence():
    counts = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128]
    rows = sweep(SweepSetup(MODEL, GPU, gpus_per_node=8), "gpus", counts, jobs=1)
    assert [r["gpus"] for r in rows] == counts
    longest = [r["max_seq_len"] for r in rows]
    assert longest == sorted(longest) and longest[-1] >= 32 * longest[2] > 0
    assert rows[0]["max_seq_len"] == 0 and not rows[0]["fits"]  # 8B does not train on one H100 at all


def test_cp_sweep_follows_the_pins_and_its_longest_sequence_is_tight():
    rows = sweep(SweepSetup(MODEL, GPU, fixed={"dp_shard": 8, "tp": 1}), "cp", [1, 2, 4, 8], jobs=1)
    assert [r["gpus"] for r in rows] == [8, 16, 32, 64]
    assert [r["max_seq_len"] for r in rows] == sorted(r["max_seq_len"] for r in rows)
    for row in rows[:2]:  # brute force on the smaller two (the larger are the same check, slower)
        assert f"dp_shard=8 cp={row['value']} tp=1" in row["layout"]
        pins = {"dp_shard": 8, "cp": row["value"], "tp": 1}
        assert _fits_any(row["gpus"], row["max_seq_len"], pins)
        assert row["max_seq_len"] % K == 0
        longer = row["max_seq_len"] + K  # 1k steps split over cp <= 8 (2 x cp divides 1024)
        assert not _fits_any(row["gpus"], longer, pins)


def test_rows_report_the_plan_at_the_target_and_its_memory():
    pins = {"dp_shard": 8, "tp": 1}
    cp1, cp2 = sweep(SweepSetup(MODEL, GPU, fixed=pins), "cp", [1, 2], jobs=1)
    assert cp2["max_seq_len"] > cp1["max_seq_len"]
    target = cp2["max_seq_len"]  # longer than cp=1 holds, and cp=2 just holds it
    too_long, fits = sweep(SweepSetup(MODEL, GPU, fixed=pins, target_seq_len=target), "cp", [1, 2], jobs=1)
    assert not too_long["fits"] and too_long["tokens_per_second_per_gpu"] == 0 and "fit" in too_long["note"]
    assert fits["fits"] and fits["seq_len"] == target and too_long["seq_len"] == target
    assert list(fits) == list(SWEEP_FIELDS) == list(too_long)
    # the row is the plan the planner gives for the same request, re-priced by estimate_step
    direct = make_plan(PlanRequest(MODEL, GPU, 16, 8, target, fixed={**pins, "cp": 2}, top_k=0))
    priced = estimate_step(MODEL, ClusterSpec(GPU, 16, 8), direct.plan.train_config())
    assert fits["tokens_per_second_per_gpu"] == pytest.approx(priced.tokens_per_second_per_gpu)
    assert fits["mfu"] == pytest.approx(priced.mfu)
    assert fits["peak_memory_bytes"] == pytest.approx(priced.peak_memory_bytes)
    assert priced.peak_memory_bytes <= GPU.memory_bytes
    breakdown = [fits[f"mem_{k}_bytes"] for k in MEMORY_KEYS]
    assert breakdown == [pytest.approx(priced.memory_breakdown_bytes.get(k, 0.0)) for k in MEMORY_KEYS]
    assert sum(breakdown) == pytest.approx(fits["peak_memory_bytes"], rel=0.02)


def test_seqlen_and_gpu_knobs():
    setup = SweepSetup(MODEL, GPU, gpus=16)
    rows = sweep(setup, "seqlen", [32 * K, 256 * K, 16 * 1024 * K], jobs=1)
    assert len({r["max_seq_len"] for r in rows}) == 1  # the longest does not depend on the target
    rates = [r["tokens_per_second_per_gpu"] for r in rows if r["fits"]]
    assert rates == sorted(rates, reverse=True) and len(rates) == 2  # longer costs more; 16M does not fit
    rows = sweep(setup, "gpu", ["h100", "h200"], jobs=1)
    assert [r["gpu"] for r in rows] == ["h100-sxm-80gb", "h200"]
    assert rows[1]["max_seq_len"] > rows[0]["max_seq_len"]  # 141 GB holds more than 80 GB


def test_frontier_families_keep_their_constraints_and_together_match_the_planner():
    seqs = [16 * K, 128 * K, 1024 * K]
    rows = frontier(SweepSetup(MODEL, GPU, gpus=32, gpus_per_node=8), seqs, jobs=1)
    assert len(rows) == len(FAMILIES) * len(seqs) and all(list(r) == list(FRONTIER_FIELDS) for r in rows)
    for row in rows:
        if row["fits"]:
            d = _degrees(row["layout"])
            assert FAMILIES[row["family"]](type("P", (), {"cp": d["cp"], "tp": d["tp"], "pp": d.get("pp", 1)})), row
    for seq in seqs:
        best = make_plan(PlanRequest(MODEL, GPU, 32, 8, seq, top_k=0))
        per_family = [r["tokens_per_second_per_gpu"] for r in rows if r["seq_len"] == seq]
        assert max(per_family) == pytest.approx(best.estimate.tokens_per_second_per_gpu if best.plan else 0.0)
    fsdp_max = max(r["seq_len"] for r in rows if r["family"] == "FSDP" and r["fits"])
    cp_max = max(r["seq_len"] for r in rows if r["family"] == "FSDP+CP" and r["fits"])
    assert cp_max > fsdp_max  # CP splits activations; FSDP alone cannot reach 1M on 32 GPUs


@pytest.mark.timeout(180)
def test_worker_processes_give_the_same_rows_after_the_parent_has_solved():
    # The parent has run HiGHS (its worker threads are up); workers are forked from it and
    # solve afresh (memo cleared), which hangs unless the sweep stops those threads first.
    make_plan(PlanRequest(MODEL, GPU, 64, 8, 64 * K, top_k=1))
    setup = SweepSetup(MODEL, GPU, gpus_per_node=8)
    seqs, counts = [16 * K, 256 * K], [8, 16, 32]
    _plan.cache_clear()
    parallel = grid(setup, seqs, counts, jobs=2), sweep(setup, "gpus", [8, 16, 32, 64], jobs=2)
    _plan.cache_clear()
    serial = grid(setup, seqs, counts, jobs=1), sweep(setup, "gpus", [8, 16, 32, 64], jobs=1)
    assert parallel == serial
    assert [(r["seq_len"], r["gpus"]) for r in parallel[0]] == [(s, n) for n in counts for s in seqs]


def _parser():
    return build_parser()


def test_csv_and_json_round_trip(tmp_path):
    setup = SweepSetup(MODEL, GPU, fixed={"dp_shard": 8, "tp": 1}, target_seq_len=512 * K)
    mixed = sweep(setup, "cp", [1, 8], jobs=1)
    assert [r["fits"] for r in mixed] == [False, True]  # zeros and a note travel too
    for rows in (mixed,
                 sweep(SweepSetup(MODEL, GPU, gpus=8), "gpu", ["h100", "a100"], jobs=1),  # string values
                 sweep(SweepSetup(MODEL, GPU, gpus=8), "seqlen", [8 * K, 16 * K], jobs=1),
                 frontier(SweepSetup(MODEL, GPU, gpus=8), [8 * K], jobs=1)):
        assert read_rows(rows_to_csv(rows), "csv") == rows
        assert read_rows(rows_to_json(rows), "json") == rows
    for fmt in ("csv", "json"):
        out = tmp_path / f"rows.{fmt}"
        args = _parser().parse_args(["sweep", "--knob", "cp", "--values", "1,8", "--fix", "dp_shard=8,tp=1",
                                     "--target-seqlen", "512k", "--format", fmt, "--out", str(out)])
        assert args.func(args) == 0
        assert read_rows(out.read_text(), fmt) == mixed


def test_table_output(capsys):
    assert main(["sweep", "--knob", "cp", "--values", "1,2", "--fix", "dp_shard=8,tp=1"]) == 0
    out = capsys.readouterr().out
    assert "max seq" in out and "dp_shard=8 cp=2 tp=1" in out and "memory breakdown" in out


def test_plots_are_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cp_png, frontier_png, gpu_png = tmp_path / "cp.png", tmp_path / "frontier.png", tmp_path / "gpu.png"
    assert main(["sweep", "--knob", "cp", "--values", "1,2,4", "--fix", "dp_shard=8,tp=1", "--target-seqlen", "512k",
                 "--plot", str(cp_png)]) == 0  # cp=1 does not fit at 512k: drawn as such
    assert main(["sweep", "--frontier", "--gpus", "16", "--values", "8k,64k,512k", "--plot", str(frontier_png)]) == 0
    assert main(["sweep", "--knob", "gpu", "--values", "h100,a100", "--plot", str(gpu_png)]) == 0
    for path in (cp_png, frontier_png, gpu_png):
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 20_000, path
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 800 and height >= 400


def test_plot_without_matplotlib_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    path = tmp_path / "cp.png"
    assert main(["sweep", "--knob", "cp", "--values", "1,2", "--fix", "dp_shard=8", "--plot", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == PLOT_MISSING == "install autoplan[plot] for --plot"
    assert not path.exists() and captured.out == ""


@pytest.mark.parametrize("argv, flag", [
    (["--knob", "cp", "--values", "a,b"], "--values"),
    (["--knob", "cp", "--values", "0,2"], "--values"),
    (["--knob", "seqlen", "--values", "12q"], "--values"),
    (["--knob", "gpu", "--values", "h100,tpu-v9"], "--values"),
    (["--knob", "cp"], "--values"),
    (["--knob", "cp", "--values", "1,2", "--fix", "cp=banana"], "--fix"),
    (["--knob", "gpus", "--values", "8", "--target-seqlen", "big"], "--target-seqlen"),
    (["--knob", "gpus", "--values", "8", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["--frontier", "--knob", "cp"], "--frontier"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    assert main(["sweep"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err


def test_impossible_pins_become_rows_not_aborts():
    rows = sweep(SweepSetup(MODEL, GPU, gpus=16, fixed={"dp_shard": 8}), "cp", [2, 4], jobs=1)
    assert rows[0]["fits"] and not rows[1]["fits"]  # 8 x 4 = 32 does not divide 16 GPUs
    assert "--fix" in rows[1]["note"]
    assert json.loads(rows_to_json(rows)) == rows
