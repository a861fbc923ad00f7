"""``autoplan run PLAN.yaml``: train a plan on this node by starting torchrun.

runtime.train's checks (flags, output paths, data, checkpoint) run here first, so a
mistake is one line before torchrun starts; a one-line error from a worker is printed
once and torchrun's own report of the failed child is dropped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

from ..errors import UsageError
from . import options


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan_path", metavar="PLAN.yaml")
    parser.add_argument("--nproc", type=options.positive_int("--nproc"), default=None,
                        help="processes (default: the plan's GPU count)")
    parser.add_argument("--steps", type=options.positive_int("--steps"), default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--data", default=None, help="token ids: .npy, or a raw file with PATH.json / --data-dtype")
    parser.add_argument("--data-dtype", default=None, help="dtype of a raw --data file (uint16, uint32, int64, ...)")
    parser.add_argument("--metrics", default=None)
    parser.add_argument("--checkpoint-dir", default=None, help="save here (always after the last step)")
    parser.add_argument("--checkpoint-every", type=options.non_negative_int("--checkpoint-every"), default=None,
                        help="steps between checkpoints (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest whole checkpoint")
    parser.add_argument("--log-every", type=options.non_negative_int("--log-every"), default=None,
                        help="progress line every N steps (0: none)")
    parser.add_argument("--record", default=None, help="append a calibration record (JSONL) here")


def torchrun_command(args: argparse.Namespace, world_size: int) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               "-m", "runtime.train", "--plan", str(args.plan_path)]
    for flag, value in (("--steps", args.steps), ("--data", args.data), ("--data-dtype", args.data_dtype),
                        ("--metrics", args.metrics), ("--checkpoint-dir", args.checkpoint_dir),
                        ("--checkpoint-every", args.checkpoint_every), ("--log-every", args.log_every),
                        ("--record", args.record)):
        if value is not None:
            command += [flag, str(value)]
    if args.device != "auto":
        command += ["--device", args.device]
    if args.resume:
        command.append("--resume")
    return command


def run(args: argparse.Namespace) -> int:
    from ..plan import Plan

    if importlib.util.find_spec("torch") is None:
        raise UsageError("autoplan run needs PyTorch: pip install 'autoplan[runtime]'")
    plan = Plan.load(args.plan_path)
    world_size = plan.parallelism.world_size
    nproc = args.nproc or world_size
    if nproc != world_size:
        raise UsageError(f"--nproc {nproc}: the plan's degrees multiply to {world_size} "
                         f"(dp_replicate x dp_shard x cp x tp); use --nproc {world_size} or re-plan")
    _preflight(args, plan)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return _run_torchrun(torchrun_command(args, world_size), env)


def _preflight(args: argparse.Namespace, plan) -> None:
    """runtime.train's own checks, with its defaults, before any process starts."""
    from runtime import train
    from runtime.checkpoint import CheckpointError
    from runtime.data import DataError
    from runtime.preflight import ArgumentError, preflight

    defaults = train.parse_args(["--plan", str(args.plan_path)])
    checked = SimpleNamespace(**{**vars(defaults), **{k: v for k, v in vars(args).items() if v is not None}})
    try:
        preflight(checked, plan)
    except (ArgumentError, DataError, CheckpointError) as error:
        raise UsageError(str(error)) from None


ERROR_MARK = "runtime.train: error:"


def _run_torchrun(command: list[str], env: dict) -> int:
    """torchrun, its stderr passed through until a worker's one-line error: that line is
    printed once and the rest (the other workers stopped, torchrun's ChildFailedError) is
    dropped; exit 2 then."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    error = None
    assert process.stderr is not None  # stderr=PIPE
    for line in process.stderr:
        if error is None and ERROR_MARK in line:
            error = line[line.index(ERROR_MARK):].strip()
        elif error is None:
            sys.stderr.write(line)
            sys.stderr.flush()
    code = process.wait()
    if error is not None:
        print(error.replace(ERROR_MARK, "autoplan: error:", 1), file=sys.stderr)
        return 2
    return code
