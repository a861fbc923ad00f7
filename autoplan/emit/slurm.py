"""An sbatch script: one torchrun per node through srun, rendezvous on the first node.

Submit it from the folder that holds the plan (``sbatch slurm.sbatch [runtime.train
options]``): sbatch runs a copy of the script, so paths are taken from the submit folder.
Cluster-specific NCCL settings (NCCL_IB_DISABLE, NCCL_SOCKET_IFNAME, ...) are left unset.
"""

from __future__ import annotations

import re
from shlex import quote

from ..errors import UsageError
from ..plan import Plan
from .common import PLAN_FILE, comment, layout, rendezvous_args, summary

_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # sbatch --time forms: M, M:S, H:M:S, D-H, D-H:M:S


def job_name(plan: Plan) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"autoplan-{plan.model.get('name', 'model')}")
    return re.sub(r"-{2,}", "-", name).strip("-")[:64]


def slurm_script(plan: Plan, plan_path: str | None = None, time_limit: str = "24:00:00",
                 cpus_per_task: int | None = None) -> str:
    """The sbatch script. ``cpus_per_task`` defaults to 8 per GPU; OMP threads = CPUs per GPU."""
    nodes, per_node = layout(plan)
    if not _TIME.match(time_limit):
        raise UsageError(f"--time {time_limit!r}: use sbatch's forms, e.g. 24:00:00 or 2-00:00:00")
    cpus = cpus_per_task or 8 * per_node
    if not isinstance(cpus, int) or cpus < 1:
        raise UsageError(f"--cpus-per-task {cpus!r}: must be a positive integer")
    # c10d rendezvous even on one node: the job's own port keeps jobs sharing a node apart.
    launcher = rendezvous_args(nodes, per_node, '"${MASTER_ADDR}:${MASTER_PORT}"', '"${SLURM_JOB_ID}"',
                               standalone=False)
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={job_name(plan)}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --output=%x-%j.out",
        comment(f"autoplan: {summary(plan)}"),
        "# Submit from the folder that holds the plan: sbatch slurm.sbatch [runtime.train options]",
        "set -euo pipefail",
        f"PLAN={quote(str(plan_path or PLAN_FILE))}",
        'case "${PLAN}" in /*) ;; *) PLAN="${SLURM_SUBMIT_DIR:-${PWD}}/${PLAN}" ;; esac',
        # '|| true': head may close the pipe before scontrol is done (SIGPIPE under pipefail).
        'MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1 || true)"',
        ': "${MASTER_ADDR:?could not read the first node from SLURM_JOB_NODELIST}"',
        # A port per job, so jobs that share a node do not collide.
        'MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"',
        "export MASTER_ADDR MASTER_PORT",
        f"export OMP_NUM_THREADS={max(1, cpus // per_node)}",
        "export NCCL_ASYNC_ERROR_HANDLING=1  # torch < 2.2 name",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "# NCCL_IB_DISABLE, NCCL_SOCKET_IFNAME, NCCL_IB_HCA: cluster-specific, left to the site's defaults.",
        "srun --kill-on-bad-exit=1 torchrun " + " ".join(launcher) + " \\",
        '    -m runtime.train --plan "${PLAN}" "$@"',
        "",
    ])
