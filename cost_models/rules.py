"""Structural rules a layout must satisfy to run at all, each with a readable reason.

The planner rejects violating layouts before its solver and keeps the reason for the
explanation; the cost model refuses to price them.
"""

from __future__ import annotations

from .config import TrainConfig
from .specs import ClusterSpec, ModelSpec


def layout_violations(model: ModelSpec, cfg: TrainConfig, cluster: ClusterSpec | None = None) -> list[str]:
    """Reasons this layout cannot run (empty when it can)."""
    par = cfg.parallelism
    reasons = []
    if par.tp > 1:
        if model.n_heads % par.tp:
            reasons.append(f"tp={par.tp} does not divide n_heads={model.n_heads}")
        if model.n_kv_heads % par.tp:
            reasons.append(f"tp={par.tp} does not divide n_kv_heads={model.n_kv_heads}")
        if model.ffn_dim % par.tp:
            reasons.append(f"tp={par.tp} does not divide ffn_dim={model.ffn_dim}")
        if cluster is not None and par.tp > cluster.gpus_per_node:
            reasons.append(f"tp={par.tp} spans more than one node ({cluster.gpus_per_node} GPUs per node)")
        if cfg.tokens_per_gpu % par.tp:
            reasons.append(f"tokens per GPU {cfg.tokens_per_gpu} not divisible by tp={par.tp} (sequence parallel)")
    if par.cp > 1 and cfg.seq_len % (2 * par.cp):
        reasons.append(f"seq_len={cfg.seq_len} not divisible by 2 x cp={2 * par.cp} (load balancing)")
    if cluster is not None and par.world_size != cluster.num_gpus:
        reasons.append(f"degrees multiply to {par.world_size}, cluster has {cluster.num_gpus} GPUs")
    return reasons
