"""``autoplan capacity``: the fewest GPUs (whole nodes; 1, 2 or 4 below one node) that
reach a target sequence length, its plan, and what neighbouring cluster sizes would give:
the fastest layout on each, tokens/s/GPU, MFU, and the time and GPU-hours to train a
token budget.

Time to train T tokens on N GPUs at r tokens/s/GPU is T / (r x N) seconds (every GPU
of a data-parallel x context-parallel x tensor-parallel layout contributes r: r is the
global tokens/s divided by N); GPU-hours = seconds x N / 3600 = T / (r x 3600), so more
GPUs save wall time and cost GPU-hours only as far as tokens/s/GPU falls.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields

from cost_models.executors import resolve_executor
from cost_models.specs import GPUSpec, ModelSpec, resolve_gpu, resolve_model

from .errors import UsageError
from .planner import PlanRequest, PlanResult, make_plan
from .units import format_duration, format_tokens, int_argument, parse_seq_len, parse_train_tokens

DEFAULT_MAX_GPUS = 4096


@dataclass
class CapacityRow:
    gpus: int
    nodes: float  # GPUs / gpus_per_node (a fraction below one node)
    fits: bool
    layout: str  # the fastest layout at the target on this many GPUs ('' when none fits)
    ac: str
    seq_len: int  # the target
    tokens_per_second_per_gpu: float
    global_tokens_per_second: float
    mfu: float
    peak_memory_bytes: float
    time_to_train_s: float | None  # None without a token budget or without a plan
    gpu_hours: float | None
    fewest: bool = False
    note: str = ""  # why nothing fits on this count


@dataclass
class CapacityResult:
    fewest_gpus: int | None  # None: the target does not fit on max_gpus or fewer
    plan: PlanResult  # the min-gpus plan (its .plan is None when nothing fits)
    rows: list[CapacityRow]  # the answer and its neighbours, by GPU count
    target_seq_len: int = 0
    max_gpus: int = 0
    gpus_per_node: int = 0
    train_tokens: int | None = None

    def to_rows(self) -> list[dict]:
        """Flat dicts (one per GPU count) for CSV and JSON; ``autoplan.sweep.read_rows``
        reads them back equal."""
        return [asdict(r) for r in self.rows]


def time_to_train(train_tokens: float, tokens_per_second_per_gpu: float, gpus: int) -> tuple[float, float]:
    """(seconds, GPU-hours) to train ``train_tokens`` on ``gpus`` GPUs."""
    seconds = train_tokens / (tokens_per_second_per_gpu * gpus)
    return seconds, seconds * gpus / 3600


def valid_gpu_counts(max_gpus: int, gpus_per_node: int) -> list[int]:
    """GPU counts capacity planning considers: 1, 2, 4 below one node, then whole nodes."""
    counts = [n for n in (1, 2, 4) if n < gpus_per_node and n <= max_gpus]
    return counts + list(range(gpus_per_node, max_gpus + 1, gpus_per_node))


def neighbour_counts(fewest: int, max_gpus: int, gpus_per_node: int, neighbours: int = 2) -> list[int]:
    """The answer, one step fewer (one node fewer, or the next sub-node count), and the
    counts / 2, / 4 ... and x 2, x 4 ... (``neighbours`` of each), snapped down to counts
    that are valid (whole nodes, or 1/2/4 below a node), within 1..max_gpus."""
    valid = valid_gpu_counts(max(max_gpus, fewest), gpus_per_node)

    def snap(count: float) -> int | None:
        below = [v for v in valid if v <= count]
        return below[-1] if below else None

    wanted = {fewest}
    smaller = [v for v in valid if v < fewest]
    if smaller:
        wanted.add(smaller[-1])
    for k in range(1, neighbours + 1):
        wanted.add(snap(fewest / 2**k))
        if fewest * 2**k <= max_gpus:
            wanted.add(snap(fewest * 2**k))
    return sorted(c for c in wanted if c is not None)


def _layout(result: PlanResult) -> str:
    p = result.plan.parallelism
    text = f"dp_rep={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}"
    if p.cp > 1:
        text += f" {result.plan.cp_impl}"
    return text + f" b={result.plan.local_batch_size}"


def _row(result: PlanResult, count: int, per_node: int, target: int, train_tokens: int | None,
         fewest: bool) -> CapacityRow:
    if result.plan is None:
        note = result.explanation[0] if result.explanation else "no plan"
        return CapacityRow(count, count / per_node, False, "", "", target, 0.0, 0.0, 0.0, 0.0, None, None, fewest, note)
    predicted = result.plan.predicted
    rate = float(predicted.tokens_per_second_per_gpu)
    seconds, hours = time_to_train(train_tokens, rate, count) if train_tokens else (None, None)
    doc = result.plan.activation_checkpoint
    ac = doc.mode if doc.mode != "mixed" or not doc.layers else " + ".join(
        f"{doc.layers.count(m)} {m}" for m in ("full", "selective", "none") if m in doc.layers)
    return CapacityRow(count, count / per_node, True, _layout(result), ac, target, rate, rate * count,
                       float(predicted.mfu), float(predicted.peak_memory_bytes), seconds, hours, fewest)


def capacity(model: ModelSpec, gpu: GPUSpec, target_seq_len: int, max_gpus: int, gpus_per_node: int | None = None,
             train_tokens: int | None = None, executor: str = "autoplan", neighbours: int = 2) -> CapacityResult:
    """The fewest GPUs (whole nodes, or 1/2/4 below one node) on which some layout fits
    ``target_seq_len`` (make_plan, objective min-gpus, up to ``max_gpus``), its plan, and
    the fastest plan on neighbouring counts (throughput objective)."""
    if max_gpus <= 0:
        raise UsageError(f"--max-gpus {max_gpus}: must be a positive integer")
    if train_tokens is not None and train_tokens <= 0:
        raise UsageError(f"--train-tokens {train_tokens}: must be positive")
    per_node = gpus_per_node or gpu.gpus_per_node
    if per_node <= 0:
        raise UsageError(f"--gpus-per-node {per_node}: must be a positive integer")

    def request(count: int, objective: str, node: int) -> PlanRequest:
        return PlanRequest(model=model, gpu=gpu, num_gpus=count, gpus_per_node=node, target_seq_len=target_seq_len,
                           objective=objective, executor=executor, top_k=0)

    # min-gpus steps through 1, 2, 4 and whole nodes of per_node up to max_gpus
    first = make_plan(request(max_gpus, "min-gpus", per_node))
    result = CapacityResult(None, first, [], target_seq_len, max_gpus, per_node, train_tokens)
    if first.plan is None:
        return result
    fewest = first.plan.hardware["num_gpus"]
    result.fewest_gpus = fewest
    for count in neighbour_counts(fewest, max_gpus, per_node, neighbours):
        # min-gpus already returns the fastest plan on its count; the others are solved for throughput
        planned = first if count == fewest else make_plan(request(count, "throughput", min(per_node, count)))
        result.rows.append(_row(planned, count, per_node, target_seq_len, train_tokens, count == fewest))
    return result


# ------------------------------------------------------------------------------ output


def _budget(tokens: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6)):
        if tokens >= size:
            return f"{tokens / size:g}{unit}"
    return str(tokens)


def _duration(seconds: float) -> str:
    years = seconds / (365.25 * 86400)
    return f"{years:,.1f} years" if years >= 1 else format_duration(seconds)


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
             f"plan: {result.plan.explanation[0].split(': ', 1)[-1]}", ""]
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
        if budget:
            line += f"{_duration(row.time_to_train_s):>16}{row.gpu_hours:>13,.0f}"
        lines.append(line + ("   <- fewest" if row.fewest else ""))
    lines.append("")
    lines.append("predicted by the cost model (tokens/s/GPU at the target; time = tokens / (tokens/s/GPU x GPUs))")
    return "\n".join(lines)


def handle(args) -> int:
    model = resolve_model(args.model)
    gpu = resolve_gpu(None if args.gpu in (None, "auto") else args.gpu)
    target = parse_seq_len(args.target_seqlen)
    budget = parse_train_tokens(args.train_tokens) if args.train_tokens else None
    resolve_executor(args.executor)
    if args.gpus_per_node is not None and args.gpus_per_node <= 0:
        raise UsageError(f"--gpus-per-node {args.gpus_per_node}: must be a positive integer")
    result = capacity(model, gpu, target, args.max_gpus, args.gpus_per_node, budget, args.executor)
    if args.format == "json":
        print(json.dumps({"model": model.name, "gpu": gpu.name, "target_seq_len": target, "max_gpus": args.max_gpus,
                          "gpus_per_node": result.gpus_per_node, "train_tokens": budget,
                          "fewest_gpus": result.fewest_gpus,
                          "plan": result.plan.plan.model_dump(mode="json") if result.plan.plan else None,
                          "explanation": result.plan.explanation, "rows": result.to_rows()}, indent=2))
    elif args.format == "csv":
        from .sweep import rows_to_csv
        text = rows_to_csv(result.to_rows())
        print(text or ",".join(f.name for f in fields(CapacityRow)), end="" if text else "\n")
    else:
        print(format_capacity(result, model, gpu))
    if result.fewest_gpus is None and args.format != "table":
        print(f"autoplan capacity: seq_len {format_tokens(target)} does not fit on {args.max_gpus} GPUs or fewer",
              file=sys.stderr)
    return 0 if result.fewest_gpus else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "capacity", help="fewest GPUs for a target sequence length, and neighbouring cluster sizes",
        description="The fewest GPUs (whole nodes) on which some layout fits --target-seqlen, its plan, and the "
                    "fastest plan, tokens/s/GPU, MFU, time and GPU-hours to train --train-tokens on neighbouring "
                    "GPU counts. Exit code 1 when nothing up to --max-gpus fits.")
    parser.add_argument("--model", default=None, help="preset (default llama3-8b) or a Hugging Face config.json")
    parser.add_argument("--target-seqlen", required=True, help="e.g. 256k, 1M, 262144 (k = 1024)")
    parser.add_argument("--gpu", default=None, help="GPU preset (default h100-sxm-80gb)")
    parser.add_argument("--max-gpus", type=int_argument("--max-gpus"), default=DEFAULT_MAX_GPUS,
                        help=f"largest cluster to consider (default {DEFAULT_MAX_GPUS})")
    parser.add_argument("--gpus-per-node", type=int_argument("--gpus-per-node"), default=None,
                        help="default: the GPU preset's node size")
    parser.add_argument("--train-tokens", default=None, help="token budget for time-to-train, e.g. 1T, 300B (decimal)")
    parser.add_argument("--executor", choices=["autoplan", "torchtitan"], default="autoplan")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.set_defaults(func=handle)
