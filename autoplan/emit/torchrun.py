"""A bash launcher that runs ``runtime.train`` under torchrun, one node or many."""

from __future__ import annotations

from shlex import quote

from ..plan import Plan


def gpus_per_node(plan: Plan) -> int:
    world = plan.parallelism.world_size
    return min(world, int(plan.hardware.get("gpus_per_node") or world))


def torchrun_args(plan: Plan) -> list[str]:
    per_node = gpus_per_node(plan)
    nodes = max(1, plan.parallelism.world_size // per_node)
    if nodes == 1:
        return ["--standalone", f"--nproc-per-node={per_node}"]
    return [f"--nnodes={nodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
            '--rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}"', '--rdzv-id="${RDZV_ID}"']


def torchrun_script(plan: Plan, plan_path: str) -> str:
    p = plan.parallelism
    nodes = max(1, p.world_size // gpus_per_node(plan))
    lines = [
        "#!/usr/bin/env bash",
        f"# autoplan: {plan.model.get('name')} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} "
        f"cp={p.cp} tp={p.tp} seq_len={plan.seq_len}",
        "set -euo pipefail",
        'SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        f"PLAN={quote(plan_path)}",
        'case "${PLAN}" in /*) ;; *) PLAN="${SCRIPT_DIR}/${PLAN}" ;; esac',
    ]
    if nodes > 1:
        lines += [
            "# Run this on every node with the same MASTER_ADDR (the first node's address).",
            ': "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"',
            'MASTER_PORT="${MASTER_PORT:-29500}"',
            'RDZV_ID="${RDZV_ID:-autoplan}"',
        ]
    lines += [
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"',
        "torchrun " + " ".join(torchrun_args(plan)) + ' -m runtime.train --plan "${PLAN}" "$@"',
        "",
    ]
    return "\n".join(lines)
