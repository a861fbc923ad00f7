"""``autoplan sweep``: vary one knob (cp, gpus, seqlen, gpu, pp), or the seq_len vs tokens/s
frontier of each layout family; tables, CSV/JSON and charts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cost_models.specs import SpecError, resolve_gpu

from ..errors import UsageError
from ..sweep import KNOBS
from ..units import parse_seq_len
from . import options


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Vary one knob and report the longest sequence that fits, tokens/s/GPU, MFU and the memory "
                          "breakdown per point; or, with --frontier, the fastest plan of each layout family per "
                          "seq_len.")
    parser.add_argument("--knob", choices=KNOBS, default=None)
    parser.add_argument("--values", default=None, help="comma-separated, e.g. 1,2,4,8 or 32k,128k,1M or h100,h200")
    options.add_model(parser)
    options.add_hardware(parser, gpus_help="GPU count (default: one node of 8; for --knob cp with pinned degrees, "
                                           "their product)")
    options.add_fix(parser, help="pin knobs, e.g. dp_shard=8,tp=1")
    options.add_target_seqlen(parser, help="report tokens/s and MFU at this length (default: each point's longest)")
    options.add_executor(parser)
    options.add_memory_headroom(parser)
    parser.add_argument("--frontier", action="store_true", help="seq_len vs tokens/s/GPU per layout family")
    options.add_format(parser, ("table", "csv", "json"))
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="draw the charts (needs autoplan[plot])")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the table/csv/json here")
    parser.add_argument("--jobs", type=options.positive_int("--jobs"), default=None,
                        help="worker processes (default: CPUs, at most 8)")


def parse_values(knob: str, text: str) -> list:
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise UsageError("--values: give a comma-separated list, e.g. 1,2,4,8")
    if knob == "gpu":
        for item in items:
            try:
                resolve_gpu(item)
            except SpecError as error:
                raise UsageError(f"--values {item!r}: {str(error).split(': ', 1)[-1]}") from None
        return items
    if knob == "seqlen":
        return [parse_seq_len(v, flag="--values") for v in items]
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise UsageError(f"--values {text!r}: expected positive integers for --knob {knob}") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"--values {text!r}: must be positive integers")
    return values


def run(args: argparse.Namespace) -> int:
    from ..report.plots import PLOT_MISSING, plot
    from ..report.rows import write_rows
    from ..sweep import DEFAULT_GPUS, SweepSetup, default_frontier_seq_lens, frontier, sweep

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (only checks that the plot extra is installed)
        except ImportError:
            print(PLOT_MISSING, file=sys.stderr)
            return 2
    model = options.resolve_model_arg(args)
    hardware = options.resolve_hardware_args(args)
    gpu, executor, _ = options.resolve_executor_args(args, hardware.gpu)
    fixed = dict(args.fix)
    setup = SweepSetup(model, gpu, args.gpus, args.gpus_per_node, fixed, args.target_seqlen, executor,
                       args.memory_headroom)
    if args.frontier:
        if args.knob not in (None, "seqlen"):
            raise UsageError("--frontier varies the sequence length; drop --knob or use --knob seqlen")
        seqs = parse_values("seqlen", args.values) if args.values else default_frontier_seq_lens()
        rows = frontier(setup, seqs, jobs=args.jobs)
        title = f"{model.name} on {setup.gpus or DEFAULT_GPUS} x {gpu.name}: seq_len vs tokens/s per layout family"
    else:
        if not args.knob or not args.values:
            raise UsageError("--knob and --values: sweep needs both (e.g. --knob cp --values 1,2,4,8), or --frontier")
        rows = sweep(setup, args.knob, parse_values(args.knob, args.values), jobs=args.jobs)
        pins = ",".join(f"{k}={v}" for k, v in fixed.items())
        title = (f"{model.name} on {gpu.name if args.knob != 'gpu' else 'several GPUs'}: sweep over {args.knob}"
                 + (f" ({pins})" if pins else "") + " - predicted")
    text = write_rows(rows, args.format)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    if args.plot:
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr if not args.out and args.format != "table" else sys.stdout)
    return 0
