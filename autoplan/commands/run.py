"""``autoplan run PLAN.yaml``: train a plan on this node by starting torchrun."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

from ..errors import UsageError
from . import options


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan_path", metavar="PLAN.yaml")
    parser.add_argument("--nproc", type=options.positive_int("--nproc"), default=None,
                        help="processes (default: the plan's GPU count)")
    parser.add_argument("--steps", type=options.positive_int("--steps"), default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--data", default=None)
    parser.add_argument("--metrics", default=None)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--record", default=None, help="append a calibration record (JSONL) here")


def torchrun_command(args: argparse.Namespace, world_size: int) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               "-m", "runtime.train", "--plan", str(args.plan_path)]
    for flag, value in (("--steps", args.steps), ("--data", args.data), ("--metrics", args.metrics),
                        ("--checkpoint-dir", args.checkpoint_dir), ("--record", args.record)):
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
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    completed = subprocess.run(torchrun_command(args, world_size), env=env)
    return completed.returncode
