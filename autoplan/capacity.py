"""``autoplan capacity``: the fewest GPUs (whole nodes) that reach a target sequence
length, and what neighbouring cluster sizes would give (throughput, time and GPU-hours
to train a token budget)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from cost_models.executors import resolve_executor
from cost_models.specs import GPUSpec, ModelSpec, SpecError, resolve_gpu, resolve_model

from .planner import PlanRequest, PlanResult, make_plan
from .units import format_duration, format_tokens, parse_seq_len, parse_train_tokens


@dataclass
class CapacityRow:
    gpus: int
    layout: str
    seq_len: int
    tokens_per_second_per_gpu: float
    mfu: float
    peak_memory_gib: float
    time_to_train_s: float | None
    gpu_hours: float | None
    fewest: bool = False


@dataclass
class CapacityResult:
    fewest_gpus: int | None
    plan: PlanResult
    rows: list[CapacityRow]

    def to_rows(self) -> list[dict]:
        return [asdict(r) for r in self.rows]


def _layout(result: PlanResult) -> str:
    p = result.plan.parallelism
    return f"dp_rep={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}"


def capacity(model: ModelSpec, gpu: GPUSpec, target_seq_len: int, max_gpus: int, gpus_per_node: int | None = None,
             train_tokens: int | None = None, executor: str = "autoplan", neighbours: int = 2) -> CapacityResult:
    per_node = gpus_per_node or gpu.gpus_per_node
    first = make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=max_gpus, gpus_per_node=per_node,
                                  target_seq_len=target_seq_len, objective="min-gpus", executor=executor, top_k=0))
    if first.plan is None:
        return CapacityResult(None, first, [])
    fewest = first.plan.parallelism.world_size
    counts = [fewest]
    for k in range(1, neighbours + 1):
        if fewest * 2**k <= max_gpus:
            counts.append(fewest * 2**k)
    rows = []
    for count in counts:
        result = first if count == fewest else make_plan(PlanRequest(
            model=model, gpu=gpu, num_gpus=count, gpus_per_node=min(per_node, count), target_seq_len=target_seq_len,
            objective="throughput", executor=executor, top_k=0))
        if result.plan is None:
            continue
        est = result.estimate  # min-gpus already picks the fastest plan on its GPU count
        cluster_tokens_per_s = est.tokens_per_second_per_gpu * count
        seconds = train_tokens / cluster_tokens_per_s if train_tokens else None
        rows.append(CapacityRow(count, _layout(result), result.plan.seq_len, est.tokens_per_second_per_gpu, est.mfu,
                                est.peak_memory_bytes / 2**30, seconds,
                                seconds * count / 3600 if seconds is not None else None, count == fewest))
    return CapacityResult(fewest, first, rows)


def format_capacity(result: CapacityResult, model: ModelSpec, gpu: GPUSpec, target: int,
                    train_tokens: int | None) -> str:
    if result.fewest_gpus is None:
        return "\n".join([f"{model.name} at {format_tokens(target)} on {gpu.name}: no GPU count up to the limit fits"]
                         + [f"  {line}" for line in result.plan.explanation])
    lines = [f"{model.name} at {format_tokens(target)} tokens on {gpu.name}: fewest GPUs = {result.fewest_gpus}", ""]
    header = f"{'GPUs':>6}  {'layout':<34}{'tok/s/GPU':>10}{'MFU':>7}{'memory':>9}"
    if train_tokens:
        header += f"{'time for ' + _budget(train_tokens):>18}{'GPU-hours':>12}"
    lines.append(header)
    for row in result.rows:
        line = (f"{row.gpus:>6}  {row.layout:<34}{row.tokens_per_second_per_gpu:>10,.0f}{row.mfu * 100:>6.1f}%"
                f"{row.peak_memory_gib:>7.1f}Gi")
        if train_tokens:
            line += f"{format_duration(row.time_to_train_s):>18}{row.gpu_hours:>12,.0f}"
        lines.append(line + ("   <- fewest" if row.fewest else ""))
    return "\n".join(lines)


def _budget(tokens: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6)):
        if tokens >= size:
            return f"{tokens / size:g}{unit}"
    return str(tokens)


def handle(args) -> int:
    model = resolve_model(args.model)
    gpu = resolve_gpu(None if args.gpu in (None, "auto") else args.gpu)
    target = parse_seq_len(args.target_seqlen)
    budget = parse_train_tokens(args.train_tokens) if args.train_tokens else None
    resolve_executor(args.executor)
    if args.max_gpus <= 0:
        raise SpecError(f"--max-gpus {args.max_gpus}: must be positive")
    result = capacity(model, gpu, target, args.max_gpus, args.gpus_per_node, budget, args.executor)
    if args.format == "json":
        print(json.dumps({"fewest_gpus": result.fewest_gpus, "rows": result.to_rows()}, indent=2))
    elif args.format == "csv":
        from .sweep import rows_to_csv
        print(rows_to_csv(result.to_rows()), end="")
    else:
        print(format_capacity(result, model, gpu, target, budget))
    return 0 if result.fewest_gpus else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser("capacity", help="fewest GPUs for a target sequence length, and neighbours")
    parser.add_argument("--model", default=None)
    parser.add_argument("--target-seqlen", required=True)
    parser.add_argument("--gpu", default=None)
    parser.add_argument("--max-gpus", type=int, default=4096)
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--train-tokens", default=None, help="token budget, e.g. 1T (decimal)")
    parser.add_argument("--executor", default="autoplan")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.set_defaults(func=handle)
