"""An sbatch script: one torchrun per node via srun, rendezvous on the first node."""

from __future__ import annotations

import re
from shlex import quote

from ..plan import Plan
from .torchrun import gpus_per_node


def slurm_script(plan: Plan, plan_path: str, time_limit: str = "24:00:00", cpus_per_task: int = 32) -> str:
    p = plan.parallelism
    per_node = gpus_per_node(plan)
    nodes = max(1, p.world_size // per_node)
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"autoplan-{plan.model.get('name', 'model')}")
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --output=%x-%j.out",
        f"# autoplan: dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp} "
        f"seq_len={plan.seq_len} local_batch_size={plan.local_batch_size}",
        "set -euo pipefail",
        f"PLAN={quote(plan_path)}",
        'MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"',
        'MASTER_PORT="${MASTER_PORT:-29500}"',
        "export MASTER_ADDR MASTER_PORT",
        "export OMP_NUM_THREADS=8",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "export NCCL_DEBUG=WARN",
        f"srun --kill-on-bad-exit=1 torchrun --nnodes={nodes} --nproc-per-node={per_node} \\",
        '    --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}" \\',
        '    -m runtime.train --plan "${PLAN}" "$@"',
        "",
    ])
