"""``autoplan cost``: the predicted price of one configuration - memory, step time, FLOPs
and collectives - as a report or as the plan's ``predicted`` fields in JSON.

The exit status is 0 whether or not the configuration fits (``fits`` says which), so
scripts can price configurations that do not fit.
"""

from __future__ import annotations

import argparse
import json

from cost_models.config import AC_MODES, CP_IMPLS, ACPolicy
from cost_models.rules import PP_SCHEDULES

from ..units import parse_seq_len
from . import options


def ac_argument(text: str) -> dict[str, int] | str:
    """``full`` (every layer) or per-layer counts ``full=16,selective=8`` (the rest none)."""
    text = text.strip()
    if text in AC_MODES:
        return text
    counts: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        mode, _, number = item.partition("=")
        if mode not in AC_MODES or not number.isdigit():
            raise argparse.ArgumentTypeError(
                f"{text!r}: use one of {', '.join(AC_MODES)} or layer counts such as full=16,selective=8")
        if mode in counts:
            raise argparse.ArgumentTypeError(f"{text!r}: {mode} given twice")
        counts[mode] = int(number)
    if not counts:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(AC_MODES)} or counts like full=16")
    return counts


def ac_policy(ac: dict[str, int] | str, n_layers: int) -> ACPolicy:
    from cost_models.specs import SpecError

    if isinstance(ac, str):
        return ACPolicy.uniform(ac, n_layers)
    if ac.get("none") is not None and ac["none"] + ac.get("full", 0) + ac.get("selective", 0) != n_layers:
        raise SpecError(f"--ac {ac}: the counts must add up to the model's {n_layers} layers "
                        "(or leave 'none' out: the rest of the layers)")
    return ACPolicy.mix(n_layers, ac.get("full", 0), ac.get("selective", 0))


def register(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_hardware(parser, gpus_help="GPU count (default: the product of the degrees)")
    parser.add_argument("--dp-replicate", type=options.positive_int("--dp-replicate"), default=1)
    parser.add_argument("--dp-shard", type=options.positive_int("--dp-shard"), default=8)
    parser.add_argument("--cp", type=options.positive_int("--cp"), default=1)
    parser.add_argument("--tp", type=options.positive_int("--tp"), default=1)
    parser.add_argument("--pp", type=options.positive_int("--pp"), default=1,
                        help="pipeline stages (outermost mesh dim)")
    parser.add_argument("--pp-schedule", choices=PP_SCHEDULES, default="1f1b")
    parser.add_argument("--pp-microbatches", type=options.positive_int("--pp-microbatches"), default=None,
                        help="micro-batches per local batch (default: one sequence each)")
    parser.add_argument("--pp-virtual-stages", type=options.positive_int("--pp-virtual-stages"), default=None,
                        help="model chunks per pp rank (default: 2 with interleaved-1f1b, else 1)")
    parser.add_argument("--seq-len", type=options.size_type(parse_seq_len, "--seq-len"), default=8192)
    parser.add_argument("--local-batch-size", type=options.positive_int("--local-batch-size"), default=1)
    parser.add_argument("--grad-accum-steps", type=options.positive_int("--grad-accum-steps"), default=1)
    parser.add_argument("--ac", type=ac_argument, default="full",
                        help="none, selective, full (every layer) or layer counts: full=16 (the rest none), "
                             "full=16,selective=8")
    parser.add_argument("--cp-impl", choices=[i for i in CP_IMPLS if i != "none"], default="allgather-kv")
    parser.add_argument("--mesh-order", default=None,
                        help="mesh dims outermost first, e.g. dp_replicate/dp_shard/cp/tp (the default)")
    options.add_executor(parser)
    parser.add_argument("--compile", action="store_true",
                        help="the executor compiles each block (torchtitan's per-block torch.compile)")
    options.add_format(parser, ("table", "json"))


def run(args: argparse.Namespace) -> int:
    from cost_models.config import DEFAULT_MESH_ORDER, Parallelism, TrainConfig
    from cost_models.specs import ClusterSpec
    from cost_models.step import estimate_step

    from ..fix import parse_fix
    from ..report.plan_text import format_cost_report

    model = options.resolve_model_arg(args)
    hardware = options.resolve_hardware_args(args)
    gpu, executor, calibration = options.resolve_executor_args(args, hardware.gpu)
    if args.compile:
        executor = executor.with_overrides(compile=True)
    parallelism = Parallelism(args.dp_replicate, args.dp_shard, args.cp, args.tp, args.pp)
    pipeline = {}
    if args.pp > 1:
        virtual = args.pp_virtual_stages or (2 if args.pp_schedule == "interleaved-1f1b" else 1)
        pipeline = {"pp_schedule": args.pp_schedule, "pp_microbatches": args.pp_microbatches or args.local_batch_size,
                    "pp_virtual_stages": virtual}
    mesh_order = parse_fix(f"mesh_order={args.mesh_order}")["mesh_order"] if args.mesh_order else DEFAULT_MESH_ORDER
    num_gpus = args.gpus or parallelism.world_size
    cluster = ClusterSpec(gpu, num_gpus, args.gpus_per_node or min(hardware.gpus_per_node, num_gpus))
    cfg = TrainConfig(parallelism, args.seq_len, args.local_batch_size, args.grad_accum_steps,
                      ac_policy(args.ac, model.n_layers), cp_impl=args.cp_impl if args.cp > 1 else "none",
                      mesh_order=tuple(mesh_order), **pipeline)
    estimate = estimate_step(model, cluster, cfg, executor)
    if args.format == "json":
        print(json.dumps({**estimate.summary(), "fits": estimate.fits, "peak_phase": estimate.peak_phase,
                          "executor": executor.name, "calibration": calibration, "gpu": gpu.name,
                          "num_gpus": cluster.num_gpus, "model": model.name}, indent=2))
    else:
        print(format_cost_report(model, cluster, cfg, estimate, executor.name))
    return 0
