"""Pipelines (pp > 1) in capacity planning and in the frontier's "PP" family, against the
brute force of tests/test_planner_pipeline.py (every pipeline layout, schedule, micro-batch
count, local batch and per-rank AC mix of the README's pipeline space, priced one by one
with ``estimate_step``; it uses neither the planner nor its search space).

- capacity's pipelined alternative on the answer's GPU count is the brute force's fastest
  pipeline over every pp (2, 4, ... dividing the count), its row the faster of it and pp = 1;
- on every count below the answer no pipeline fits either (so the answer stands with pp);
- the frontier's PP row at each length is the brute force's fastest pipeline, the other
  families hold no pipeline.
"""

from dataclasses import replace

import pytest
from test_planner_pipeline import _brute

from autoplan.capacity import capacity, valid_gpu_counts
from autoplan.sweep import FAMILIES, SweepSetup, frontier
from autoplan.units import MemoryHeadroom
from cost_models.specs import MODEL_PRESETS, resolve_gpu

H100 = resolve_gpu("h100")
SEVENTY_8 = replace(MODEL_PRESETS["llama3-70b"], name="70b-8layer", n_layers=8)
EIGHT_8 = replace(MODEL_PRESETS["llama3-8b"], name="8b-8layer", n_layers=8)


def _fastest_pipeline(model, gpus: int, seq: int) -> float:
    """tokens/s/GPU of the brute force's fastest pipeline on ``gpus`` (0 when none fits)."""
    best = None
    for pp in (2, 4, 8, 16):
        if gpus % pp or pp > model.n_layers:
            continue
        found = _brute(model, gpus, seq, pp, H100.memory_bytes)
        if found is not None and (best is None or found[0] < best):
            best = found[0]
    return 1.0 / best if best else 0.0


@pytest.mark.timeout(600)
def test_capacity_reports_the_fastest_pipeline_and_none_fits_below_the_answer():
    seq = 8192
    result = capacity(SEVENTY_8, H100, seq, max_gpus=16, gpus_per_node=8, memory_headroom=MemoryHeadroom())
    fewest = result.fewest_gpus
    assert fewest == result.fewest_gpus_without_pp  # pipelines reach no further here
    assert result.pipelined is not None and result.pipelined.plan is not None
    piped = result.pipelined.plan
    assert piped.parallelism.pp > 1 and piped.parallelism.world_size == fewest
    reference = _fastest_pipeline(SEVENTY_8, fewest, seq)
    assert reference > 0
    rate = float(piped.prediction.tokens_per_second_per_gpu)
    assert reference * (1 - 1e-4) <= rate <= reference * (1 + 1e-9)
    # the answer's row: the faster of the pp = 1 plan and the pipeline
    row = next(r for r in result.rows if r.fewest)
    flat = float(result.plan.plan.prediction.tokens_per_second_per_gpu)
    assert row.tokens_per_second_per_gpu == pytest.approx(max(flat, rate), rel=1e-12)
    assert row.pp == (piped.parallelism.pp if rate > flat else 1)
    # below the answer: no pipeline of any pp fits (pp = 1 is test_capacity's brute force)
    below = [c for c in valid_gpu_counts(16, 8) if 2 <= c < fewest]
    assert below
    for count in below:
        assert _fastest_pipeline(SEVENTY_8, count, seq) == 0.0, count


@pytest.mark.timeout(600)
def test_frontier_pp_family_is_the_fastest_pipeline():
    seqs = [4096, 16384]
    rows = frontier(SweepSetup(EIGHT_8, H100, gpus=8, gpus_per_node=8, memory_headroom=MemoryHeadroom()), seqs,
                    jobs=1)
    assert {r["family"] for r in rows} == set(FAMILIES) and "PP" in FAMILIES
    for row in rows:
        assert ("pp=" in row["layout"]) == (row["family"] == "PP" and row["fits"]), row
    for seq in seqs:
        row = next(r for r in rows if r["family"] == "PP" and r["seq_len"] == seq)
        reference = _fastest_pipeline(EIGHT_8, 8, seq)
        assert row["fits"] == (reference > 0)
        assert reference * (1 - 1e-4) <= row["tokens_per_second_per_gpu"] <= reference * (1 + 1e-9)


def test_capacity_command_names_the_pipelined_alternative(capsys):
    import json

    from autoplan.cli import main

    argv = ["capacity", "--model", "llama3-8b", "--target-seqlen", "8k", "--max-gpus", "16"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "pipelined alternative on 4 GPUs: " in table and "pp=2" in table and "than pp=1's" in table
    assert main(argv + ["--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fewest_gpus"] == doc["fewest_gpus_without_pp"] == 4
    assert doc["pipelined_plan"]["parallelism"]["pp"] > 1
    assert all("pp" in row for row in doc["rows"])
