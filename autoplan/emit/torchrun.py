"""A bash launcher that runs ``runtime.train`` under torchrun, on one node or many.

``torchrun ... -m runtime.train --plan PLAN`` starts ``python -m runtime.train --plan PLAN``
once per GPU. One node: ``--standalone``. Several: run the same script on every node
with MASTER_ADDR set to the first node's address; c10d rendezvous assigns node ranks.
"""

from __future__ import annotations

from shlex import quote

from ..plan import Plan
from .common import PLAN_FILE, comment, layout, rendezvous_args, summary


def gpus_per_node(plan: Plan) -> int:
    return layout(plan)[1]


def torchrun_args(plan: Plan) -> list[str]:
    """The torchrun flags (shell words) for the plan's layout."""
    nodes, per_node = layout(plan)
    return rendezvous_args(nodes, per_node, '"${MASTER_ADDR}:${MASTER_PORT}"', '"${RDZV_ID}"')


def plan_assignment(plan_path: str | None) -> str:
    """``PLAN=...``: beside the script when no path is given, else the path as given."""
    if plan_path is None:
        return f'PLAN="${{SCRIPT_DIR}}/{PLAN_FILE}"'
    return f"PLAN={quote(str(plan_path))}"


def torchrun_script(plan: Plan, plan_path: str | None = None) -> str:
    """The launcher; ``plan_path`` None means the plan is ``plan.yaml`` beside the script."""
    nodes, _ = layout(plan)
    lines = [
        "#!/usr/bin/env bash",
        comment(f"autoplan: {summary(plan)}"),
        "# Usage: bash torchrun.sh [runtime.train options, e.g. --steps 20 --metrics m.jsonl]",
        "set -euo pipefail",
    ]
    if plan_path is None:
        lines.append('SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"')
    lines.append(plan_assignment(plan_path))
    if nodes > 1:
        lines += [
            f"# {nodes} nodes: run this script on each of them with the same MASTER_ADDR (the first node).",
            ': "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"',
            'MASTER_PORT="${MASTER_PORT:-29500}"',
            'RDZV_ID="${RDZV_ID:-autoplan}"',
        ]
    lines += [
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"',
        "exec torchrun " + " ".join(torchrun_args(plan)) + ' -m runtime.train --plan "${PLAN}" "$@"',
        "",
    ]
    return "\n".join(lines)
