"""The search space: every layout worth pricing, and why the others were dropped.

A candidate fixes everything but activation checkpointing (which the ILP chooses per
candidate): GPU count, degrees, mesh order, sequence length, local batch, gradient
accumulation and CP implementation. Rules that make a layout impossible are checked
here, before the solver, and each rejection keeps its reason for the explanation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

from cost_models.comm import group_tier
from cost_models.config import DEFAULT_MESH_ORDER, MESH_DIMS, Parallelism, TrainConfig
from cost_models.rules import layout_violations
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec, SpecError

from .report.describe import describe_layout

DEFAULT_BATCHES = (1, 2, 4, 8)
# Larger local batches only add candidates once a micro-batch already holds this many
# tokens per GPU: matmuls are saturated and per-step overheads amortized well before.
MAX_BATCHED_TOKENS_PER_GPU = 32768
DEFAULT_CP_IMPLS = ("allgather-kv", "ring-allgather")


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


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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


def build_search_space(model: ModelSpec, gpu: GPUSpec, gpu_counts: Iterable[int], seq_lens: Iterable[int],
                       gpus_per_node: int | None = None, fixed: dict[str, Any] | None = None,
                       global_batch_tokens: int | None = None,
                       batches: Iterable[int] = DEFAULT_BATCHES) -> SearchSpace:
    fixed = dict(fixed or {})
    space = SearchSpace()
    seq_lens = sorted(set(seq_lens))
    for num_gpus in sorted(set(gpu_counts)):
        try:
            cluster = ClusterSpec(gpu, num_gpus, gpus_per_node)
        except SpecError as error:
            space.rejections.append(Rejection(f"{num_gpus} GPUs", str(error)))
            continue
        for degrees in factorizations(num_gpus):
            par = Parallelism(*degrees)
            what = f"{num_gpus} GPUs dp_rep={degrees[0]} dp_shard={degrees[1]} cp={degrees[2]} tp={degrees[3]}"
            mismatch = [k for k in MESH_DIMS if k in fixed and fixed[k] != par.degree(k)]
            if mismatch:
                continue  # the user pinned another value: not a rejection worth listing
            if par.dp_replicate > 1 and par.dp_replicate > cluster.num_nodes and "dp_replicate" not in fixed:
                # Replicating inside a node only adds memory: FSDP over NVLink is cheap.
                space.rejections.append(Rejection(what, "dp_replicate > number of nodes (replicate across nodes only)"))
                continue
            orders = [tuple(fixed["mesh_order"])] if "mesh_order" in fixed else mesh_orders(cluster, par)
            cp_impls = ([fixed["cp_impl"]] if "cp_impl" in fixed else list(DEFAULT_CP_IMPLS)) if par.cp > 1 else ["none"]
            batch_options = [fixed["local_batch_size"]] if "local_batch_size" in fixed else list(batches)
            for seq_len in seq_lens:
                for batch in batch_options:
                    if batch > 1 and "local_batch_size" not in fixed and global_batch_tokens is None \
                            and batch * seq_len // par.cp > MAX_BATCHED_TOKENS_PER_GPU:
                        continue
                    accum = _grad_accum(seq_len, batch, par, global_batch_tokens, fixed)
                    if isinstance(accum, str):
                        space.rejections.append(Rejection(f"{what} seq={seq_len} b={batch}", accum))
                        continue
                    for cp_impl in cp_impls:
                        for order in orders:
                            try:
                                cfg = TrainConfig(par, seq_len, batch, accum, None, cp_impl, order)
                            except SpecError as error:
                                space.rejections.append(Rejection(f"{what} seq={seq_len}", str(error)))
                                break
                            reasons = layout_violations(model, cfg, cluster)
                            if reasons:
                                space.rejections.append(Rejection(f"{what} seq={seq_len}", "; ".join(reasons)))
                                break
                            space.candidates.append(Candidate(num_gpus, par, order, seq_len, batch, accum, cp_impl, cfg))
    return space


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
