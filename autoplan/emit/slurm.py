"""An sbatch script: one torchrun per node through srun, rendezvous on the first node.

sbatch runs a copy of the script from its spool folder, so neither the script's own
location nor the submit folder says where the plan is: the script carries the plan's
absolute path and its sha256, and refuses to launch when the file is missing or is not
the plan it was written for. Submit it from anywhere: ``sbatch slurm.sbatch
[runtime.train options]``. Cluster-specific NCCL settings (NCCL_IB_DISABLE,
NCCL_SOCKET_IFNAME, ...) are left unset.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from shlex import quote

from ..errors import UsageError
from ..plan import Plan
from .common import comment, layout, rendezvous_args, summary

_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # sbatch --time forms: M, M:S, H:M:S, D-H, D-H:M:S
_MEM = re.compile(r"^\d+[KMGT]?$")  # sbatch --mem: a size, 0 = all of the node's memory
_NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")  # partitions (comma-separated) and accounts


@dataclass(frozen=True)
class SlurmOptions:
    """sbatch settings a site chooses; the defaults suit whole-node GPU training."""
    time_limit: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    exclusive: bool = True
    mem: str = "0"
    cpus_per_task: int | None = None

    def check(self) -> None:
        if not _TIME.match(self.time_limit):
            raise UsageError(f"--time {self.time_limit!r}: use sbatch's forms, e.g. 24:00:00 or 2-00:00:00")
        if not _MEM.match(self.mem):
            raise UsageError(f"--mem {self.mem!r}: a size such as 0 (all of the node's), 500G or 512000M")
        for flag, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None and not _NAME.match(value):
                raise UsageError(f"{flag} {value!r}: letters, digits, '_', '.', '-' and ',' only")
        if self.cpus_per_task is not None and (not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1):
            raise UsageError(f"--cpus-per-task {self.cpus_per_task!r}: must be a positive integer")


def job_name(plan: Plan) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"autoplan-{plan.model.get('name', 'model')}")
    return re.sub(r"-{2,}", "-", name).strip("-")[:64]


def slurm_script(plan: Plan, plan_path: str, plan_sha256: str, options: SlurmOptions | None = None,
                 **overrides) -> str:
    """The sbatch script for the plan file at ``plan_path`` (made absolute) whose bytes hash
    to ``plan_sha256``. ``cpus_per_task`` defaults to 8 per GPU; OMP threads = CPUs per GPU."""
    options = options or SlurmOptions(**overrides)
    options.check()
    nodes, per_node = layout(plan)
    cpus = options.cpus_per_task or 8 * per_node
    plan_file = os.path.abspath(plan_path)
    # c10d rendezvous even on one node: the job's own port keeps jobs sharing a node apart.
    launcher = rendezvous_args(nodes, per_node, '"${MASTER_ADDR}:${MASTER_PORT}"', '"${SLURM_JOB_ID}"',
                               standalone=False)
    directives = [f"--job-name={job_name(plan)}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={per_node}", f"--cpus-per-task={cpus}", f"--time={options.time_limit}",
                  f"--mem={options.mem}"]
    directives += [f"--partition={options.partition}"] if options.partition else []
    directives += [f"--account={options.account}"] if options.account else []
    directives += ["--exclusive"] if options.exclusive else []
    directives.append("--output=%x-%j.out")
    refuse = 'echo "slurm.sbatch: ${PLAN}: {}; re-run autoplan emit for the plan to train" >&2; exit 2'
    return "\n".join([
        "#!/usr/bin/env bash",
        *(f"#SBATCH {d}" for d in directives),
        comment(f"autoplan: {summary(plan)}"),
        "# Submit from any folder: sbatch slurm.sbatch [runtime.train options]",
        "set -euo pipefail",
        f"PLAN={quote(plan_file)}",
        f"PLAN_SHA256={plan_sha256}",
        '[[ -f "${PLAN}" ]] || { ' + refuse.replace("{}", "not found") + "; }",
        'if [[ "$(sha256sum "${PLAN}" | cut -d " " -f 1)" != "${PLAN_SHA256}" ]]; then',
        "    " + refuse.replace("{}", "changed since this script was written (sha256 differs)"),
        "fi",
        # '|| true': head may close the pipe before scontrol is done (SIGPIPE under pipefail).
        'MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1 || true)"',
        ': "${MASTER_ADDR:?could not read the first node from SLURM_JOB_NODELIST}"',
        # A port per job, so jobs that share a node do not collide.
        'MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"',
        "export MASTER_ADDR MASTER_PORT",
        f"export OMP_NUM_THREADS={max(1, cpus // per_node)}",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "# NCCL_IB_DISABLE, NCCL_SOCKET_IFNAME, NCCL_IB_HCA: cluster-specific, left to the site's defaults.",
        "srun --kill-on-bad-exit=1 torchrun " + " ".join(launcher) + " \\",
        '    -m runtime.train --plan "${PLAN}" "$@"',
        "",
    ])
