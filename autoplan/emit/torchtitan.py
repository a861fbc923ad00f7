"""Carry a plan into torchtitan's own configuration.

Two forms, with key names taken from torchtitan's released wheels (lists checked in
under autoplan/data/, verified by tests/test_emit.py):
- torchtitan 0.3 (PyPI 0.3.0): ``python -m torchtitan.train --module llama3 --config
  <registry fn>`` plus ``--parallelism.*`` / ``--training.*`` overrides and a tyro
  subcommand ``activation-checkpoint:{none,selective,full}``.
- the TOML job file of the 0.1 line (PyPI 0.1.0; sections [job], [model], [training],
  [parallelism], [activation_checkpoint]), the closest released form of the 2024 TOML.
"""

from __future__ import annotations

from shlex import quote

from ..plan import Plan
from .torchrun import gpus_per_node

ROTATE = {"ring-allgather": "allgather", "ring-alltoall": "alltoall", "allgather-kv": "allgather", "none": "allgather"}
FLAVORS = {"llama3-8b": "8B", "llama3-70b": "70B", "llama3.1-405b": "405B", "debug": "debugmodel"}
REGISTRY = {"llama3-8b": "llama3_8b", "llama3-70b": "llama3_70b", "llama3.1-405b": "llama3_405b",
            "debug": "llama3_debugmodel"}


def ac_mode(plan: Plan) -> tuple[str, str | None]:
    """torchtitan has no per-layer mix: the closest mode, and a note when it differs."""
    modes = set(plan.activation_checkpoint.layer_modes(plan.model_spec().n_layers))
    if len(modes) == 1:
        return next(iter(modes)), None
    closest = "full" if "full" in modes else "selective"
    return closest, (f"the plan mixes AC modes per layer ({sorted(modes)}); torchtitan applies one mode to "
                     f"every block, so this uses '{closest}' (more memory-safe, slower)")


def global_batch_size(plan: Plan) -> int:
    p = plan.parallelism
    return plan.local_batch_size * plan.grad_accum_steps * p.dp_replicate * p.dp_shard


def cli_overrides(plan: Plan) -> list[tuple[str, str]]:
    p = plan.parallelism
    return [
        ("--parallelism.data_parallel_replicate_degree", str(p.dp_replicate)),
        ("--parallelism.data_parallel_shard_degree", str(p.dp_shard)),
        ("--parallelism.tensor_parallel_degree", str(p.tp)),
        ("--parallelism.context_parallel_degree", str(p.cp)),
        ("--training.seq_len", str(plan.seq_len)),
        ("--training.local_batch_size", str(plan.local_batch_size)),
        ("--training.global_batch_size", str(global_batch_size(plan))),
        ("--training.mixed_precision_param", plan.precision.param_dtype),
        ("--training.mixed_precision_reduce", "float32"),
    ]


def launch_script_v03(plan: Plan) -> str:
    per_node = gpus_per_node(plan)
    nodes = max(1, plan.parallelism.world_size // per_node)
    name = plan.model.get("name", "")
    registry = REGISTRY.get(name, "llama3_8b")
    mode, note = ac_mode(plan)
    lines = ["#!/usr/bin/env bash",
             "# torchtitan 0.3: the plan's degrees, sequence and batch as CLI overrides.",
             "set -euo pipefail"]
    if name not in REGISTRY:
        lines.append(f"# model {quote(name)} has no torchtitan preset here: edit CONFIG to your registry entry.")
    if plan.cp_impl == "allgather-kv":
        lines.append("# cp_impl allgather-kv: torchtitan's context parallel is its own ring implementation.")
    if note:
        lines.append("# " + note)
    launcher = (f"torchrun --standalone --nproc-per-node={per_node}" if nodes == 1 else
                f"torchrun --nnodes={nodes} --nproc-per-node={per_node} --rdzv-backend=c10d "
                '--rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"')
    lines.append(f'CONFIG="${{CONFIG:-{registry}}}"')
    args = " \\\n    ".join(f"{key} {quote(value)}" for key, value in cli_overrides(plan))
    lines.append(f'{launcher} -m torchtitan.train --module llama3 --config "${{CONFIG}}" \\\n    {args} \\\n'
                 f'    "$@" activation-checkpoint:{mode}')
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_sections_v01(plan: Plan) -> dict[str, dict[str, object]]:
    p = plan.parallelism
    mode, _ = ac_mode(plan)
    name = plan.model.get("name", "")
    return {
        "job": {"description": f"autoplan plan for {name}", "dump_folder": "./outputs"},
        "model": {"name": "llama3", "flavor": FLAVORS.get(name, "8B")},
        "training": {"local_batch_size": plan.local_batch_size, "global_batch_size": global_batch_size(plan),
                     "seq_len": plan.seq_len, "max_norm": plan.optimizer.max_norm,
                     "mixed_precision_param": plan.precision.param_dtype, "mixed_precision_reduce": "float32"},
        "parallelism": {"data_parallel_replicate_degree": p.dp_replicate,
                        "data_parallel_shard_degree": p.dp_shard, "tensor_parallel_degree": p.tp,
                        "context_parallel_degree": p.cp,
                        "context_parallel_rotate_method": ROTATE[plan.cp_impl]},
        "activation_checkpoint": {"mode": mode, "selective_ac_option": "op"},
    }


def toml_v01(plan: Plan) -> str:
    _, note = ac_mode(plan)
    lines = ["# torchtitan 0.1 job file written by autoplan"]
    if note:
        lines.append("# " + note)
    for section, values in toml_sections_v01(plan).items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def torchtitan_files(plan: Plan) -> dict[str, str]:
    return {"torchtitan_v0.3.sh": launch_script_v03(plan), "torchtitan_v0.1.toml": toml_v01(plan)}
