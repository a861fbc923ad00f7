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
    # seq_len vs cp is checked when the TrainConfig is built (seq_len_violation).
    return reasons
