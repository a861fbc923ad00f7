"""``autoplan [plan]``: the fastest plan for a target, the longest context, or the fewest GPUs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import options


def register(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_hardware(parser)
    options.add_target_seqlen(parser)
    options.add_global_batch_tokens(parser)
    parser.add_argument("--objective", choices=["throughput", "max-seqlen", "min-gpus"], default=None,
                        help="default: throughput with --target-seqlen, else max-seqlen")
    options.add_fix(parser)
    parser.add_argument("--ac", choices=["auto", "none", "selective", "full"], default="auto",
                        help="activation checkpointing (auto: chosen per layer by the ILP)")
    options.add_executor(parser)
    options.add_memory_headroom(parser)
    parser.add_argument("--top", type=options.non_negative_int("--top"), default=3, help="alternatives to show")
    options.add_format(parser, ("table", "json", "yaml"))
    parser.add_argument("--out", default=None, help="write plan.yaml and launch scripts to this folder")
    parser.add_argument("--time-limit", type=options.positive_seconds("--time-limit"), default=20.0,
                        help="solver time limit, seconds")
    options.add_slurm(parser)


def request_from_args(args: argparse.Namespace):
    """The planning request with every name resolved, and the notes to print about defaults."""
    from ..planner import PlanRequest

    model = options.resolve_model_arg(args)
    hardware = options.resolve_hardware_args(args)
    notes = list(hardware.notes)
    num_gpus = hardware.num_gpus
    if num_gpus is None:
        num_gpus = hardware.gpus_per_node
        notes.append(f"--gpus not given: planning for {num_gpus} GPUs (one node)")
    elif args.gpus is None:
        notes.append(f"--gpus not given: planning for {num_gpus} GPUs (detected)")
    gpu, executor, calibration = options.resolve_executor_args(args, hardware.gpu)
    if calibration:
        notes.append(f"calibration {calibration} applied")
    fixed = dict(args.fix)
    target = args.target_seqlen if args.target_seqlen is not None else fixed.get("seq_len")
    gpus_per_node = args.gpus_per_node or min(hardware.gpus_per_node, num_gpus)
    request = PlanRequest(model=model, gpu=gpu, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                          target_seq_len=target, global_batch_tokens=args.global_batch_tokens,
                          objective=args.objective, fixed=fixed, ac=args.ac, executor=executor,
                          top_k=args.top, gpu_source=hardware.source, time_limit_s=args.time_limit,
                          calibration=calibration, memory_headroom=args.memory_headroom)
    return request, notes


def run(args: argparse.Namespace) -> int:
    from ..planner import make_plan
    from ..report.plan_text import render_plan_table

    options.check_out_dir("--out", args.out)
    slurm = options.slurm_options(args)
    request, notes = request_from_args(args)
    result = make_plan(request)
    if args.format == "table":
        for note in notes:
            print(f"note: {note}")
        print(render_plan_table(request, result))
    elif result.plan is not None:
        if args.format == "json":
            print(result.plan.model_dump_json(indent=2))
        else:
            print(result.plan.to_yaml(), end="")
    else:
        print(json.dumps({"plan": None, "explanation": result.explanation}, indent=2))
    if result.plan is None:
        return 1
    if args.out:
        from ..emit import write_bundle
        from ..emit.torchtitan_fit import plan_for_torchtitan, torchtitan_fit

        fit = torchtitan_fit(result.plan)
        titan = plan_for_torchtitan(request) if fit is not None and not fit.fits else None
        written = write_bundle(result.plan, Path(args.out), torchtitan_plan=titan, slurm=slurm)
        if args.format == "table":
            if fit is not None and not fit.fits:
                print(f"note: torchtitan would not fit this layout ({fit.describe()}); "
                      + (f"its files carry a plan made for torchtitan: {titan.describe_layout()} AC "
                         f"{titan.describe_ac()} (plan_torchtitan.yaml)" if titan is not None
                         else "no layout fits as torchtitan runs it: no torchtitan files written"))
            print("wrote " + ", ".join(str(p) for p in written))
    return 0
