"""The ``autoplan`` command line. ``plan`` is the default command.

Planning never imports torch: ``run`` and ``check`` import the runtime inside their
handlers only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cost_models.specs import SpecError

from .errors import UsageError
from .plan import PlanError

COMMANDS = ("plan", "emit", "probe", "run", "cost", "check", "calibrate", "capacity", "sweep", "validate")


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
        return value
    parse.__name__ = flag
    return parse


def _seq_len(text: str) -> int:
    from .units import parse_seq_len
    try:
        return parse_seq_len(text, flag="--target-seqlen")
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1]) from None


def _tokens(text: str) -> int:
    from .units import parse_batch_tokens
    try:
        return parse_batch_tokens(text, flag="--global-batch-tokens")
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1]) from None


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="preset (default llama3-8b) or a Hugging Face config.json")
    parser.add_argument("--gpus", type=_positive_int("--gpus"), default=None,
                        help="GPU count (default: detected GPUs, else one node of 8)")
    parser.add_argument("--gpu", default="auto", help="auto (probe with NVML) or a preset name, e.g. h100, a100, h200")
    parser.add_argument("--gpus-per-node", type=_positive_int("--gpus-per-node"), default=None)
    parser.add_argument("--target-seqlen", type=_seq_len, default=None, help="e.g. 128k, 1M, 262144")
    parser.add_argument("--global-batch-tokens", type=_tokens, default=None, help="pin the global batch, e.g. 4M")
    parser.add_argument("--objective", choices=["throughput", "max-seqlen", "min-gpus"], default=None,
                        help="default: throughput with --target-seqlen, else max-seqlen")
    parser.add_argument("--fix", default=None, help="pin knobs: tp=8,cp=4,dp_shard=2,local_batch_size=1,cp_impl=...")
    parser.add_argument("--ac", choices=["auto", "none", "selective", "full"], default="auto",
                        help="activation checkpointing (auto: chosen per layer by the ILP)")
    parser.add_argument("--executor", choices=["autoplan", "torchtitan"], default="autoplan",
                        help="memory profile of the program that will run the plan")
    parser.add_argument("--calibration", default=None, help="calibration file from `autoplan calibrate`")
    parser.add_argument("--top", type=int, default=3, help="alternatives to show")
    parser.add_argument("--format", choices=["table", "json", "yaml"], default="table")
    parser.add_argument("--out", default=None, help="write plan.yaml and launch scripts to this folder")
    parser.add_argument("--time-limit", type=float, default=20.0, help="solver time limit, seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoplan",
        description="Plan long-context LLM training: dp/cp/tp degrees, seq_len, batch and activation "
                    "checkpointing that fit in GPU memory and run fast. `plan` is the default command.")
    sub = parser.add_subparsers(dest="command")

    plan = sub.add_parser("plan", help="choose a plan (default command)")
    add_plan_arguments(plan)
    plan.set_defaults(func=cmd_plan)

    emit = sub.add_parser("emit", help="write launch scripts for a plan")
    emit.add_argument("plan_path", metavar="PLAN.yaml")
    emit.add_argument("--target", choices=["torchrun", "slurm", "torchtitan"], required=True)
    emit.add_argument("--out", default=None, help="folder to write to (default: print)")
    emit.set_defaults(func=cmd_emit)

    probe = sub.add_parser("probe", help="show the detected hardware")
    probe.add_argument("--gpu", default="auto")
    probe.add_argument("--format", choices=["table", "json"], default="table")
    probe.set_defaults(func=cmd_probe)

    cost = sub.add_parser("cost", help="print the predicted breakdown of one configuration",
                          add_help=False)
    cost.set_defaults(func=None)

    run = sub.add_parser("run", help="train a plan on this node (wraps torchrun)")
    run.add_argument("plan_path", metavar="PLAN.yaml")
    run.add_argument("--nproc", type=_positive_int("--nproc"), default=None,
                     help="processes (default: the plan's GPU count)")
    run.add_argument("--steps", type=_positive_int("--steps"), default=None)
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--data", default=None)
    run.add_argument("--metrics", default=None)
    run.add_argument("--checkpoint-dir", default=None)
    run.add_argument("--resume", action="store_true")
    run.add_argument("--record", default=None, help="append a calibration record (JSONL) here")
    run.set_defaults(func=cmd_run)

    for module_name in ("check", "validate", "calibration", "capacity", "sweep"):
        _register_optional(module_name, sub)
    return parser


def _register_optional(module_name: str, sub) -> None:
    """Subcommands that live in their own modules register themselves."""
    import importlib
    try:
        module = importlib.import_module(f"autoplan.{module_name}")
    except ImportError as error:
        if error.name and error.name.startswith("autoplan"):
            return
        raise
    module.register(sub)


# ------------------------------------------------------------------------------- plan


def _request_from_args(args):
    from cost_models.executors import resolve_executor
    from cost_models.specs import resolve_model

    from .fix import parse_fix
    from .planner import PlanRequest
    from .probe import resolve_hardware

    model = resolve_model(args.model)
    hardware = resolve_hardware(args.gpu, args.gpus_per_node)
    notes = [hardware.note] if hardware.note else []
    num_gpus = args.gpus
    if num_gpus is None:
        num_gpus = hardware.gpu_count if hardware.source == "nvml" and hardware.gpu_count else hardware.gpus_per_node
        notes.append(f"--gpus not given: planning for {num_gpus} GPUs ({'detected' if hardware.source == 'nvml' else 'one node'})")
    gpu = hardware.gpu
    executor = resolve_executor(args.executor)
    if args.calibration:
        from .calibration import calibrated
        gpu, executor = calibrated(gpu, executor.name, args.calibration)
        notes.append(f"calibration {args.calibration} applied")
    fixed = parse_fix(args.fix) if args.fix else {}
    if "seq_len" in fixed and args.target_seqlen is None:
        args.target_seqlen = fixed["seq_len"]
    gpus_per_node = args.gpus_per_node or min(hardware.gpus_per_node, num_gpus)
    request = PlanRequest(model=model, gpu=gpu, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                          target_seq_len=args.target_seqlen, global_batch_tokens=args.global_batch_tokens,
                          objective=args.objective, fixed=fixed, ac=args.ac, executor=executor,
                          top_k=max(0, args.top), gpu_source=hardware.source, time_limit_s=args.time_limit)
    return request, notes


def cmd_plan(args) -> int:
    from .planner import make_plan
    from .render import render_plan_table

    request, notes = _request_from_args(args)
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
        from .emit import write_bundle
        written = write_bundle(result.plan, Path(args.out))
        if args.format == "table":
            print("wrote " + ", ".join(str(p) for p in written))
    return 0


# ------------------------------------------------------------------------------- others


def cmd_emit(args) -> int:
    from .emit import emit
    from .plan import Plan

    plan = Plan.load(args.plan_path)
    files = emit(plan, args.target, Path(args.out) if args.out else None, plan_path=args.plan_path)
    if not args.out:
        for name, text in files.items():
            print(f"# ---- {name}")
            print(text)
    else:
        print("wrote " + ", ".join(str(Path(args.out) / name) for name in files))
    return 0


def cmd_probe(args) -> int:
    from .probe import resolve_hardware

    found = resolve_hardware(args.gpu, None)
    data = found.to_dict() if hasattr(found, "to_dict") else dict(found.__dict__)
    if args.format == "json":
        print(json.dumps(data, indent=2, default=str))
        return 0
    gpu = found.gpu
    print(f"gpu          {gpu.name} ({gpu.memory_bytes / 2**30:.1f} GiB, {gpu.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16)")
    print(f"count        {found.gpu_count} ({found.gpus_per_node} per node)   source {found.source}")
    if getattr(found, "host_memory_bytes", None):
        print(f"host         {found.cpu_count} CPUs, {found.host_memory_bytes / 2**30:.1f} GiB memory")
    if found.note:
        print(f"note         {found.note}")
    return 0


def cmd_run(args) -> int:
    from .launch import run_plan

    return run_plan(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cost":
        from cost_models.__main__ import main as cost_main
        return cost_main(argv[1:])
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["plan"] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SpecError, PlanError, UsageError) as error:
        print(f"autoplan: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # validation errors from pydantic / specs deep in the stack
        print(f"autoplan: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"autoplan: error: {error.filename}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
