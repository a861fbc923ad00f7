"""Capacity planning: the fewest GPUs (whole nodes; 1, 2 or 4 below one node) that
reach a target sequence length, its plan, and what neighbouring cluster sizes would give:
the fastest layout on each, tokens/s/GPU, MFU, and the time and GPU-hours to train a
token budget.

Time to train T tokens on N GPUs at r tokens/s/GPU is T / (r x N) seconds (every GPU
of a data-parallel x context-parallel x tensor-parallel layout contributes r: r is the
global tokens/s divided by N); GPU-hours = seconds x N / 3600 = T / (r x 3600), so more
GPUs save wall time and cost GPU-hours only as far as tokens/s/GPU falls.

Pipelines (pp > 1): the min-gpus search itself plans pp = 1 layouts; then every valid
count below its answer is planned again for pipelines alone (the throughput planner's
pipeline space, ``layout_filter`` pp > 1), and the first count where one fits, if any,
becomes the answer. On the answer's count the fastest pipeline is reported next to the
pp = 1 plan (``pipelined``) and the row shows the faster of the two; the neighbouring
rows are throughput plans, which price pipelines wherever they can win.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cost_models.executors import DEFAULT_EXECUTOR, EXECUTOR_PROFILES, ExecutorProfile
from cost_models.specs import GPUSpec, ModelSpec

from .errors import UsageError
from .planner import DEFAULT_MEMORY_HEADROOM, PlanRequest, PlanResult, make_plan, pipeline_fits
from .sweep import _run
from .units import MemoryHeadroom

DEFAULT_MAX_GPUS = 4096


@dataclass
class CapacityRow:
    gpus: int
    nodes: float  # GPUs / gpus_per_node (a fraction below one node)
    fits: bool
    layout: str  # the fastest layout at the target on this many GPUs ('' when none fits)
    pp: int  # its pipeline degree (1: no pipeline; 0 when none fits)
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
    fewest_gpus: int | None  # None: the target does not fit on max_gpus or fewer (pipelines included)
    plan: PlanResult  # the plan on fewest_gpus: min-gpus (pp = 1), or a pipeline where only one fits there
    rows: list[CapacityRow]  # the answer and its neighbours, by GPU count
    target_seq_len: int = 0
    max_gpus: int = 0
    gpus_per_node: int = 0
    train_tokens: int | None = None
    fewest_gpus_without_pp: int | None = None  # the min-gpus answer over pp = 1 layouts
    pipelined: PlanResult | None = None  # the fastest pipeline on fewest_gpus (.plan None: none fits)

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
        return CapacityRow(count, count / per_node, False, "", 0, "", target, 0.0, 0.0, 0.0, 0.0, None, None, fewest,
                           note)
    predicted = result.plan.prediction
    rate = float(predicted.tokens_per_second_per_gpu)
    seconds, hours = time_to_train(train_tokens, rate, count) if train_tokens else (None, None)
    return CapacityRow(count, count / per_node, True, result.plan.describe_layout(), result.plan.parallelism.pp,
                       result.plan.describe_ac(),
                       target, rate, rate * count,
                       float(predicted.mfu), float(predicted.peak_memory_bytes), seconds, hours, fewest)


def capacity(model: ModelSpec, gpu: GPUSpec, target_seq_len: int, max_gpus: int, gpus_per_node: int | None = None,
             train_tokens: int | None = None, executor: ExecutorProfile = EXECUTOR_PROFILES[DEFAULT_EXECUTOR],
             neighbours: int = 2, memory_headroom: MemoryHeadroom = DEFAULT_MEMORY_HEADROOM,
             jobs: int | None = None) -> CapacityResult:
    """The fewest GPUs (whole nodes, or 1/2/4 below one node) on which some layout fits
    ``target_seq_len`` (make_plan, objective min-gpus, up to ``max_gpus``), its plan, and
    the fastest plan on neighbouring counts (throughput objective); pipelines as the module
    says. ``jobs``: worker processes for the pipeline scan (None: up to 8; 1: this one)."""
    if max_gpus <= 0:
        raise UsageError(f"--max-gpus {max_gpus}: must be a positive integer")
    if train_tokens is not None and train_tokens <= 0:
        raise UsageError(f"--train-tokens {train_tokens}: must be positive")
    per_node = gpus_per_node or gpu.gpus_per_node
    if per_node <= 0:
        raise UsageError(f"--gpus-per-node {per_node}: must be a positive integer")

    def request(count: int, objective: str, node: int, only_pipelines: bool = False) -> PlanRequest:
        return PlanRequest(model=model, gpu=gpu, num_gpus=count, gpus_per_node=node, target_seq_len=target_seq_len,
                           objective=objective, executor=executor, top_k=0, memory_headroom=memory_headroom,
                           layout_filter=_pipelined if only_pipelines else None)

    def pipelines_on(count: int) -> PlanResult:
        return make_plan(request(count, "throughput", min(per_node, count), only_pipelines=True))

    # min-gpus steps through 1, 2, 4 and whole nodes of per_node up to max_gpus (pp = 1)
    first = make_plan(request(max_gpus, "min-gpus", per_node))
    without_pp = first.plan.hardware["num_gpus"] if first.plan is not None else None
    result = CapacityResult(None, first, [], target_seq_len, max_gpus, per_node, train_tokens, without_pp)
    # pipelines on the counts below that answer (no pp = 1 layout fits there); a pipeline
    # needs two ranks. Many counts are planned in worker processes (sweep's runner).
    below = [c for c in valid_gpu_counts(max_gpus, per_node) if c >= 2 and (without_pp is None or c < without_pp)]
    args = (model, gpu, target_seq_len, per_node, executor, memory_headroom)
    fits = _run([(_pipeline_fits, (*args, count)) for count in below], jobs)
    first_fit = next((count for count, fit in zip(below, fits) if fit["fits"]), None)
    if first_fit is not None:
        result.plan = result.pipelined = pipelines_on(first_fit)
    if result.plan.plan is None:
        return result
    fewest = result.plan.plan.hardware["num_gpus"]
    result.fewest_gpus = fewest
    if result.pipelined is None:
        result.pipelined = pipelines_on(fewest) if fewest >= 2 else None
    for count in neighbour_counts(fewest, max_gpus, per_node, neighbours):
        if count == fewest:  # the faster of the min-gpus plan and the fastest pipeline
            planned = result.plan
            if result.pipelined is not None and _rate(result.pipelined) > _rate(planned):
                planned = result.pipelined
        else:  # throughput plans price pipelines wherever they can win
            planned = make_plan(request(count, "throughput", min(per_node, count)))
        result.rows.append(_row(planned, count, per_node, target_seq_len, train_tokens, count == fewest))
    return result


def _pipeline_fits(model: ModelSpec, gpu: GPUSpec, target: int, per_node: int, executor: ExecutorProfile,
                   memory_headroom: MemoryHeadroom, count: int) -> dict:
    request = PlanRequest(model=model, gpu=gpu, num_gpus=count, gpus_per_node=min(per_node, count),
                          target_seq_len=target, objective="throughput", executor=executor, top_k=0,
                          memory_headroom=memory_headroom, layout_filter=_pipelined)
    return {"fits": pipeline_fits(request)}


def _pipelined(parallelism) -> bool:
    return parallelism.pp > 1


def _rate(result: PlanResult) -> float:
    return float(result.plan.prediction.tokens_per_second_per_gpu) if result.plan is not None else 0.0
