"""``autoplan capacity``: the fewest GPUs for a target sequence length and what
neighbouring cluster sizes would give (tokens/s/GPU, MFU, time and GPU-hours)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ..units import format_tokens, parse_train_tokens
from . import options

DEFAULT_MAX_GPUS = 4096


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The fewest GPUs (whole nodes) on which some layout fits --target-seqlen, its plan, and "
                          "the fastest plan, tokens/s/GPU, MFU, time and GPU-hours to train --train-tokens on "
                          "neighbouring GPU counts. Exit code 1 when nothing up to --max-gpus fits.")
    options.add_model(parser)
    options.add_target_seqlen(parser, required=True)
    options.add_hardware(parser, with_count=False)
    parser.add_argument("--max-gpus", type=options.positive_int("--max-gpus"), default=DEFAULT_MAX_GPUS,
                        help=f"largest cluster to consider (default {DEFAULT_MAX_GPUS})")
    parser.add_argument("--train-tokens", type=options.size_type(parse_train_tokens, "--train-tokens"), default=None,
                        help="token budget for time-to-train, e.g. 1T, 300B (decimal)")
    options.add_executor(parser)
    options.add_memory_headroom(parser)
    options.add_format(parser, ("table", "csv", "json"))


def run(args: argparse.Namespace) -> int:
    from ..capacity import CapacityRow, capacity
    from ..report.rows import format_capacity, rows_to_csv

    model = options.resolve_model_arg(args)
    hardware = options.resolve_hardware_args(args)
    gpu, executor, _ = options.resolve_executor_args(args, hardware.gpu)
    target, budget = args.target_seqlen, args.train_tokens
    result = capacity(model, gpu, target, args.max_gpus, hardware.gpus_per_node, budget, executor,
                      memory_headroom=args.memory_headroom)
    if args.format == "json":
        print(json.dumps({"model": model.name, "gpu": gpu.name, "target_seq_len": target, "max_gpus": args.max_gpus,
                          "gpus_per_node": result.gpus_per_node, "train_tokens": budget,
                          "fewest_gpus": result.fewest_gpus, "fewest_gpus_without_pp": result.fewest_gpus_without_pp,
                          "pipelined_plan": result.pipelined.plan.model_dump(mode="json")
                          if result.pipelined is not None and result.pipelined.plan is not None else None,
                          "plan": result.plan.plan.model_dump(mode="json") if result.plan.plan else None,
                          "explanation": result.plan.explanation, "rows": result.to_rows()}, indent=2))
    elif args.format == "csv":
        text = rows_to_csv(result.to_rows())
        print(text or ",".join(f.name for f in fields(CapacityRow)), end="" if text else "\n")
    else:
        print(format_capacity(result, model, gpu))
    if result.fewest_gpus is None and args.format != "table":
        print(f"autoplan capacity: seq_len {format_tokens(target)} does not fit on {args.max_gpus} GPUs or fewer",
              file=sys.stderr)
    return 0 if result.fewest_gpus else 1
