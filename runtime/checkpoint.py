"""Distributed checkpoints (torch.distributed.checkpoint), written so a crash mid-save
never leaves a checkpoint that loads wrong.

Every rank writes its shards into ``step-N.tmp``; after a barrier, rank 0 writes the
trainer state (step, scheduler, data position, RNG) and a ``COMPLETE`` marker, then
renames the folder to ``step-N``. Resuming takes the newest folder whose marker, trainer
state and every shard the DCP metadata lists (at full length) are present; a damaged
newer one is skipped with a warning. The trainer state carries the model shape and the
layout it was written for; another model's or layout's checkpoint is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(ValueError):
    pass


def _options(pipelined: bool):
    """Pipelined runs (pp > 1) flatten the optimizer state to one key per parameter and
    setting (``state.layers.1.attention.wq.weight.exp_avg``, ``param_groups.<same>.lr``).
    Unflattened, the ``param_groups`` list has the same keys on every pp rank (``0.lr``,
    ``0.params``, ...) but different contents; DCP's save keeps one rank's copy, and the
    other stages load param groups naming parameters they do not hold (AdamW then fails
    with ``KeyError: 'betas'``). Whole-model runs keep the unflattened format they have
    always written."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=pipelined)


def _state_dicts(model, optimizer, pipelined: bool = False):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(pipelined))
    return {"model": model_state, "optimizer": optim_state}


def save(directory: str | Path, step: int, model, optimizer, trainer_state: dict, pipelined: bool = False) -> Path:
    import torch.distributed.checkpoint as dcp

    root = Path(directory)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dcp.save(_state_dicts(model, optimizer, pipelined), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
        (tmp / MARKER).write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


def fingerprint(plan) -> dict:
    """What a checkpoint must match to be resumed: the model's shape and the layout
    (the data order depends on the degrees and the batch shape)."""
    model = {k: v for k, v in plan.model_spec().to_dict().items() if k != "name"}
    p = plan.parallelism
    layout = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "cp": p.cp, "tp": p.tp, "pp": p.pp,
              "mesh_order": list(plan.mesh_order), "seq_len": plan.seq_len,
              "local_batch_size": plan.local_batch_size, "grad_accum_steps": plan.grad_accum_steps}
    return {"model": model, "layout": layout}


def _first_difference(theirs: dict, mine: dict) -> str:
    for part in ("model", "layout"):
        a, b = theirs.get(part, {}), mine.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{part} {key}={a.get(key)!r}, this plan has {b.get(key)!r}"
    return "a different plan"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (missing marker, unreadable state, a shard
    missing or shorter than the metadata says), or None when it looks whole."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / MARKER).exists():
        return f"no {MARKER} marker"
    try:
        json.loads((path / TRAINER_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is missing or not valid"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
        ends: dict[str, int] = {}
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as error:  # a truncated pickle raises anything from EOFError to UnpicklingError
        return f".metadata unreadable ({type(error).__name__})"
    for name, end in sorted(ends.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < end:
            return f"shard {name} is truncated ({shard.stat().st_size} of {end} bytes)"
    return None


def choose(directory: str | Path, plan) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint under ``directory`` and the warnings about newer damaged
    ones; raises when none is whole though some exist, or when it is another plan's."""
    root = Path(directory)
    found = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                    and p.name.split("-")[1].isdigit()), key=step_of, reverse=True) if root.is_dir() else []
    skipped = []
    for path in found:
        reason = problem(path)
        if reason:
            skipped.append(f"{path.name} cannot be loaded: {reason}")
            continue
        theirs = json.loads((path / TRAINER_STATE).read_text()).get("fingerprint")
        if isinstance(theirs, dict) and isinstance(theirs.get("layout"), dict):
            theirs["layout"].setdefault("pp", 1)  # written before pipelined checkpoints existed
        mine = fingerprint(plan)
        if theirs is not None and theirs != mine:
            raise CheckpointError(f"checkpoint {path} was written for another model or layout "
                                  f"({_first_difference(theirs, mine)}); resume with that plan or point "
                                  "--checkpoint-dir elsewhere")
        return path, [f"warning: {s}; resuming from the older {path.name} instead" for s in skipped]
    if skipped or any(root.glob("step-*")):
        detail = "; ".join(skipped) or "only partial .tmp folders"
        raise CheckpointError(f"--resume: no complete checkpoint in {root} ({detail}); delete them or "
                              "start without --resume")
    return None, []


def latest(directory: str | Path) -> Path | None:
    root = Path(directory)
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                and (p / MARKER).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def load(path: Path, model, optimizer, pipelined: bool = False) -> dict:
    """Restore model and optimizer in place; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    try:
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        states = _state_dicts(model, optimizer, pipelined)
        dcp.load(states, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"],
                       options=_options(pipelined))
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); delete it or "
                              "point --checkpoint-dir elsewhere") from None
    return trainer_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
