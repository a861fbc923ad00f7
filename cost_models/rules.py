"""Structural rules a layout must satisfy to run at all, each with a readable reason.

This module owns every feasibility rule: the planner's search space, ``--fix`` pins,
``TrainConfig`` and the runtime all ask it. The planner rejects violating layouts before
its solver and keeps the reason for the explanation; the cost model refuses to price them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .specs import ClusterSpec, ModelSpec

if TYPE_CHECKING:
    from .config import Parallelism, TrainConfig


def seq_len_divisor(cp: int) -> int:
    """Sequence lengths must be multiples of this: 2 x cp chunks for head-tail load
    balancing (rank r holds chunks r and 2cp-1-r, so causal work is equal per rank)."""
    return 2 * cp if cp > 1 else 1


def seq_len_violation(seq_len: int, cp: int) -> str | None:
    """Why ``seq_len`` cannot be split over ``cp`` ranks (None when it can)."""
    divisor = seq_len_divisor(cp)
    if seq_len % divisor:
        return f"seq_len must be divisible by 2 x cp = {divisor} (head-tail load balancing); {seq_len} is not"
    return None


# PyTorch's schedules the runtime runs (runtime/pipeline.py), by their plan names.
PP_SCHEDULES = ("1f1b", "gpipe", "interleaved-1f1b")


def schedule_violation(pp: int, schedule: str, microbatches: int, virtual: int, local_batch_size: int) -> str | None:
    """Why this pipeline schedule cannot run the local batch (None when it can)."""
    if schedule not in PP_SCHEDULES:
        return f"pp_schedule={schedule!r}: use one of {', '.join(PP_SCHEDULES)}"
    if not isinstance(microbatches, int) or microbatches < 1 or not isinstance(virtual, int) or virtual < 1:
        return f"pp_microbatches={microbatches!r} and pp_virtual_stages={virtual!r} must be integers >= 1"
    if pp == 1:
        if microbatches != 1 or virtual != 1:
            return (f"pp_microbatches={microbatches}, pp_virtual_stages={virtual} with pp=1: micro-batches and "
                    "virtual stages belong to pipeline parallelism; leave them at 1 or set pp > 1")
        return None
    if (schedule == "interleaved-1f1b") != (virtual > 1):
        return (f"pp_virtual_stages={virtual} with pp_schedule {schedule!r}: use pp_virtual_stages >= 2 with "
                "interleaved-1f1b and 1 otherwise")
    if microbatches < pp:
        return (f"pp_microbatches={microbatches} < pp={pp}: every stage needs a micro-batch in flight "
                "(use at least pp micro-batches)")
    if local_batch_size % microbatches:
        return (f"pp_microbatches={microbatches} does not divide local_batch_size={local_batch_size} "
                "(each micro-batch holds whole sequences)")
    rounds = max(1, microbatches // pp)
    if schedule == "interleaved-1f1b" and microbatches % rounds:
        return (f"pp_microbatches={microbatches} with interleaved-1f1b on pp={pp}: must be a multiple of "
                f"{rounds} rounds (torch's Interleaved1F1B)")
    return None


def degree_product_violation(parallelism: Parallelism, num_gpus: int) -> str | None:
    if parallelism.world_size != num_gpus:
        return f"degrees multiply to {parallelism.world_size}, cluster has {num_gpus} GPUs"
    return None


def seq_len_multiple(parallelism: Parallelism, local_batch_size: int = 1) -> int:
    """The smallest step between runnable sequence lengths for this layout: a multiple of
    2 x cp (head-tail load balancing, ``seq_len_divisor``) whose tokens per GPU
    (batch x seq / cp) split over tp (sequence parallel, ``layout_violations``)."""
    divisor = seq_len_divisor(parallelism.cp)
    if parallelism.tp > 1:
        shard = parallelism.cp * parallelism.tp
        divisor = math.lcm(divisor, shard // math.gcd(shard, local_batch_size))
    return divisor


def degree_violations(model: ModelSpec, par: Parallelism, cluster: ClusterSpec | None = None) -> list[str]:
    """Reasons these degrees cannot run at any sequence length (empty when they can)."""
    reasons = []
    if par.tp > 1:
        if model.n_heads % par.tp:
            reasons.append(f"tp={par.tp} does not divide n_heads={model.n_heads}")
        if model.n_kv_heads % par.tp:
            reasons.append(f"tp={par.tp} does not divide n_kv_heads={model.n_kv_heads}")
        if model.ffn_dim % par.tp:
            reasons.append(f"tp={par.tp} does not divide ffn_dim={model.ffn_dim}")
        if cluster is not None and par.tp > cluster.ranks_per_node:
            reasons.append(f"tp={par.tp} spans more than one node ({cluster.gpus_per_node} GPUs per node)")
    if par.pp > 1:
        if par.pp > model.n_layers:
            reasons.append(f"pp={par.pp} exceeds n_layers={model.n_layers} (each stage needs a whole layer)")
        if model.tie_embeddings:
            reasons.append(f"pp={par.pp} with tied embeddings: the embedding (first stage) and output projection "
                           "(last stage) would live on different ranks")
    if cluster is not None:
        mismatch = degree_product_violation(par, cluster.num_gpus)
        if mismatch:
            reasons.append(mismatch)
    return reasons


def layout_violations(model: ModelSpec, cfg: TrainConfig, cluster: ClusterSpec | None = None) -> list[str]:
    """Reasons this layout cannot run (empty when it can)."""
    par = cfg.parallelism
    reasons = degree_violations(model, par, cluster)
    if par.tp > 1 and cfg.tokens_per_gpu % par.tp:
        reasons.append(f"tokens per GPU {cfg.tokens_per_gpu} not divisible by tp={par.tp} (sequence parallel)")
    if par.pp > 1:
        stages = par.pp * cfg.pp_virtual_stages
        if stages > model.n_layers:
            reasons.append(f"pp={par.pp} x pp_virtual_stages={cfg.pp_virtual_stages} = {stages} stages exceed "
                           f"n_layers={model.n_layers} (each stage needs a whole layer)")
        micro_tokens = cfg.tokens_per_gpu // cfg.pp_microbatches
        if par.tp > 1 and micro_tokens % par.tp:
            reasons.append(f"tokens per GPU per micro-batch {micro_tokens} not divisible by tp={par.tp} "
                           "(sequence parallel)")
        if par.cp > 1 and cfg.cp_impl not in ("allgather-kv", "none"):
            reasons.append(f"cp_impl={cfg.cp_impl} with pp={par.pp}: the ring runs inside context_parallel() around "
                           "one model's step, not a pipeline schedule (runtime); use allgather-kv")
    # seq_len vs cp is checked when the TrainConfig is built (seq_len_violation).
    return reasons
