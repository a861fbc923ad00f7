"""``autoplan sweep``: vary one knob and tabulate max seq_len, tokens/s/GPU, MFU and the
memory breakdown; or trace the seq_len vs tokens/s frontier of each layout family."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cost_models.specs import GPUSpec, ModelSpec, resolve_gpu, resolve_model

from .errors import UsageError
from .fix import parse_fix
from .planner import PlanRequest, make_plan
from .search import power_of_two_grid
from .units import format_tokens, parse_seq_len

KNOBS = ("cp", "gpus", "seqlen", "gpu")
FAMILIES = {
    "FSDP": lambda p: p.cp == 1 and p.tp == 1,
    "FSDP+CP": lambda p: p.cp > 1 and p.tp == 1,
    "FSDP+TP": lambda p: p.cp == 1 and p.tp > 1,
    "FSDP+TP+CP": lambda p: p.cp > 1 and p.tp > 1,
}
MEMORY_KEYS = ("params", "grads", "optimizer", "fsdp_unsharded", "activations", "recompute_working", "logits_loss",
               "comm_buffers", "overhead")


@dataclass
class SweepSetup:
    model: ModelSpec
    gpu: GPUSpec
    gpus: int
    gpus_per_node: int | None
    fixed: dict
    target_seq_len: int | None
    executor: str = "autoplan"


def _point(setup: SweepSetup, knob: str, value, model: ModelSpec, gpu: GPUSpec, gpus: int, fixed: dict,
           target: int | None) -> dict:
    base = dict(model=model, gpu=gpu, num_gpus=gpus, gpus_per_node=setup.gpus_per_node and min(setup.gpus_per_node, gpus),
                fixed=fixed, executor=setup.executor, top_k=0)
    longest = make_plan(PlanRequest(objective="max-seqlen", **base))
    max_seq = longest.plan.seq_len if longest.plan else 0
    at = target or max_seq
    result = make_plan(PlanRequest(objective="throughput", target_seq_len=at, **base)) if at else longest
    row = {"knob": knob, "value": value, "gpus": gpus, "max_seq_len": max_seq, "seq_len": at if result.plan else 0,
           "tokens_per_second_per_gpu": 0.0, "mfu": 0.0, "layout": "", "peak_memory_bytes": 0.0}
    if result.plan is not None:
        est, p = result.estimate, result.plan.parallelism
        row.update(tokens_per_second_per_gpu=est.tokens_per_second_per_gpu, mfu=est.mfu,
                   layout=f"dp_rep={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}",
                   peak_memory_bytes=est.peak_memory_bytes)
        for key in MEMORY_KEYS:
            row[f"mem_{key}_bytes"] = est.memory_breakdown_bytes.get(key, 0.0)
    return row


def sweep(setup: SweepSetup, knob: str, values: list) -> list[dict]:
    if knob not in KNOBS:
        raise UsageError(f"--knob {knob!r}: use one of {', '.join(KNOBS)}")
    rows = []
    for value in values:
        model, gpu, gpus, fixed, target = setup.model, setup.gpu, setup.gpus, dict(setup.fixed), setup.target_seq_len
        if knob == "cp":
            fixed["cp"] = int(value)
            pinned = math.prod(int(fixed.get(k, 1)) for k in ("dp_replicate", "dp_shard", "cp", "tp"))
            gpus = pinned if all(k in fixed for k in ("dp_shard",)) else setup.gpus
        elif knob == "gpus":
            gpus = int(value)
        elif knob == "seqlen":
            target = int(value)
        else:
            gpu = resolve_gpu(str(value))
        rows.append(_point(setup, knob, value, model, gpu, gpus, fixed, target))
    return rows


def frontier(setup: SweepSetup, seq_lens: list[int]) -> list[dict]:
    """Best tokens/s/GPU per layout family at each sequence length (0 where none fits)."""
    rows = []
    for family, keep in FAMILIES.items():
        for seq in seq_lens:
            result = make_plan(PlanRequest(model=setup.model, gpu=setup.gpu, num_gpus=setup.gpus,
                                           gpus_per_node=setup.gpus_per_node, target_seq_len=seq, fixed=setup.fixed,
                                           executor=setup.executor, top_k=0, layout_filter=keep))
            rows.append({"family": family, "seq_len": seq,
                         "tokens_per_second_per_gpu": result.estimate.tokens_per_second_per_gpu if result.plan else 0.0,
                         "mfu": result.estimate.mfu if result.plan else 0.0})
    return rows


# ------------------------------------------------------------------------------ output

def rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def rows_from_csv(text: str) -> list[dict]:
    """Inverse of rows_to_csv: numbers come back as int/float."""
    def convert(value: str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value
    return [{k: convert(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def format_table(rows: list[dict]) -> str:
    if rows and "family" in rows[0]:
        lines = [f"{'family':<12}{'seq_len':>9}{'tok/s/GPU':>11}{'MFU':>7}"]
        lines += [f"{r['family']:<12}{format_tokens(r['seq_len']):>9}{r['tokens_per_second_per_gpu']:>11,.0f}"
                  f"{r['mfu'] * 100:>6.1f}%" for r in rows]
        return "\n".join(lines)
    lines = [f"{'knob':<7}{'value':>8}{'GPUs':>6}{'max seq':>9}{'at seq':>8}{'tok/s/GPU':>11}{'MFU':>7}"
             f"{'memory':>9}  layout"]
    for r in rows:
        lines.append(f"{r['knob']:<7}{str(r['value']):>8}{r['gpus']:>6}{format_tokens(r['max_seq_len']):>9}"
                     f"{format_tokens(r['seq_len']):>8}{r['tokens_per_second_per_gpu']:>11,.0f}{r['mfu'] * 100:>6.1f}%"
                     f"{r['peak_memory_bytes'] / 2**30:>7.1f}Gi  {r['layout']}")
    return "\n".join(lines)


def _seq_ticks(axis, values) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xticks(values)
    axis.set_xticklabels([format_tokens(int(v)) for v in values], rotation=45)


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'autoplan[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows and "family" in rows[0]:
        fig, axis = plt.subplots(figsize=(8, 5))
        seqs = sorted({r["seq_len"] for r in rows})
        for family in FAMILIES:
            points = [(r["seq_len"], r["tokens_per_second_per_gpu"]) for r in rows
                      if r["family"] == family and r["tokens_per_second_per_gpu"] > 0]
            if points:
                axis.plot(*zip(*points), marker="o", label=family)
        _seq_ticks(axis, seqs)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel("tokens/s per GPU (predicted)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    else:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        values = [r["value"] for r in rows]
        numeric = all(isinstance(v, (int, float)) for v in values)
        x = values if numeric else list(range(len(values)))
        knob = rows[0]["knob"] if rows else ""
        label = {"cp": "context-parallel degree", "gpus": "GPUs", "seqlen": "sequence length (tokens)",
                 "gpu": "GPU"}.get(knob, knob)
        series = [("max_seq_len", "longest sequence that fits (tokens)"),
                  ("tokens_per_second_per_gpu", "tokens/s per GPU"), ("mfu", "MFU (%)")]
        for axis, (key, ylabel) in zip(axes, series):
            y = [r[key] * (100 if key == "mfu" else 1) for r in rows]
            axis.plot(x, y, marker="o")
            axis.set_xlabel(label)
            axis.set_ylabel(ylabel)
            axis.grid(True, alpha=0.3)
            if numeric and knob in ("cp", "gpus"):
                axis.set_xscale("log", base=2)
                axis.set_xticks(x)
                axis.set_xticklabels([str(v) for v in x])
            elif not numeric:
                axis.set_xticks(x)
                axis.set_xticklabels([str(v) for v in values], rotation=30)
            if key == "max_seq_len":
                axis.set_yscale("log", base=2)
                ticks = sorted({v for v in y if v > 0})
                axis.set_yticks(ticks)
                axis.set_yticklabels([format_tokens(int(v)) for v in ticks])
        if rows and rows[0].get("seq_len") and len({r["seq_len"] for r in rows}) == 1:
            axes[1].set_title(f"at seq_len {format_tokens(rows[0]['seq_len'])}")
            axes[2].set_title(f"at seq_len {format_tokens(rows[0]['seq_len'])}")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_values(knob: str, text: str) -> list:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise UsageError("--values: give a comma-separated list, e.g. 1,2,4,8")
    if knob == "gpu":
        return items
    if knob == "seqlen":
        return [parse_seq_len(v, flag="--values") for v in items]
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise UsageError(f"--values {text!r}: expected integers for --knob {knob}") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"--values {text!r}: must be positive")
    return values


def handle(args) -> int:
    model = resolve_model(args.model)
    gpu = resolve_gpu(None if args.gpu in (None, "auto") else args.gpu)
    fixed = parse_fix(args.fix) if args.fix else {}
    target = parse_seq_len(args.target_seqlen) if args.target_seqlen else None
    setup = SweepSetup(model, gpu, args.gpus, args.gpus_per_node, fixed, target, args.executor)
    if args.frontier:
        seqs = _parse_values("seqlen", args.values) if args.values else power_of_two_grid(4096, 1024 * 1024)
        seqs = [s for s in seqs if s & (s - 1) == 0] or seqs
        rows = frontier(setup, seqs)
        title = f"{model.name} on {args.gpus} x {gpu.name}: seq_len vs tokens/s frontier"
    else:
        if not args.knob or not args.values:
            raise UsageError("sweep needs --knob and --values (or --frontier)")
        rows = sweep(setup, args.knob, _parse_values(args.knob, args.values))
        title = f"{model.name} on {gpu.name}: sweep over {args.knob}"
    text = {"json": lambda: json.dumps(rows, indent=1), "csv": lambda: rows_to_csv(rows),
            "table": lambda: format_table(rows)}[args.format]()
    if args.out:
        Path(args.out).write_text(text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text)
    if args.plot:
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="vary one knob (cp, gpus, seqlen, gpu) or draw the frontier")
    parser.add_argument("--knob", choices=KNOBS, default=None)
    parser.add_argument("--values", default=None, help="comma-separated, e.g. 1,2,4,8 or 32k,128k")
    parser.add_argument("--model", default=None)
    parser.add_argument("--gpu", default=None)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--fix", default=None)
    parser.add_argument("--target-seqlen", default=None)
    parser.add_argument("--executor", default="autoplan")
    parser.add_argument("--frontier", action="store_true", help="seq_len vs tokens/s per layout family")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument("--plot", default=None, metavar="FILE.png")
    parser.add_argument("--out", default=None)
    parser.set_defaults(func=handle)
