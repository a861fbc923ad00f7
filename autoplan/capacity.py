"""Capacity planning: the fewest GPUs (whole nodes; 1, 2 or 4 below one node) that
reach a target sequence length, its plan, and what neighbouring cluster sizes would give:
the fastest layout on each, tokens/s/GPU, MFU, and the time and GPU-hours to train a
token budget.

Time to train T tokens on N GPUs at r tokens/s/GPU is T / (r x N) seconds (every GPU
of a data-parallel x context-parallel x tensor-parallel layout contributes r: r is the
global tokens/s divided by N); GPU-hours = seconds x N / 3600 = T / (r x 3600), so more
GPUs save wall time and cost GPU-hours only as far as tokens/s/GPU falls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cost_models.executors import DEFAULT_EXECUTOR, EXECUTOR_PROFILES, ExecutorProfile
from cost_models.specs import GPUSpec, ModelSpec

from .errors import UsageError
from .planner import DEFAULT_MEMORY_HEADROOM, PlanRequest, PlanResult, make_plan
from .units import MemoryHeadroom

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
        """Flat dicts (one per GPU count) for CSV and JSON; ``autoplan.report.rows.read_rows``
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

    wanted: set[int | None] = {fewest}
    smaller = [v for v in valid if v < fewest]
    if smaller:
        wanted.add(smaller[-1])
    for k in range(1, neighbours + 1):
        wanted.add(snap(fewest / 2**k))
        if fewest * 2**k <= max_gpus:
            wanted.add(snap(fewest * 2**k))
    return sorted(c for c in wanted if c is not None)


def _row(result: PlanResult, count: int, per_node: int, target: int, train_tokens: int | None,
         fewest: bool) -> CapacityRow:
    if result.plan is None:
        note = result.explanation[0] if result.explanation else "no plan"
        return CapacityRow(count, count / per_node, False, "", "", target, 0.0, 0.0, 0.0, 0.0, None, None, fewest, note)
    predicted = result.plan.prediction
    rate = float(predicted.tokens_per_second_per_gpu)
    seconds, hours = time_to_train(train_tokens, rate, count) if train_tokens else (None, None)
    return CapacityRow(count, count / per_node, True, result.plan.describe_layout(), result.plan.describe_ac(),
                       target, rate, rate * count,
                       float(predicted.mfu), float(predicted.peak_memory_bytes), seconds, hours, fewest)


def capacity(model: ModelSpec, gpu: GPUSpec, target_seq_len: int, max_gpus: int, gpus_per_node: int | None = None,
             train_tokens: int | None = None, executor: ExecutorProfile = EXECUTOR_PROFILES[DEFAULT_EXECUTOR],
             neighbours: int = 2, memory_headroom: MemoryHeadroom = DEFAULT_MEMORY_HEADROOM) -> CapacityResult:
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
                           objective=objective, executor=executor, top_k=0, memory_headroom=memory_headroom)

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
