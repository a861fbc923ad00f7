"""The search space: every layout worth pricing, and why the others were dropped.

A candidate fixes everything but activation checkpointing (which the ILP chooses per
candidate): GPU count, degrees, mesh order, sequence length, local batch, gradient
accumulation and CP implementation. Rules that make a layout impossible are checked
here, before the solver, and each rejection keeps its reason for the explanation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Iterable

from cost_models.comm import group_tier
from cost_models.config import DEFAULT_MESH_ORDER, DEGREES, MESH_DIMS, Parallelism, Precision, TrainConfig
from cost_models.pipeline import bubble_fraction
from cost_models.rules import degree_violations, layout_violations
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec, SpecError

from .report.describe import describe_layout, describe_schedule

DEFAULT_BATCHES = (1, 2, 4, 8)
# Larger local batches only add candidates once a micro-batch already holds this many
# tokens per GPU: matmuls are saturated and per-step overheads amortized well before.
MAX_BATCHED_TOKENS_PER_GPU = 32768
DEFAULT_CP_IMPLS: tuple[str, ...] = ("allgather-kv", "ring-allgather")
DEFAULT_PRECISION = Precision()  # what TrainConfig defaults to
# Pipeline parallelism: the knobs, and what the planner tries when they are not pinned.
PP_KNOBS = ("pp_schedule", "pp_microbatches", "pp_virtual_stages")
MAX_PP = 16  # pp degrees tried unpinned: 2, 4, ... up to this (Llama 3 405B ran pp 16)
PP_MICROBATCH_FACTORS = (1, 2)  # micro-batches tried: pp x these (bubble (pp - 1) / m)
PP_SCHEDULE_OPTIONS = (("1f1b", 1), ("interleaved-1f1b", 2))  # GPipe: same time as 1F1B, more memory


@dataclass(frozen=True)
class Candidate:
    num_gpus: int
    parallelism: Parallelism
    mesh_order: tuple[str, ...]
    seq_len: int
    local_batch_size: int
    grad_accum_steps: int
    cp_impl: str
    cfg: TrainConfig | None = field(default=None, compare=False, repr=False)  # validated once, at search time
    pp_schedule: str = "1f1b"  # pp > 1 only
    pp_microbatches: int = 1
    pp_virtual_stages: int = 1

    def train_config(self) -> TrainConfig:
        if self.cfg is not None:
            return self.cfg
        return TrainConfig(self.parallelism, self.seq_len, self.local_batch_size, self.grad_accum_steps,
                           None, self.cp_impl, self.mesh_order, pp_schedule=self.pp_schedule,
                           pp_microbatches=self.pp_microbatches, pp_virtual_stages=self.pp_virtual_stages)

    @property
    def precision(self) -> Precision:
        """The config's precision, without building a config (``train_config`` uses the default)."""
        return self.cfg.precision if self.cfg is not None else DEFAULT_PRECISION

    def describe(self) -> str:
        text = describe_layout(self.parallelism, self.cp_impl, self.local_batch_size)
        if self.parallelism.pp > 1:
            text += " " + describe_schedule(self.pp_schedule, self.parallelism.pp, self.pp_microbatches,
                                            self.pp_virtual_stages)
        return text


@dataclass(frozen=True)
class Rejection:
    what: str
    reason: str
    count: int = 1  # layouts rejected for this reason (one row stands for all degrees sharing a bad tp)


