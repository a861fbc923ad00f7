"""Alternatives say something: structurally different rows, exact ties merged, a roomier
plan offered when it costs under 1% of speed, and closeness to the model's error said."""

import pytest

from autoplan.cli import main
from autoplan.planner import MODEL_TIME_ACCURACY, ROOMIER_SHARE, PlanRequest, make_plan
from autoplan.report.describe import layout_family
from autoplan.units import MemoryHeadroom, parse_memory_headroom
from cost_models.specs import GiB, resolve_gpu, resolve_model


@pytest.fixture(scope="module")
def headline():
    request = PlanRequest(model=resolve_model("llama3-8b"), gpu=resolve_gpu("h100"), num_gpus=64, gpus_per_node=8,
                          target_seq_len=256 * 1024)
    return request, make_plan(request)


def test_rows_are_distinct_ideas_not_reshuffles(headline):
    request, result = headline
    winner = result.estimate
    layers = result.plan.activation_checkpoint.layer_modes(request.model.n_layers)
    winner_counts = {m: layers.count(m) for m in ("full", "selective", "none")}
    rows = result.alternatives
    assert rows, "the headline plan has alternatives"
    for alt in rows:
        tie = alt.counts == winner_counts and alt.estimate.step_time_s == pytest.approx(winner.step_time_s, rel=1e-9)
        assert not tie, f"{alt.candidate.describe()} ties the winner: it belongs in the ties line, not a row"
    winner_family = layout_family(result.plan.parallelism.to_spec())
    families = [layout_family(a.candidate.parallelism) for a in rows]
    others = [f for f in families if f != winner_family]
    assert len(others) == len(set(others)), families  # one row per other family
    assert families.count(winner_family) <= 2, families  # its runner-up and, maybe, the roomier plan


def test_a_roomier_plan_within_one_percent_is_offered(headline):
    request, result = headline
    winner = result.estimate
    roomy = [a for a in result.alternatives
             if a.estimate.peak_memory_bytes <= winner.peak_memory_bytes - ROOMIER_SHARE * request.usable_bytes]
    assert roomy, "a plan with >= 10% more free memory at under 1% of speed exists at 256k on 64 GPUs"
    assert max(a.estimate.tokens_per_second_per_gpu for a in roomy) >= 0.99 * winner.tokens_per_second_per_gpu
    assert any("GiB more free" in line for line in result.plan.explanation)


def test_closeness_and_ties_are_said(headline):
    _, result = headline
    text = "\n".join(result.plan.explanation)
    close = [a for a in result.alternatives if a.estimate.tokens_per_second_per_gpu
             >= (1 - MODEL_TIME_ACCURACY) * result.estimate.tokens_per_second_per_gpu]
    assert (f"{len(close)} alternative(s) within" in text) == bool(close)


def test_headroom_parsing_and_one_line_errors(capsys):
    assert parse_memory_headroom("5%") == MemoryHeadroom(fraction=0.05)
    assert parse_memory_headroom("4GiB").bytes_of(80 * GiB) == 4 * GiB
    assert parse_memory_headroom("0").bytes_of(80 * GiB) == 0
    for bad in ("x", "-1%", "95%", "3", "nan%"):
        assert main(["--gpus", "8", "--target-seqlen", "8k", "--memory-headroom", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--memory-headroom" in err[0]


def test_table_shows_used_of_usable_and_capacity(capsys):
    assert main(["--gpus", "8", "--target-seqlen", "32k", "--memory-headroom", "8GiB", "--top", "0"]) == 0
    out = capsys.readouterr().out
    gpu = resolve_gpu("h100")
    usable = (gpu.memory_bytes - 8 * GiB) / GiB
    assert f"of {usable:.1f} GiB usable ({gpu.memory_bytes / GiB:.1f} capacity, 8.0 GiB headroom)" in out


def test_progress_shows_only_when_enabled(capsys):
    from autoplan.report.progress import progress, status

    assert list(progress(range(3), 3, "cells", enabled=False)) == [0, 1, 2]
    status("tracing", enabled=False)
    assert capsys.readouterr().err == ""
    assert list(progress(range(3), 3, "cells", enabled=True)) == [0, 1, 2]
    status("tracing two steps", enabled=True)
    err = capsys.readouterr().err
    assert "cells:" in err and "/3 [" in err and "tracing two steps" in err
    # Under pytest stderr is no terminal: the default is off.
    assert list(progress(range(2), 2, "quiet")) == [0, 1]
    assert capsys.readouterr().err == ""
