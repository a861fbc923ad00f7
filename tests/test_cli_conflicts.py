"""Inputs that cannot mean what they say are one-line errors (exit 2) naming the flags,
and a min-gpus answer says how many GPUs it uses."""

from __future__ import annotations

import re

import pytest

from autoplan.cli import main


@pytest.mark.parametrize("argv", [
    ["--gpus", "12"],
    ["--gpus", "100", "--target-seqlen", "64k"],
    ["sweep", "--knob", "gpus", "--values", "8,12"],
    ["sweep", "--knob", "seqlen", "--values", "32k", "--gpus", "100"],
])
def test_gpu_count_that_is_not_whole_nodes_is_the_answer_not_a_footnote(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "not a whole number of nodes of 8 GPUs" in err[0] and "--gpus-per-node" in err[0]
    assert "structural rules" not in captured.out


def test_gpu_count_that_is_not_whole_nodes_plans_with_a_matching_node_size(capsys):
    assert main(["--gpus", "12", "--gpus-per-node", "4", "--target-seqlen", "32k"]) == 0
    assert "on 12 x" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flags", [
    (["--gpus", "8", "--fix", "seq_len=128k", "--target-seqlen", "64k"], ("--fix seq_len=128k", "--target-seqlen 64k")),
    (["--gpus", "8", "--target-seqlen", "32k", "--fix", "ac=full", "--ac", "none"], ("--fix ac=full", "--ac none")),
    (["sweep", "--knob", "cp", "--values", "1,2", "--fix", "seq_len=128k", "--target-seqlen", "64k"],
     ("--fix seq_len=128k", "--target-seqlen 64k")),
])
def test_conflicting_flags_are_one_line_errors_naming_both(argv, flags, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(flag in err[0] for flag in flags)


def test_agreeing_pins_are_accepted(capsys):
    assert main(["--gpus", "8", "--fix", "seq_len=64k,ac=full", "--target-seqlen", "64k", "--ac", "full"]) == 0


def test_min_gpus_header_names_the_answers_gpu_count(capsys):
    assert main(["--objective", "min-gpus", "--gpus", "512", "--target-seqlen", "64k", "--format", "table"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[[i for i, line in enumerate(out.splitlines()) if line.startswith("autoplan:")][0]]
    degrees = [int(v) for v in re.search(r"dp_replicate=(\d+) dp_shard=(\d+) cp=(\d+) tp=(\d+)", out).groups()]
    used = degrees[0] * degrees[1] * degrees[2] * degrees[3]
    assert f"on {used} x " in header and "searched up to 512" in header and used < 512


def test_min_gpus_that_cannot_fit_says_how_many_it_needs(capsys):
    assert main(["--objective", "min-gpus", "--gpus", "8", "--target-seqlen", "4M"]) == 1
    out = capsys.readouterr().out
    assert "on up to 8 x" in next(line for line in out.splitlines() if line.startswith("autoplan:"))
    assert re.search(r"needs more than 8 GPUs: the target fits on \d+", out)
