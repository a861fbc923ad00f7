"""``autoplan check PLAN.yaml``: trace the plan's training step with fake tensors (no GPU)
and compare its memory with the prediction, component by component."""

from __future__ import annotations

import argparse
import importlib.util

from ..errors import UsageError
from . import options


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan_path", metavar="PLAN.yaml")
    options.add_memory_headroom(parser, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.add_argument("--program", choices=("auto", "cuda", "cpu"), default="auto",
                        help="the program to trace: the CUDA program on a fake CUDA device (cuda; needs torch 2.13.0 "
                             "and g++), the CPU program (cpu), or cuda where it can be built, else cpu (auto)")
    parser.add_argument("--pp-rank", type=int, default=None,
                        help="pp > 1: the pp rank to trace (default: the one with the highest predicted peak)")
    parser.epilog = "--memory-headroom defaults to the headroom the plan was made with (5% when it says none)."


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:
        raise UsageError("autoplan check traces the runtime and needs PyTorch: pip install 'autoplan[runtime]'")
    from ..checking import check_plan, fits
    from ..plan import Plan
    from ..report.plan_text import format_check
    from ..report.progress import status, wanted

    plan = Plan.load(args.plan_path)
    which = (f"one pp rank ({plan.parallelism.pp} stages)" if plan.parallelism.pp > 1 else "rank 0")
    status(f"tracing two training steps of {which} of {plan.parallelism.world_size} "
           f"({plan.model_spec().n_layers} layers, {plan.seq_len:,} tokens) under fake tensors: "
           "seconds for small models, a minute or two for 70B", wanted(args.quiet))
    result = check_plan(plan, args.memory_headroom, args.program, args.pp_rank)
    print(format_check(result))
    return 0 if fits(result) else 1
