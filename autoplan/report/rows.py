"""Rows of sweeps, frontiers and capacity answers, and calibration errors: tables, and
CSV and JSON that read back equal.

Rows are flat dicts with a fixed set of columns (``SWEEP_FIELDS`` / ``FRONTIER_FIELDS`` in
``autoplan.sweep``, ``CapacityRow`` in ``autoplan.capacity``), so CSV and JSON read back
to equal rows (``read_rows``).
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING

from cost_models.specs import GPUSpec, ModelSpec

from ..errors import UsageError
from ..units import format_duration, format_tokens

if TYPE_CHECKING:
    from ..capacity import CapacityResult

MEMORY_KEYS = ("params", "grads", "optimizer", "fsdp_unsharded", "activations", "recompute_working", "logits_loss",
               "comm_buffers", "overhead", "allocator_stranded", "allocator_cache")
_INT_FIELDS = {"gpus", "max_seq_len", "seq_len", "pp"}
_BOOL_FIELDS = {"fits", "fewest"}
_STR_FIELDS = {"knob", "gpu", "layout", "ac", "note", "family"}


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
        return format_sweep_table(rows)
    raise UsageError(f"--format {fmt!r}: use table, csv or json")


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f}"


def format_sweep_table(rows: list[dict]) -> str:
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
             "overhead": "other", "allocator_stranded": "strand", "allocator_cache": "cache"}
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



def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def error_table(errors: list) -> str:
    width = max([len("record")] + [len(e.label) for e in errors])
    lines = [f"  {'record':<{width}}  {'time before':>11}  {'time after':>10}  {'mem before':>10}  {'mem after':>9}"]
    for e in errors:
        lines.append(f"  {e.label:<{width}}  {_pct(e.step_time_before):>11}  {_pct(e.step_time_after):>10}  "
                     f"{_pct(e.memory_before):>10}  {_pct(e.memory_after):>9}")
    mean = lambda xs: sum(abs(x) for x in xs) / len(xs) if xs else None
    mem_b = [e.memory_before for e in errors if e.memory_before is not None]
    mem_a = [e.memory_after for e in errors if e.memory_after is not None]
    lines.append(f"  {'mean |error|':<{width}}  {_pct(mean([e.step_time_before for e in errors])).lstrip('+'):>11}  "
                 f"{_pct(mean([e.step_time_after for e in errors])).lstrip('+'):>10}  "
                 f"{_pct(mean(mem_b)).lstrip('+'):>10}  {_pct(mean(mem_a)).lstrip('+'):>9}")
    return "\n".join(lines)


def _budget(tokens: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6)):
        if tokens >= size:
            return f"{tokens / size:g}{unit}"
    return str(tokens)


def _duration(seconds: float) -> str:
    years = seconds / (365.25 * 86400)
    return f"{years:,.1f} years" if years >= 1 else format_duration(seconds)


def _pipeline_lines(result: CapacityResult) -> list[str]:
    """What pipelines (pp > 1) do for the answer: fewer GPUs than pp = 1 layouts need, or
    the fastest pipeline on the answer's count next to the plan's speed."""
    lines = []
    fewest, without = result.fewest_gpus, result.fewest_gpus_without_pp
    if without != fewest:
        lines.append(f"pipelines: fit on {fewest} GPUs; without one (pp=1) "
                     + (f"the fewest is {without}" if without else f"nothing fits on {result.max_gpus} or fewer"))
    elif result.pipelined is not None:
        piped = result.pipelined
        if piped.plan is None:
            reason = piped.explanation[0] if piped.explanation else "no pipeline fits"
            lines.append(f"pipelined alternative on {fewest} GPUs: none fits ({reason})")
        else:
            rate = float(piped.plan.prediction.tokens_per_second_per_gpu)
            mine = float(result.plan.plan.prediction.tokens_per_second_per_gpu) if result.plan.plan else 0.0
            lines.append(f"pipelined alternative on {fewest} GPUs: {piped.plan.describe_layout()}, "
                         f"{rate:,.0f} tokens/s/GPU ({'faster' if rate > mine else 'slower'} than pp=1's {mine:,.0f})")
    return lines


def format_capacity(result: CapacityResult, model: ModelSpec, gpu: GPUSpec) -> str:
    target, budget = format_tokens(result.target_seq_len), result.train_tokens
    if result.fewest_gpus is None:
        lines = [f"{model.name} at seq_len {target} on {gpu.name}: does not fit on {result.max_gpus} GPUs or fewer"]
        lines += [f"  {line}" for line in result.plan.explanation]
        lines.append(f"  try a larger --max-gpus (now {result.max_gpus}), a larger GPU, or a shorter --target-seqlen")
        return "\n".join(lines)
    nodes = result.fewest_gpus / result.gpus_per_node
    where = f"{nodes:g} node{'s' if nodes != 1 else ''} of {result.gpus_per_node}" if nodes >= 1 else "under one node"
    lines = [f"{model.name} at seq_len {target} on {gpu.name}: fewest GPUs = {result.fewest_gpus} ({where})",
             f"plan: {result.plan.explanation[0].split(': ', 1)[-1]}"]
    lines += _pipeline_lines(result)
    lines.append("")
    lw = max([len("layout")] + [len(r.layout) for r in result.rows]) + 2
    aw = max([len("AC")] + [len(r.ac) for r in result.rows]) + 2
    header = f"{'GPUs':>6}  {'layout':<{lw}}{'AC':<{aw}}{'tok/s/GPU':>10}{'MFU':>7}{'peak mem':>11}"
    if budget:
        header += f"{'time for ' + _budget(budget):>16}{'GPU-hours':>13}"
    lines.append(header)
    for row in result.rows:
        if not row.fits:
            lines.append(f"{row.gpus:>6}  does not fit: {row.note}")
            continue
        line = (f"{row.gpus:>6}  {row.layout:<{lw}}{row.ac:<{aw}}{row.tokens_per_second_per_gpu:>10,.0f}"
                f"{row.mfu * 100:>6.1f}%{row.peak_memory_bytes / 2**30:>7.1f} GiB")
        if budget and row.time_to_train_s is not None and row.gpu_hours is not None:
            line += f"{_duration(row.time_to_train_s):>16}{row.gpu_hours:>13,.0f}"
        lines.append(line + ("   <- fewest" if row.fewest else ""))
    lines.append("")
    lines.append("predicted by the cost model (tokens/s/GPU at the target; time = tokens / (tokens/s/GPU x GPUs))")
    return "\n".join(lines)
