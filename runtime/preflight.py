"""Checks before any work: arguments, output paths, the data file, the checkpoint to
resume from. They need no process group, so every rank of ``runtime.train`` runs them
before it starts (rank 0 prints the one-line reason) and ``autoplan run`` runs them
before it starts torchrun. A mistake is found in seconds, not after the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autoplan.paths import file_problem, folder_problem

from . import checkpoint as ckpt
from .data import TokenSource

DEFAULT_CHECKPOINT_EVERY = 100  # steps, when --checkpoint-dir is given without --checkpoint-every


class ArgumentError(ValueError):
    """Flags that contradict each other or make no sense (exit 2, one line)."""


@dataclass
class Start:
    step: int = 0
    checkpoint: Path | None = None
    warnings: list[str] = field(default_factory=list)


def check_args(args) -> None:
    if args.steps < 1:
        raise ArgumentError(f"--steps {args.steps}: must be at least 1 (the step to train up to)")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise ArgumentError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0 (0: only at the end)")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise ArgumentError("--checkpoint-every needs --checkpoint-dir DIR (where to write them)")
    if getattr(args, "log_every", 0) < 0:
        raise ArgumentError(f"--log-every {args.log_every}: must be >= 0 (0: no progress lines)")
    if args.resume and not args.checkpoint_dir:
        raise ArgumentError("--resume needs --checkpoint-dir DIR (the folder the checkpoints are in)")


def writable_file(flag: str, value: str) -> None:
    problem = file_problem(value)
    if problem:
        raise ArgumentError(f"{flag} {value}: {problem}")


def writable_dir(flag: str, value: str) -> None:
    problem = folder_problem(value)
    if problem:
        raise ArgumentError(f"{flag} {value}: {problem}")


def check_paths(args) -> None:
    for flag, value in (("--metrics", args.metrics), ("--record", args.record)):
        if value:
            writable_file(flag, value)
    if args.checkpoint_dir:
        writable_dir("--checkpoint-dir", args.checkpoint_dir)


def token_source(plan, args) -> TokenSource:
    p = plan.parallelism
    sequences_per_step = plan.local_batch_size * p.dp_replicate * p.dp_shard * plan.grad_accum_steps
    return TokenSource(plan.model_spec().vocab_size, plan.seq_len, args.seed, args.data, sequences_per_step,
                       dtype=getattr(args, "data_dtype", None))


def start_point(args, plan) -> Start:
    """Where training starts: step 0, or the newest whole checkpoint with ``--resume``."""
    if not args.checkpoint_dir:
        return Start()
    root = Path(args.checkpoint_dir)
    if not args.resume:
        saved = sorted(p.name for p in root.glob("step-*") if not p.name.endswith(".tmp")) if root.is_dir() else []
        if saved:
            raise ckpt.CheckpointError(f"--checkpoint-dir {root} already holds checkpoints ({', '.join(saved)}): "
                                       "pass --resume to continue from the newest, or use an empty folder")
        return Start()
    path, warnings = ckpt.choose(root, plan)
    if path is None:
        raise ckpt.CheckpointError(f"--resume: no checkpoint in {root} yet; run without --resume to start")
    step = ckpt.step_of(path)
    if step >= args.steps:
        raise ckpt.CheckpointError(f"--resume: {path} is at step {step} and --steps is {args.steps}: nothing to "
                                   "train (--steps is the step to train up to; raise it)")
    return Start(step, path, warnings)


def preflight(args, plan) -> tuple[Start, TokenSource]:
    """Everything checkable before work starts: where to start, and the token source.
    Raises ArgumentError, DataError or CheckpointError with a one-line reason."""
    check_args(args)
    check_paths(args)
    source = token_source(plan, args)
    return start_point(args, plan), source