@dataclass
class SearchSpace:
    candidates: list[Candidate] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def check_pins(model: ModelSpec, num_gpus: int, fixed: dict[str, Any], gpus_per_node: int | None = None) -> None:
    """Pinned degrees that can never work are a usage error, not an empty search."""
    product = 1
    for knob in DEGREES:
        product *= int(fixed.get(knob, 1))
    if num_gpus % product:
        pins = ",".join(f"{k}={fixed[k]}" for k in DEGREES if k in fixed)
        raise SpecError(f"--fix {pins}: the pinned degrees multiply to {product}, which does not divide "
                        f"--gpus {num_gpus}")
    tp = int(fixed.get("tp", 1))
    for name, value in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads), ("ffn_dim", model.ffn_dim)):
        if value % tp:
            raise SpecError(f"--fix tp={tp}: tp must divide the model's {name}={value}")
    if gpus_per_node and tp > gpus_per_node:
        raise SpecError(f"--fix tp={tp}: tensor parallel must stay inside a node of {gpus_per_node} GPUs")
    pp = int(fixed.get("pp", 1))
    virtual = int(fixed.get("pp_virtual_stages", 1))
    if pp > 1 and pp * virtual > model.n_layers:
        raise SpecError(f"--fix pp={pp}" + (f",pp_virtual_stages={virtual}" if virtual > 1 else "")
                        + f": {pp * virtual} pipeline stages exceed the model's {model.n_layers} layers")
    if pp > 1 and model.tie_embeddings:
        raise SpecError(f"--fix pp={pp}: the model ties its embeddings; the runtime pipelines only untied models")
    if pp == 1 and any(k in fixed for k in PP_KNOBS):
        raise SpecError(f"--fix {','.join(k for k in PP_KNOBS if k in fixed)}: pipeline knobs need --fix pp=N (N > 1)")


def prime_factors(n: int) -> dict[int, int]:
    """{prime: exponent} of ``n`` >= 1, by trial division up to sqrt(n) (GPU counts are
    at most ~1e9 or so: 3e4 trial divisors at worst, far fewer for the usual 2^a 3^b 5^c)."""
    factors: dict[int, int] = {}
    p = 2
    while p * p <= n:
        while n % p == 0:
            factors[p] = factors.get(p, 0) + 1
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        factors[n] = factors.get(n, 0) + 1
    return factors


@lru_cache(maxsize=4096)
def _divisors(n: int) -> tuple[int, ...]:
    found = [1]
    for prime, exponent in prime_factors(n).items():
        found = [d * prime**k for d in found for k in range(exponent + 1)]
    return tuple(sorted(found))


def divisors(n: int) -> list[int]:
    """Every divisor of ``n`` >= 1, ascending (from its prime factorization)."""
    return list(_divisors(n))


def factorizations(num_gpus: int) -> Iterable[tuple[int, int, int, int]]:
    """Every (dp_replicate, dp_shard, cp, tp) whose product is ``num_gpus``."""
    for dp_replicate in divisors(num_gpus):
        rest = num_gpus // dp_replicate
        for tp in divisors(rest):
            rest2 = rest // tp
            for cp in divisors(rest2):
                yield dp_replicate, rest2 // cp, cp, tp


def mesh_orders(cluster: ClusterSpec, par: Parallelism) -> list[tuple[str, ...]]:
    """Orders that differ in where groups land (NVLink or network); one per pattern.

    dp_replicate stays outermost (it carries the least traffic: one all-reduce of a
    grad shard per step). The default order (tp innermost, then cp, then dp_shard) is
    tried first so ties resolve to the conventional layout.
    """
    seen: dict[tuple[str, ...], tuple[str, ...]] = {}
    inner = ("dp_shard", "cp", "tp")
    for perm in [DEFAULT_MESH_ORDER[1:]] + [p for p in itertools.permutations(inner) if p != DEFAULT_MESH_ORDER[1:]]:
        order = ("dp_replicate",) + tuple(perm)
        signature = tuple(group_tier(cluster, par, order, dims)
                          for dims in (("tp",), ("cp",), ("dp_shard", "cp"), ("dp_replicate",)))
        seen.setdefault(signature, order)
    return list(seen.values())


