"""Checkpoints of pipelined runs (pp = 2, two gloo processes): each pp rank saves its own
stage through DCP under the whole model's parameter names, so one checkpoint covers the
model. Reference: one uninterrupted 6-step run of the same plan (its step-6 checkpoint is
read back single-process with ``dcp_to_torch_save``). Resuming a 3-step run to 6 must
equal it bit for bit - losses, parameters and AdamW state. Negative control: the same
step-3 checkpoint with the last stage's AdamW moments zeroed (what a save that kept only
one pp rank's optimizer state would give) must resume to different losses and parameters.
The interleaved schedule (two stages per rank) with gradient accumulation resumes exactly too.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from runtime_helpers import TINY, run_plan, write_plan


def _read(checkpoint: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return torch.load(out, weights_only=False)


def _tensors(state: dict) -> dict:
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"optimizer.{k}": v for k, v in state["optimizer"].items() if isinstance(v, torch.Tensor)})
    return flat


def _metrics(path: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _differing(a: dict, b: dict) -> list[str]:
    mine, theirs = _tensors(a), _tensors(b)
    assert mine.keys() == theirs.keys()
    return [k for k in mine if not torch.equal(mine[k], theirs[k])]


def _spoil_last_stage_moments(step3: Path, into: Path, tmp: Path) -> None:
    """A copy of ``step3`` whose last stage (layers.1, norm, output) has zero AdamW moments."""
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

    state = _read(step3, tmp)
    spoiled = 0
    for key, value in state["optimizer"].items():
        if key.startswith(("state.layers.1.", "state.norm.", "state.output.")) and key.endswith("exp_avg"):
            value.zero_()
            spoiled += 1
    assert spoiled == 11  # 9 block matrices and norms + the final norm + the output projection
    torch.save(state, tmp / "spoiled.pt")
    torch_save_to_dcp(str(tmp / "spoiled.pt"), str(into))
    for name in ("trainer_state.json", "COMPLETE"):
        shutil.copy(step3 / name, into / name)


@pytest.mark.timeout(600)
def test_pp2_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    plan = write_plan(tmp_path / "pp2.yaml", {"pp": 2}, local_batch_size=4)

    def train(steps: int, *extra):
        return run_plan(plan, 2, steps, tmp_path, extra=tuple(map(str, extra)))

    ref_dir = tmp_path / "ref"
    code, straight, err = train(6, "--checkpoint-dir", ref_dir, "--checkpoint-every", 0)
    assert code == 0 and len(straight) == 6, err[-3000:]
    reference = _read(ref_dir / "step-6", tmp_path)
    # one checkpoint, the whole model: both stages' parameters and AdamW state by their own names
    assert {"tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.attention.wq.weight",
            "norm.weight", "output.weight"} <= set(reference["model"])
    assert {"state.tok_embeddings.weight.exp_avg", "state.output.weight.exp_avg_sq",
            "param_groups.output.weight.lr", "param_groups.tok_embeddings.weight.lr"} <= set(reference["optimizer"])

    ck, metrics = tmp_path / "ck", tmp_path / "resumed.jsonl"
    code, _, err = train(3, "--checkpoint-dir", ck, "--metrics", metrics)
    assert code == 0 and (ck / "step-3" / "COMPLETE").exists(), err[-3000:]
    shutil.copytree(ck / "step-3", tmp_path / "step-3-copy")
    with metrics.open("a") as out:  # a crash after step 3 left a line the checkpoint does not cover
        out.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    code, _, err = train(6, "--checkpoint-dir", ck, "--resume", "--checkpoint-every", 0, "--metrics", metrics)
    assert code == 0, err[-3000:]
    assert _metrics(metrics) == (list(range(1, 7)), straight)  # exact losses, no step twice
    different = _differing(_read(ck / "step-6", tmp_path), reference)
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"

    # negative control: the last stage's optimizer moments lost -> a different run
    spoiled = tmp_path / "spoiled"
    _spoil_last_stage_moments(tmp_path / "step-3-copy", spoiled / "step-3", tmp_path)
    bad_metrics = tmp_path / "spoiled.jsonl"
    code, _, err = train(6, "--checkpoint-dir", spoiled, "--resume", "--checkpoint-every", 0, "--metrics", bad_metrics)
    assert code == 0, err[-3000:]
    steps, losses = _metrics(bad_metrics)
    assert steps == [4, 5, 6] and losses[0] == straight[3]  # step 4's forward precedes its update
    assert max(abs(a - b) for a, b in zip(losses[1:], straight[4:])) > 1e-4
    different = _differing(_read(spoiled / "step-6", tmp_path), reference)
    assert any(k.startswith("model.layers.1.") for k in different)

    # another layout's checkpoint is refused in one line: the same plan without the pipeline
    plain = write_plan(tmp_path / "pp1.yaml", {}, local_batch_size=4)
    code, _, err = run_plan(plain, 1, 8, tmp_path, extra=("--checkpoint-dir", str(ck), "--resume"))
    errors = [line for line in err.splitlines() if "runtime.train: error" in line]
    assert code != 0 and len(errors) == 1 and "[rank0]: Traceback" not in err, err[-3000:]  # torchrun's own may follow
    assert "another model or layout" in errors[0] and "layout pp=2, this plan has 1" in errors[0]


@pytest.mark.timeout(600)
def test_interleaved_pp2_with_accumulation_resumes_bit_for_bit(tmp_path):
    """Each pp rank holds two stages (layers 0 and 2, or 1 and 3): its checkpoint covers both."""
    plan = write_plan(tmp_path / "inter.yaml", {"pp": 2}, local_batch_size=4, grad_accum_steps=2,
                      model=dataclasses.replace(TINY, n_layers=4))
    plan.write_text(yaml.safe_dump({**yaml.safe_load(plan.read_text()), "pp_schedule": "interleaved-1f1b",
                                    "pp_virtual_stages": 2}))

    def train(steps: int, *extra):
        return run_plan(plan, 2, steps, tmp_path, extra=tuple(map(str, extra)))

    code, straight, err = train(6, "--checkpoint-dir", tmp_path / "ref", "--checkpoint-every", 0)
    assert code == 0 and len(straight) == 6, err[-3000:]
    ck, metrics = tmp_path / "ck", tmp_path / "resumed.jsonl"
    code, _, err = train(3, "--checkpoint-dir", ck, "--metrics", metrics)
    assert code == 0, err[-3000:]
    code, _, err = train(6, "--checkpoint-dir", ck, "--resume", "--metrics", metrics)
    assert code == 0, err[-3000:]
    assert _metrics(metrics) == (list(range(1, 7)), straight)
    assert not _differing(_read(ck / "step-6", tmp_path), _read(tmp_path / "ref" / "step-6", tmp_path))
