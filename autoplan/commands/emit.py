"""``autoplan emit PLAN.yaml --target torchrun|slurm|torchtitan``: launch scripts for a plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def register(parser: argparse.ArgumentParser) -> None:
    from ..emit import TARGETS
    parser.add_argument("plan_path", metavar="PLAN.yaml")
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("--out", default=None, help="folder to write to (default: print)")
    parser.add_argument("--force", action="store_true",
                        help="write torchtitan files even when torchtitan would not fit the plan's layout")
    options.add_slurm(parser)


def run(args: argparse.Namespace) -> int:
    from ..emit import emit
    from ..plan import Plan

    options.check_out_dir("--out", args.out)
    slurm = options.slurm_options(args)
    plan = Plan.load(args.plan_path)
    files = emit(plan, args.target, Path(args.out) if args.out else None, plan_path=args.plan_path,
                 force=args.force, slurm=slurm)
    if not args.out:
        for name, text in files.items():
            print(f"# ---- {name}")
            print(text)
    else:
        print("wrote " + ", ".join(str(Path(args.out) / name) for name in files))
    return 0