def power_of_two_grid(low: int, high: int) -> list[int]:
    """Sequence lengths to try for max-seqlen: powers of two and 1.5x steps between."""
    values = set()
    length = 1024
    while length <= high:
        for value in (length, length * 3 // 2):
            if low <= value <= high:
                values.add(value)
        length *= 2
    return sorted(values)


@dataclass(frozen=True)
class Layout:
    """Degrees that pass every rule that does not depend on the sequence length."""
    num_gpus: int
    parallelism: Parallelism
    cluster: ClusterSpec = field(compare=False)
    cp_impls: tuple[str, ...] = field(compare=False)
    batches: tuple[int, ...] = field(compare=False)


def layouts(model: ModelSpec, gpu: GPUSpec, num_gpus: int, gpus_per_node: int | None = None,
            fixed: dict[str, Any] | None = None, batches: Iterable[int] = DEFAULT_BATCHES
            ) -> tuple[list[Layout], list[Rejection]]:
    """Every (dp_replicate, dp_shard, cp, tp) on ``num_gpus`` that the pins allow and the
    degree rules accept (rejections keep their reasons), with its CP implementations and
    local batches to try. Remembered per input: max-seqlen and the plan ask twice."""
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (fixed or {}).items()))
    found, rejections = _layouts(model, gpu, num_gpus, gpus_per_node, frozen, tuple(batches))
    return list(found), list(rejections)


