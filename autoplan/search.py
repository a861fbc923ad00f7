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
from cost_models.config import DEFAULT_MESH_ORDER, MESH_DIMS, Parallelism, TrainConfig
from cost_models.rules import degree_violations, layout_violations
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec, SpecError

from .report.describe import describe_layout

DEFAULT_BATCHES = (1, 2, 4, 8)
# Larger local batches only add candidates once a micro-batch already holds this many
# tokens per GPU: matmuls are saturated and per-step overheads amortized well before.
MAX_BATCHED_TOKENS_PER_GPU = 32768
DEFAULT_CP_IMPLS: tuple[str, ...] = ("allgather-kv", "ring-allgather")


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

    def train_config(self) -> TrainConfig:
        if self.cfg is not None:
            return self.cfg
        return TrainConfig(self.parallelism, self.seq_len, self.local_batch_size, self.grad_accum_steps,
                           None, self.cp_impl, self.mesh_order)

    def describe(self) -> str:
        return describe_layout(self.parallelism, self.cp_impl, self.local_batch_size)


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
    for knob in MESH_DIMS:
        product *= int(fixed.get(knob, 1))
    if num_gpus % product:
        pins = ",".join(f"{k}={fixed[k]}" for k in MESH_DIMS if k in fixed)
        raise SpecError(f"--fix {pins}: the pinned degrees multiply to {product}, which does not divide "
                        f"--gpus {num_gpus}")
    tp = int(fixed.get("tp", 1))
    for name, value in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads), ("ffn_dim", model.ffn_dim)):
        if value % tp:
            raise SpecError(f"--fix tp={tp}: tp must divide the model's {name}={value}")
    if gpus_per_node and tp > gpus_per_node:
        raise SpecError(f"--fix tp={tp}: tensor parallel must stay inside a node of {gpus_per_node} GPUs")


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
            try:
                cfg = TrainConfig(par, seq_len, batch, accum, None, cp_impl, order0)
            except SpecError as error:
                rejections.append(Rejection(f"{what} seq={seq_len}", str(error)))
                continue
            reasons = layout_violations(model, cfg, cluster)
            if reasons:
                rejections.append(Rejection(f"{what} seq={seq_len}", "; ".join(reasons)))
                continue
            if orders is None:  # computed once per layout, and only for layouts that run
                orders = [order0] if "mesh_order" in fixed else mesh_orders(cluster, par)
            for order in orders:
                cfg_order = cfg if order == order0 else replace(cfg, mesh_order=order)
                out.append(Candidate(num_gpus, par, order, seq_len, batch, accum, cp_impl, cfg_order))
    return out


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
