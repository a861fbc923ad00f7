"""Distributed checkpoints (torch.distributed.checkpoint), written so a crash mid-save
never leaves a checkpoint that loads wrong.

Every rank writes its shards into ``step-N.tmp``; after a barrier, rank 0 writes the
trainer state (step, scheduler, data position, RNG) and a ``COMPLETE`` marker, then
renames the folder to ``step-N``. Loading takes the newest folder with a marker, so a
half-written ``.tmp`` is ignored.
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


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save(directory: str | Path, step: int, model, optimizer, trainer_state: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    root = Path(directory)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
        (tmp / MARKER).write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


def latest(directory: str | Path) -> Path | None:
    root = Path(directory)
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                and (p / MARKER).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def load(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer in place; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    try:
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        states = _state_dicts(model, optimizer)
        dcp.load(states, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
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