@lru_cache(maxsize=64)
def _layouts(model: ModelSpec, gpu: GPUSpec, num_gpus: int, gpus_per_node: int | None, frozen: tuple,
             batches: tuple[int, ...]) -> tuple[tuple[Layout, ...], tuple[Rejection, ...]]:
    fixed = dict(frozen)
    found: list[Layout] = []
    rejections: list[Rejection] = []
    try:
        cluster = ClusterSpec(gpu, num_gpus, gpus_per_node)
    except SpecError as error:
        return (), (Rejection(f"{num_gpus} GPUs", str(error)),)
    batch_options = (fixed["local_batch_size"],) if "local_batch_size" in fixed else batches
    # tp's rules (heads, node size) do not depend on the other degrees: checked once per tp
    bad_tp = {tp: "; ".join(reasons) for tp in divisors(num_gpus)
              if (reasons := degree_violations(model, Parallelism(1, num_gpus // tp, 1, tp), cluster))}
    bad_tp_count: dict[int, int] = {}
    for degrees in factorizations(num_gpus):
        if any(k in fixed and fixed[k] != v for k, v in zip(("dp_replicate", "dp_shard", "cp", "tp"), degrees)):
            continue  # the user pinned another value: not a rejection worth listing
        if degrees[3] in bad_tp:
            bad_tp_count[degrees[3]] = bad_tp_count.get(degrees[3], 0) + 1
            continue
        par = Parallelism(*degrees)
        what = f"{num_gpus} GPUs dp_rep={degrees[0]} dp_shard={degrees[1]} cp={degrees[2]} tp={degrees[3]}"
        if par.dp_replicate > 1 and par.dp_replicate > cluster.num_nodes and "dp_replicate" not in fixed:
            # Replicating inside a node only adds memory: FSDP over NVLink is cheap.
            rejections.append(Rejection(what, "dp_replicate > number of nodes (replicate across nodes only)"))
            continue
        cp_impls = ((fixed["cp_impl"],) if "cp_impl" in fixed else DEFAULT_CP_IMPLS) if par.cp > 1 else ("none",)
        found.append(Layout(num_gpus, par, cluster, cp_impls, batch_options))
    for tp, count in bad_tp_count.items():
        rejections.append(Rejection(f"{num_gpus} GPUs tp={tp} ({count} layouts)", bad_tp[tp], count))
    return tuple(found), tuple(rejections)


def build_search_space(model: ModelSpec, gpu: GPUSpec, gpu_counts: Iterable[int], seq_lens: Iterable[int],
                       gpus_per_node: int | None = None, fixed: dict[str, Any] | None = None,
                       global_batch_tokens: int | None = None,
                       batches: Iterable[int] = DEFAULT_BATCHES) -> SearchSpace:
    fixed = dict(fixed or {})
    space = SearchSpace()
    seq_lens = sorted(set(seq_lens))
    if int(fixed.get("pp", 1)) > 1:  # pinned pipeline: only pp candidates
        for num_gpus in sorted(set(gpu_counts)):
            for seq_len in seq_lens:
                found_pp, rejected = pipeline_candidates(model, gpu, num_gpus, seq_len, gpus_per_node, fixed,
                                                         global_batch_tokens, batches)
                space.candidates += found_pp
                space.rejections += rejected
        return space
    for num_gpus in sorted(set(gpu_counts)):
        found, rejections = layouts(model, gpu, num_gpus, gpus_per_node, fixed, batches)
        space.rejections += rejections
        for layout in found:
            for seq_len in seq_lens:
                space.candidates += expand(model, layout, seq_len, fixed, global_batch_tokens, space.rejections)
    return space


def expand(model: ModelSpec, layout: Layout, seq_len: int, fixed: dict[str, Any],
           global_batch_tokens: int | None, rejections: list[Rejection]) -> list[Candidate]:
    """The candidates of one layout at one sequence length (batches, CP implementations,
    mesh orders); what cannot run at this length joins ``rejections``."""
    par, cluster, num_gpus = layout.parallelism, layout.cluster, layout.num_gpus
    what = f"{num_gpus} GPUs dp_rep={par.dp_replicate} dp_shard={par.dp_shard} cp={par.cp} tp={par.tp}"
    out: list[Candidate] = []
    orders: list[tuple[str, ...]] | None = None
    for batch in layout.batches:
        if batch > 1 and "local_batch_size" not in fixed and global_batch_tokens is None \
                and batch * seq_len // par.cp > MAX_BATCHED_TOKENS_PER_GPU:
            continue
        accum = _grad_accum(seq_len, batch, par, global_batch_tokens, fixed)
        if isinstance(accum, str):
            rejections.append(Rejection(f"{what} seq={seq_len} b={batch}", accum))
            continue
        for cp_impl in layout.cp_impls:
            order0 = tuple(fixed["mesh_order"]) if "mesh_order" in fixed else DEFAULT_MESH_ORDER
            cfg = _valid_config(model, cluster, f"{what} seq={seq_len}", rejections,
                                par, seq_len, batch, accum, None, cp_impl, order0)
            if cfg is None:
                continue
            if orders is None:  # computed once per layout, and only for layouts that run
                orders = [order0] if "mesh_order" in fixed else mesh_orders(cluster, par)
            for order in orders:
                cfg_order = cfg if order == order0 else replace(cfg, mesh_order=order)
                out.append(Candidate(num_gpus, par, order, seq_len, batch, accum, cp_impl, cfg_order))
    return out


def _valid_config(model: ModelSpec, cluster: ClusterSpec, what: str, rejections: list[Rejection],
                  *args: Any, **kwargs: Any) -> TrainConfig | None:
    """``TrainConfig(*args, **kwargs)`` when it builds and breaks no layout rule; otherwise
    None, with the reason appended to ``rejections`` under ``what``."""
    try:
        cfg = TrainConfig(*args, **kwargs)
    except SpecError as error:
        rejections.append(Rejection(what, str(error)))
        return None
    reasons = layout_violations(model, cfg, cluster)
    if reasons:
        rejections.append(Rejection(what, "; ".join(reasons)))
        return None
    return cfg


def _grad_accum(seq_len: int, batch: int, par: Parallelism, global_batch_tokens: int | None,
                fixed: dict[str, Any]) -> int | str:
    """Gradient accumulation steps to reach the global batch, or why it cannot."""
    per_step = seq_len * batch * par.dp_degree
    if global_batch_tokens is None:
        return int(fixed.get("grad_accum_steps", 1))
    if global_batch_tokens % per_step:
        return (f"global batch {global_batch_tokens} tokens is not a multiple of seq_len x local_batch x dp = "
                f"{per_step}")
    accum = global_batch_tokens // per_step
    if "grad_accum_steps" in fixed and fixed["grad_accum_steps"] != accum:
        return f"grad_accum_steps={fixed['grad_accum_steps']} but the global batch needs {accum}"
    return accum


def pipeline_candidates(model: ModelSpec, gpu: GPUSpec, num_gpus: int, seq_len: int, gpus_per_node: int | None,
                        fixed: dict[str, Any], global_batch_tokens: int | None,
                        batches: Iterable[int] = DEFAULT_BATCHES) -> tuple[list[Candidate], list[Rejection]]:
    """pp > 1 candidates: pp (pinned, else the divisors of the GPU count up to MAX_PP), the
    inner degrees over the remaining GPUs (dp_replicate 1 unless pinned), schedules 1F1B and
    interleaved (2 virtual stages), micro-batches pp x PP_MICROBATCH_FACTORS of ``batches``
    sequences each (local batch = micro-batches x sequences; a pinned local batch is kept),
    CP all-gather-K/V (the runtime's only CP under a schedule); pp is the outermost mesh
    dim, the inner order the default unless pinned."""
    out: list[Candidate] = []
    rejections: list[Rejection] = []
    try:
        cluster = ClusterSpec(gpu, num_gpus, gpus_per_node)
    except SpecError as error:
        return [], [Rejection(f"{num_gpus} GPUs", str(error))]
    if "pp" in fixed:
        pps = [int(fixed["pp"])] if int(fixed["pp"]) > 1 and num_gpus % int(fixed["pp"]) == 0 else []
    else:
        pps = [d for d in divisors(num_gpus) if 1 < d <= min(MAX_PP, model.n_layers)]
    if "pp_schedule" in fixed:
        virtual = int(fixed.get("pp_virtual_stages", 2 if fixed["pp_schedule"] == "interleaved-1f1b" else 1))
        schedules = [(fixed["pp_schedule"], virtual)]
    elif "pp_virtual_stages" in fixed:
        virtual = int(fixed["pp_virtual_stages"])
        schedules = [("interleaved-1f1b" if virtual > 1 else "1f1b", virtual)]
    else:
        schedules = list(PP_SCHEDULE_OPTIONS)
    for pp in pps:
        for degrees in factorizations(num_gpus // pp):
            if any(k in fixed and fixed[k] != v for k, v in zip(MESH_DIMS, degrees)):
                continue
            if degrees[0] > 1 and "dp_replicate" not in fixed:
                continue  # HSDP inside a pipeline: not tried unpinned
            par = Parallelism(*degrees, pp)
            what = f"{num_gpus} GPUs {describe_layout(par, 'allgather-kv', 1).rsplit(' b=', 1)[0]}"
            reasons = degree_violations(model, par, cluster)
            if reasons:
                rejections.append(Rejection(what, "; ".join(reasons)))
                continue
            # Sequences per micro-batch: as pp = 1 tries local batches (more only while a
            # micro-batch holds under MAX_BATCHED_TOKENS_PER_GPU tokens per GPU).
            micro_seqs: list[int | None] = [None] if "local_batch_size" in fixed else [
                b for b in batches if b == 1 or b * seq_len // par.cp <= MAX_BATCHED_TOKENS_PER_GPU]
            cp_impl = fixed.get("cp_impl", "allgather-kv") if par.cp > 1 else "none"
            order = tuple(fixed["mesh_order"]) if "mesh_order" in fixed else DEFAULT_MESH_ORDER
            for schedule, virtual in schedules:
                if "pp_microbatches" in fixed:
                    counts = [int(fixed["pp_microbatches"])]
                else:
                    counts = [pp * f for f in PP_MICROBATCH_FACTORS]
                for m in counts:
                    for per_micro in micro_seqs:
                        batch = int(fixed["local_batch_size"]) if per_micro is None else m * per_micro
                        accum = _grad_accum(seq_len, batch, par, global_batch_tokens, fixed)
                        if isinstance(accum, str):
                            rejections.append(Rejection(f"{what} seq={seq_len} b={batch}", accum))
                            continue
                        cfg = _valid_config(model, cluster, f"{what} seq={seq_len}", rejections,
                                            par, seq_len, batch, accum, None, cp_impl, order, pp_schedule=schedule,
                                            pp_microbatches=m, pp_virtual_stages=virtual)
                        if cfg is None:
                            continue
                        out.append(Candidate(num_gpus, par, order, seq_len, batch, accum, cp_impl, cfg,
                                             schedule, m, virtual))
    return out, rejections


def min_bubble_factor(candidates: Iterable[Candidate]) -> float:
    """The smallest ``1 + bubble`` any of these pipeline candidates can have."""
    return min((1 / (1 - bubble_fraction(c.parallelism.pp, c.pp_microbatches, c.pp_virtual_stages))
                for c in candidates), default=float("inf"))
