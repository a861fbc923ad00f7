"""``autoplan sweep``: vary one knob and tabulate the longest sequence that fits,
tokens/s/GPU, MFU and the memory breakdown; or trace the seq_len vs tokens/s frontier of
each layout family on a fixed GPU count.

Knobs:
- ``cp``: context-parallel degree, other degrees pinned by ``fixed``. Without an explicit
  GPU count the count follows the pins: ``dp_shard=8`` and cp 1, 2, 4, 8 gives 8, 16,
  32, 64 GPUs (unpinned degrees are then 1). With ``gpus`` given, the count stays and the
  planner chooses the unpinned degrees.
- ``gpus``: GPU counts; ``seqlen``: target sequence lengths; ``gpu``: GPU types.

Each point plans twice at most: the longest sequence that fits (objective max-seqlen
under the pins) and the fastest plan at the target sequence length (or, without a
target, at that longest length: the max-seqlen plan already is the fastest one there).
Plans are memoized within the process, and points run in worker processes when there
are several, so a 100-point sweep stays within seconds.

Rows are flat dicts with a fixed set of columns (``SWEEP_FIELDS`` / ``FRONTIER_FIELDS``)
so that CSV and JSON read back to equal rows (``read_rows``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from cost_models.config import Parallelism
from cost_models.specs import GPUSpec, ModelSpec, SpecError, resolve_gpu, resolve_model

from .errors import UsageError
from .fix import parse_fix
from .planner import PlanRequest, PlanResult, make_plan
from .units import format_tokens, int_argument, parse_seq_len

KNOBS = ("cp", "gpus", "seqlen", "gpu")
FAMILIES: dict[str, Callable[[Parallelism], bool]] = {
    "FSDP": lambda p: p.cp == 1 and p.tp == 1,
    "FSDP+CP": lambda p: p.cp > 1 and p.tp == 1,
    "FSDP+TP": lambda p: p.cp == 1 and p.tp > 1,
    "FSDP+TP+CP": lambda p: p.cp > 1 and p.tp > 1,
}
MEMORY_KEYS = ("params", "grads", "optimizer", "fsdp_unsharded", "activations", "recompute_working", "logits_loss",
               "comm_buffers", "overhead")
SWEEP_FIELDS = ("knob", "value", "gpu", "gpus", "max_seq_len", "seq_len", "fits", "tokens_per_second_per_gpu", "mfu",
                "layout", "ac", "peak_memory_bytes") + tuple(f"mem_{k}_bytes" for k in MEMORY_KEYS) + ("note",)
FRONTIER_FIELDS = ("family", "gpu", "gpus", "seq_len", "fits", "tokens_per_second_per_gpu", "mfu", "layout", "ac",
                   "peak_memory_bytes", "note")
_INT_FIELDS = {"gpus", "max_seq_len", "seq_len"}
_BOOL_FIELDS = {"fits", "fewest"}
_STR_FIELDS = {"knob", "gpu", "layout", "ac", "note", "family"}
_DEFAULT_GPUS = 8
_PARALLEL_FROM = 4  # points; fewer run in this process


@dataclass
class SweepSetup:
    model: ModelSpec
    gpu: GPUSpec
    gpus: int | None = None  # None: one node, or (cp sweep) the product of the pinned degrees
    gpus_per_node: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    target_seq_len: int | None = None  # None: report tokens/s at each point's longest sequence
    executor: str = "autoplan"


# ------------------------------------------------------------------------------ planning


@lru_cache(maxsize=512)
def _plan(model: ModelSpec, gpu: GPUSpec, gpus: int, gpus_per_node: int | None, fixed: tuple, executor: str,
          objective: str, target: int | None, family: str | None) -> PlanResult:
    per_node = min(gpus_per_node or gpu.gpus_per_node, gpus)
    return make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=gpus, gpus_per_node=per_node, target_seq_len=target,
                                 objective=objective, fixed=dict(fixed), executor=executor, top_k=0,
                                 layout_filter=FAMILIES[family] if family else None))


def _frozen(fixed: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fixed.items() if k != "seq_len"))


def _layout(result: PlanResult) -> str:
    p = result.plan.parallelism
    text = f"dp_rep={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}"
    if p.cp > 1:
        text += f" {result.plan.cp_impl}"
    return text + f" b={result.plan.local_batch_size}"


def _ac(result: PlanResult) -> str:
    """'full', 'none', or a per-layer mix such as '20 full + 12 none'."""
    doc = result.plan.activation_checkpoint
    if doc.mode != "mixed" or not doc.layers:
        return doc.mode
    return " + ".join(f"{doc.layers.count(m)} {m}" for m in ("full", "selective", "none") if m in doc.layers)


def _outcome(result: PlanResult) -> dict:
    """The columns that describe one plan (zeros and the planner's reason when none fits)."""
    if result.plan is None:
        return {"fits": False, "tokens_per_second_per_gpu": 0.0, "mfu": 0.0, "layout": "", "ac": "",
                "peak_memory_bytes": 0.0, **{f"mem_{k}_bytes": 0.0 for k in MEMORY_KEYS},
                "note": result.explanation[0] if result.explanation else "no plan"}
    predicted = result.plan.predicted
    breakdown = predicted.memory_breakdown_bytes
    return {"fits": True, "tokens_per_second_per_gpu": float(predicted.tokens_per_second_per_gpu),
            "mfu": float(predicted.mfu), "layout": _layout(result), "ac": _ac(result),
            "peak_memory_bytes": float(predicted.peak_memory_bytes),
            **{f"mem_{k}_bytes": float(breakdown.get(k, 0.0)) for k in MEMORY_KEYS}, "note": ""}


def _point_inputs(setup: SweepSetup, knob: str, value) -> tuple[GPUSpec, int, dict, int | None]:
    fixed = dict(setup.fixed)
    gpu, target = setup.gpu, setup.target_seq_len or fixed.pop("seq_len", None)
    fixed.pop("seq_len", None)
    gpus = setup.gpus or _DEFAULT_GPUS
    if knob == "cp":
        fixed["cp"] = int(value)
        pins = [k for k in ("dp_replicate", "dp_shard", "tp") if k in fixed]
        if setup.gpus is None and pins:
            gpus = math.prod(int(fixed[k]) for k in pins) * int(value)
    elif knob == "gpus":
        gpus = int(value)
    elif knob == "seqlen":
        target = int(value)
    elif knob == "gpu":
        gpu = resolve_gpu(str(value))
    else:
        raise UsageError(f"--knob {knob!r}: use one of {', '.join(KNOBS)}")
    return gpu, gpus, fixed, target


def sweep_point(setup: SweepSetup, knob: str, value) -> dict:
    """One row of a sweep: the longest sequence that fits, and the plan at the target."""
    gpu, gpus, fixed, target = _point_inputs(setup, knob, value)
    row = {"knob": knob, "value": value, "gpu": gpu.name, "gpus": gpus}
    key = (setup.model, gpu, gpus, setup.gpus_per_node, _frozen(fixed), setup.executor)
    try:
        longest = _plan(*key, "max-seqlen", None, None)
        max_seq = longest.plan.seq_len if longest.plan else 0
        result = _plan(*key, "throughput", target, None) if target else longest
    except SpecError as error:  # this point's pins cannot work on this GPU count: a row, not an abort
        return {**row, "max_seq_len": 0, "seq_len": target or 0,
                **_outcome(PlanResult(None, None, [], [], [str(error)], "", 0))}
    return {**row, "max_seq_len": max_seq, "seq_len": target or max_seq, **_outcome(result)}


def frontier_point(setup: SweepSetup, family: str, seq_len: int) -> dict:
    """The fastest plan of one layout family at one sequence length."""
    gpus = setup.gpus or _DEFAULT_GPUS
    fixed = {k: v for k, v in setup.fixed.items() if k != "seq_len"}
    row = {"family": family, "gpu": setup.gpu.name, "gpus": gpus, "seq_len": seq_len}
    try:
        result = _plan(setup.model, setup.gpu, gpus, setup.gpus_per_node, _frozen(fixed), setup.executor,
                       "throughput", seq_len, family)
    except SpecError as error:
        result = PlanResult(None, None, [], [], [str(error)], "", 0)
    outcome = {k: v for k, v in _outcome(result).items() if k in FRONTIER_FIELDS}
    return {**row, **outcome}


def _call(task: tuple) -> dict:
    function, args = task
    return function(*args)


def _run(tasks: list[tuple], jobs: int | None) -> list[dict]:
    """Evaluate (function, args) tasks, in worker processes when there are enough of them."""
    jobs = jobs if jobs is not None else min(os.cpu_count() or 1, 8)
    jobs = min(jobs, len(tasks))
    if jobs <= 1 or len(tasks) < _PARALLEL_FROM:
        return [_call(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start at once and inherit the memo. A parent that has solved before
    # holds HiGHS's worker threads; a forked child would inherit a scheduler without its
    # threads and hang on its first solve, so stop them first (HiGHS restarts them).
    # Elsewhere (macOS, Windows) points run here: spawned workers would re-run the caller's script.
    if not sys.platform.startswith("linux") or not _stop_highs_threads():
        return [_call(t) for t in tasks]
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_call, tasks))
    except (OSError, RuntimeError):  # no processes here (sandbox, limits): run them in this one
        return [_call(t) for t in tasks]


def _stop_highs_threads() -> bool:
    """True when no HiGHS worker threads are left running (so forking is safe)."""
    try:
        import highspy
    except ImportError:
        return True  # no HiGHS: pulp runs CBC as a subprocess
    reset = getattr(getattr(highspy, "Highs", None), "resetGlobalScheduler", None)
    if reset is None:
        return False
    reset(True)
    return True


def sweep(setup: SweepSetup, knob: str, values: list, jobs: int | None = None) -> list[dict]:
    """Vary one knob (``cp``, ``gpus``, ``seqlen`` or ``gpu``): one row per value, in order."""
    if knob not in KNOBS:
        raise UsageError(f"--knob {knob!r}: use one of {', '.join(KNOBS)}")
    for value in values:
        _point_inputs(setup, knob, value)  # bad values fail here, in this process, before any work
    return _run([(sweep_point, (setup, knob, v)) for v in values], jobs)


def frontier(setup: SweepSetup, seq_lens: list[int], families: list[str] | None = None,
             jobs: int | None = None) -> list[dict]:
    """For each layout family and sequence length: the fastest plan of that family
    (``fits`` False and zeros where none of the family fits)."""
    families = list(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UsageError(f"layout family {unknown[0]!r}: use one of {', '.join(FAMILIES)}")
    return _run([(frontier_point, (setup, f, s)) for f in families for s in seq_lens], jobs)


def grid(setup: SweepSetup, seq_lens: list[int], gpu_counts: list[int], jobs: int | None = None) -> list[dict]:
    """The fastest plan at every (sequence length, GPU count): ``seqlen`` sweeps, one per count."""
    points = [(s, n) for n in gpu_counts for s in seq_lens]
    order = sorted(range(len(points)), key=lambda i: -points[i][1])  # the costly (many-GPU) points first
    rows = _run([(_grid_point, (setup, *points[i])) for i in order], jobs)
    out: list[dict] = [{}] * len(points)
    for i, row in zip(order, rows):
        out[i] = row
    return out


def _grid_point(setup: SweepSetup, seq_len: int, gpus: int) -> dict:
    fixed = {k: v for k, v in setup.fixed.items() if k != "seq_len"}
    row = {"gpu": setup.gpu.name, "gpus": gpus, "seq_len": seq_len}
    try:
        result = _plan(setup.model, setup.gpu, gpus, setup.gpus_per_node, _frozen(fixed), setup.executor,
                       "throughput", seq_len, None)
    except SpecError as error:
        result = PlanResult(None, None, [], [], [str(error)], "", 0)
    return {**row, **_outcome(result)}


# ------------------------------------------------------------------------------ rows in and out


def _typed(name: str, text: str, knob: str | None):
    if name in _BOOL_FIELDS:
        if text not in ("True", "False"):
            raise UsageError(f"column {name}: expected True or False, got {text!r}")
        return text == "True"
    if name in _STR_FIELDS or (name == "value" and knob == "gpu"):
        return text
    if name in _INT_FIELDS or name == "value":
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


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
    """Inverse of ``rows_to_csv`` for sweep, frontier and capacity rows: each column
    comes back as the type it was written from."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        knob = raw.get("knob")
        rows.append({k: (None if v == "" and k not in _STR_FIELDS else _typed(k, v, knob)) for k, v in raw.items()})
    return rows


def rows_to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)


def read_rows(text: str, fmt: str) -> list[dict]:
    """Rows written by ``write_rows`` (csv or json), back as equal dicts."""
    if fmt == "json":
        return json.loads(text)
    if fmt == "csv":
        return rows_from_csv(text)
    raise UsageError(f"--format {fmt!r}: only csv and json read back")


def write_rows(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return rows_to_json(rows)
    if fmt == "csv":
        return rows_to_csv(rows)
    if fmt == "table":
        return format_table(rows)
    raise UsageError(f"--format {fmt!r}: use table, csv or json")


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f}"


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    if "family" in rows[0]:
        lines = [f"{'family':<12}{'seq_len':>9}{'tok/s/GPU':>11}{'MFU':>7}{'mem GiB':>9}  layout"]
        for r in rows:
            if r["fits"]:
                lines.append(f"{r['family']:<12}{format_tokens(r['seq_len']):>9}{r['tokens_per_second_per_gpu']:>11,.0f}"
                             f"{r['mfu'] * 100:>6.1f}%{_gib(r['peak_memory_bytes']):>9}  {r['layout']} AC {r['ac']}")
            else:
                lines.append(f"{r['family']:<12}{format_tokens(r['seq_len']):>9}{'-':>11}{'-':>7}{'-':>9}  does not fit")
        return "\n".join(lines)
    short = {"params": "param", "grads": "grad", "optimizer": "optim", "fsdp_unsharded": "unshard",
             "activations": "act", "recompute_working": "recomp", "logits_loss": "loss", "comm_buffers": "comm",
             "overhead": "other"}
    width = max([len(rows[0]["knob"])] + [len(str(r["value"])) for r in rows]) + 2
    head = (f"{rows[0]['knob']:>{width}}{'GPUs':>6}{'max seq':>9}{'at seq':>8}{'tok/s/GPU':>11}{'MFU':>7}{'peak':>7}  "
            + "".join(f"{short[k]:>8}" for k in MEMORY_KEYS) + "  layout")
    lines = [head, f"{'':>{width}}{'':>6}{'':>9}{'':>8}{'':>11}{'':>7}{'GiB':>7}  "
             + f"{'memory breakdown at the peak, GiB':^{8 * len(MEMORY_KEYS)}}"]
    for r in rows:
        value = format_tokens(r["value"]) if r["knob"] == "seqlen" else str(r["value"])
        line = f"{value:>{width}}{r['gpus']:>6}{format_tokens(r['max_seq_len']) if r['max_seq_len'] else '-':>9}"
        line += f"{format_tokens(r['seq_len']) if r['seq_len'] else '-':>8}"
        if r["fits"]:
            line += (f"{r['tokens_per_second_per_gpu']:>11,.0f}{r['mfu'] * 100:>6.1f}%{_gib(r['peak_memory_bytes']):>7}  "
                     + "".join(f"{_gib(r[f'mem_{k}_bytes']):>8}" for k in MEMORY_KEYS) + f"  {r['layout']} AC {r['ac']}")
        else:
            line += f"{'-':>11}{'-':>7}{'-':>7}  does not fit: {r['note']}"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ charts

PLOT_MISSING = "install autoplan[plot] for --plot"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(PLOT_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _seq_axis(axis, values, which: str = "x") -> None:
    """Log2 axis with sequence-length ticks (8k, 128k, 1M) at the given values."""
    ticks = sorted({int(v) for v in values if v > 0})
    set_scale, set_ticks, set_labels = ((axis.set_xscale, axis.set_xticks, axis.set_xticklabels) if which == "x" else
                                        (axis.set_yscale, axis.set_yticks, axis.set_yticklabels))
    set_scale("log", base=2)
    if ticks:
        set_ticks(ticks)
        set_labels([format_tokens(v) for v in ticks])
    from matplotlib.ticker import NullLocator

    (axis.xaxis if which == "x" else axis.yaxis).set_minor_locator(NullLocator())


def plot(rows: list[dict], path: str, title: str) -> None:
    """A figure for sweep rows (max seq_len, tokens/s/GPU and MFU against the knob) or
    frontier rows (tokens/s/GPU against seq_len, one line per layout family)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    thousands = FuncFormatter(lambda v, _pos: f"{v:,.0f}")
    if rows and "family" in rows[0]:
        fig, axis = plt.subplots(figsize=(9, 5.5))
        styles = {"FSDP": ("o", "-"), "FSDP+CP": ("s", "--"), "FSDP+TP": ("^", "-."), "FSDP+TP+CP": ("D", ":")}
        for family in FAMILIES:
            points = [(r["seq_len"], r["tokens_per_second_per_gpu"]) for r in rows
                      if r["family"] == family and r["fits"]]
            if not points:
                continue
            marker, line = styles[family]
            axis.plot(*zip(*points), marker=marker, linestyle=line, markersize=7, linewidth=2, alpha=0.85,
                      label=f"{family} (fits up to {format_tokens(max(p[0] for p in points))})")
        _seq_axis(axis, [r["seq_len"] for r in rows])
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(thousands)
        axis.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
        axis.set_xlabel("sequence length (tokens, log2 scale)")
        axis.set_ylabel("tokens/s per GPU (predicted, log scale)")
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(title="layout family (best plan of each)")
    else:
        knob = rows[0]["knob"] if rows else ""
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        values = [r["value"] for r in rows]
        numeric = knob in ("cp", "gpus", "seqlen")
        x = values if numeric else list(range(len(values)))
        label = {"cp": "context-parallel degree (log2 scale)", "gpus": "GPUs (log2 scale)",
                 "seqlen": "target sequence length (tokens, log2 scale)", "gpu": "GPU type"}.get(knob, knob)
        if numeric and knob != "seqlen":
            tick_text = [str(v) for v in values]
            if knob == "cp" and len({r["gpus"] for r in rows}) > 1:
                tick_text = [f"{v}\n({r['gpus']} GPUs)" for v, r in zip(values, rows)]
        elif numeric:
            tick_text = [format_tokens(v) for v in values]
        else:
            tick_text = [str(v) for v in values]
        series = [("max_seq_len", "longest sequence that fits (tokens)"),
                  ("tokens_per_second_per_gpu", "tokens/s per GPU"), ("mfu", "MFU (%)")]
        for axis, (key, ylabel) in zip(axes, series):
            fits = [r["max_seq_len"] > 0 if key == "max_seq_len" else r["fits"] for r in rows]
            points = [(xi, r[key] * (100 if key == "mfu" else 1)) for xi, r, ok in zip(x, rows, fits) if ok]
            if points and numeric:
                axis.plot(*zip(*points), marker="o", linewidth=2)
            elif points:  # GPU types: categories, not a trend
                axis.bar(*zip(*points), width=0.6, alpha=0.8)
            for xi, yi in points if len(points) <= 12 else []:
                text = format_tokens(int(yi)) if key == "max_seq_len" else (
                    f"{yi:.1f}%" if key == "mfu" else f"{yi:,.0f}")
                axis.annotate(text, (xi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
            for xi, ok in zip(x, fits):
                if not ok:
                    axis.annotate("does not fit", (xi, 0.04), xycoords=("data", "axes fraction"), ha="center",
                                  fontsize=8, color="firebrick")
            axis.set_xlabel(label)
            axis.set_ylabel(ylabel)
            axis.grid(True, alpha=0.3)
            if numeric:
                axis.set_xscale("log", base=2)
                axis.minorticks_off()
                axis.set_xlim(min(x) / 1.3, max(x) * 1.3)  # every point's slot, drawn or not
            axis.set_xticks(x)
            axis.set_xticklabels(tick_text)
            if key == "max_seq_len":
                _seq_axis(axis, [p[1] for p in points], which="y")
                if points:
                    low, high = min(p[1] for p in points), max(p[1] for p in points)
                    axis.set_ylim(low / 1.6, high * 1.6)
            else:
                top = max([p[1] for p in points] or [1.0])
                axis.set_ylim(0, top * 1.18)
                if key != "mfu":
                    axis.yaxis.set_major_formatter(thousands)
        seqs = {r["seq_len"] for r in rows if r["fits"]}
        if knob != "seqlen":
            at = f"at seq_len {format_tokens(next(iter(seqs)))}" if len(seqs) == 1 else "at each point's longest seq_len"
            axes[1].set_title(at, fontsize=10)
            axes[2].set_title(at, fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ command line


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


def _positive(flag: str, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise UsageError(f"{flag} {value}: must be a positive integer")
    return value


def default_frontier_seq_lens() -> list[int]:
    return [2**k for k in range(13, 22)]  # 8k .. 2M


def handle(args) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (only checks that the plot extra is installed)
        except ImportError:
            print(PLOT_MISSING, file=sys.stderr)
            return 2
    model = resolve_model(args.model)
    gpu = resolve_gpu(None if args.gpu in (None, "auto") else args.gpu)
    fixed = parse_fix(args.fix) if args.fix else {}
    target = parse_seq_len(args.target_seqlen) if args.target_seqlen else None
    _positive("--jobs", args.jobs)
    setup = SweepSetup(model, gpu, _positive("--gpus", args.gpus), _positive("--gpus-per-node", args.gpus_per_node),
                       fixed, target, args.executor)
    if args.frontier:
        if args.knob not in (None, "seqlen"):
            raise UsageError("--frontier varies the sequence length; drop --knob or use --knob seqlen")
        seqs = parse_values("seqlen", args.values) if args.values else default_frontier_seq_lens()
        rows = frontier(setup, seqs, jobs=args.jobs)
        title = f"{model.name} on {setup.gpus or _DEFAULT_GPUS} x {gpu.name}: seq_len vs tokens/s per layout family"
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


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="vary one knob (cp, gpus, seqlen, gpu) or draw the seq_len vs tokens/s frontier",
        description="Vary one knob and report the longest sequence that fits, tokens/s/GPU, MFU and the memory "
                    "breakdown per point; or, with --frontier, the fastest plan of each layout family per seq_len.")
    parser.add_argument("--knob", choices=KNOBS, default=None)
    parser.add_argument("--values", default=None, help="comma-separated, e.g. 1,2,4,8 or 32k,128k,1M or h100,h200")
    parser.add_argument("--model", default=None, help="preset (default llama3-8b) or a Hugging Face config.json")
    parser.add_argument("--gpu", default=None, help="GPU preset (default h100-sxm-80gb)")
    parser.add_argument("--gpus", type=int_argument("--gpus"), default=None,
                        help="GPU count (default: one node of 8; for --knob cp with pinned degrees, their product)")
    parser.add_argument("--gpus-per-node", type=int_argument("--gpus-per-node"), default=None)
    parser.add_argument("--fix", default=None, help="pin knobs, e.g. dp_shard=8,tp=1")
    parser.add_argument("--target-seqlen", default=None,
                        help="report tokens/s and MFU at this length (default: each point's longest)")
    parser.add_argument("--executor", choices=["autoplan", "torchtitan"], default="autoplan")
    parser.add_argument("--frontier", action="store_true", help="seq_len vs tokens/s/GPU per layout family")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="draw the charts (needs autoplan[plot])")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the table/csv/json here")
    parser.add_argument("--jobs", type=int_argument("--jobs"), default=None, help="worker processes (default: CPUs, at most 8)")
    parser.set_defaults(func=handle)
