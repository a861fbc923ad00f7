"""Carry a plan into torchtitan's own configuration, in two forms.

Key names come from torchtitan's released wheels (lists under autoplan/data/, made by
autoplan/data/torchtitan_keys.py and checked by tests/test_emit.py):

- torchtitan 0.3 (PyPI 0.3.0): ``torchrun ... -m torchtitan.train --module llama3
  --config <config_registry function>`` plus ``--parallelism.*`` / ``--training.*``
  overrides and the tyro subcommand ``activation-checkpoint:{none,selective,full}``.
- the TOML job file (``--job.config_file``) of the 0.1 line: sections [job], [model],
  [training], [parallelism], [activation_checkpoint], ... PyPI has no 2024 release with
  code (0.0.2, April 2024, is an empty placeholder), so 0.1.0 (June 2025) is the oldest
  TOML form that can be checked; it already moved the degrees from [training] /
  [experimental] into [parallelism].

What torchtitan cannot express is said in a comment beside the closest setting: the
per-layer AC mix, the all-gather-KV CP variant, the rotate method in 0.3, a mesh order
other than its fixed dp_replicate/dp_shard/cp/tp, bf16 gradient reduction.
"""

from __future__ import annotations

import json
from shlex import quote

from cost_models.config import DEFAULT_MESH_ORDER

from ..plan import Plan
from ..report.describe import describe_ac
from .common import comment, layout, rendezvous_args, summary

# cp_impl -> torchtitan's rotate method (0.1 context_parallel_rotate_method values).
ROTATE = {"ring-allgather": "allgather", "ring-alltoall": "alltoall", "allgather-kv": "allgather",
          "none": "allgather"}
# AC mode names are the same words in both versions: 0.1 mode = "none"|"selective"|"full",
# 0.3 subcommands activation-checkpoint:none|selective|full.
AC_NAMES = {"none": "none", "selective": "selective", "full": "full"}

# torchtitan's llama3 models by shape (dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab):
# 0.1 flavor and 0.3 config_registry function. ffn_dim follows torchtitan's rule
# multiple_of * ceil(ffn_dim_multiplier * 8 dim / 3 / multiple_of): 8B 1.3/1024 -> 14336,
# 70B 1.3/4096 -> 28672, 405B 1.2/4096 -> 53248; vocab is the Llama 3 tokenizer's 128256.
TORCHTITAN_LLAMA3 = (
    ((4096, 32, 32, 8, 14336, 128256), "8B", "llama3_8b"),
    ((8192, 80, 64, 8, 28672, 128256), "70B", "llama3_70b"),
    ((16384, 126, 128, 8, 53248, 128256), "405B", "llama3_405b"),
)


def torchtitan_model(plan: Plan) -> tuple[str, str] | None:
    """(0.1 flavor, 0.3 config function) of the torchtitan llama3 model with the plan's shape."""
    spec = plan.model_spec()
    shape = (spec.dim, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.ffn_dim, spec.vocab_size)
    for known, flavor, function in TORCHTITAN_LLAMA3:
        if shape == known:
            return flavor, function
    return None


def _shape(plan: Plan) -> str:
    spec = plan.model_spec()
    return (f"dim={spec.dim} n_layers={spec.n_layers} n_heads={spec.n_heads} n_kv_heads={spec.n_kv_heads} "
            f"ffn_dim={spec.ffn_dim} vocab={spec.vocab_size}")


def ac_mode(plan: Plan) -> tuple[str, str | None]:
    """torchtitan applies one AC mode to every block: the closest one, and a note when it differs."""
    layers = plan.activation_checkpoint.layer_modes(plan.model_spec().n_layers)
    modes = set(layers)
    if len(modes) == 1:
        return AC_NAMES[next(iter(modes))], None
    closest = "full" if "full" in modes else "selective"
    return closest, (f"the plan mixes AC modes per layer ({describe_ac(layers)}); torchtitan has no per-layer mix and "
                     f"applies one mode to every block: '{closest}' (priced as such in the line above)")


# pp_schedule -> torchtitan's pipeline_parallel_schedule (torch's get_schedule_class names).
PP_SCHEDULE_NAMES = {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved-1f1b": "Interleaved1F1B"}


def pipeline_layers_per_stage(plan: Plan) -> int | None:
    """torchtitan's ``pipeline_parallel_layers_per_stage`` that gives the plan's pp x v stages
    (torchtitan: stages = ceil((layers + first_less + last_less) / layers_per_stage); with
    both "less" settings 0 it then splits like runtime/pipeline.py: earlier stages take the
    remainder). None when no value gives exactly pp x v stages."""
    n_layers = plan.model_spec().n_layers
    stages = plan.parallelism.pp * plan.pp_virtual_stages
    per_stage = -(-n_layers // stages)
    return per_stage if -(-n_layers // per_stage) == stages else None


def pipeline_settings(plan: Plan, version: str = "0.3") -> dict[str, object]:
    """The plan's pipeline as torchtitan ParallelismConfig keys (both versions name them
    alike). 0.1 asserts a rigid fit of layers + 2 (embedding and output count as one layer
    each) when given layers per stage, so it gets none: its looped schedules then default
    to 2 stages per rank."""
    p = plan.parallelism
    if p.pp == 1:
        return {}
    settings: dict[str, object] = {
        "pipeline_parallel_degree": p.pp,
        "pipeline_parallel_schedule": PP_SCHEDULE_NAMES[plan.pp_schedule],
        # torchtitan counts sequences per micro-batch; the plan counts micro-batches.
        "pipeline_parallel_microbatch_size": plan.local_batch_size // plan.microbatches,
    }
    per_stage = pipeline_layers_per_stage(plan)
    if plan.pp_virtual_stages > 1 and per_stage is not None and version == "0.3":
        settings["pipeline_parallel_layers_per_stage"] = per_stage
    return settings


def global_batch_size(plan: Plan) -> int:
    """Sequences per optimizer step: local x grad accumulation x data-parallel ranks (not cp, not tp)."""
    p = plan.parallelism
    return plan.local_batch_size * plan.grad_accum_steps * p.dp_replicate * p.dp_shard


def notes(plan: Plan, version: str) -> list[str]:
    """What this torchtitan version cannot express exactly, one line each."""
    out = []
    _, ac_note = ac_mode(plan)
    if ac_note:
        out.append(ac_note)
    if plan.parallelism.cp > 1:
        if plan.cp_impl == "allgather-kv":
            out.append("cp_impl allgather-kv (all-gather K/V) has no torchtitan equivalent: torchtitan's SDPA "
                       "context parallel is a ring; its allgather rotation is the closest")
        if version == "0.3" and plan.cp_impl == "ring-alltoall":
            out.append("cp_impl ring-alltoall: torchtitan 0.3 has no rotate-method option and runs PyTorch's "
                       "default (allgather); alltoall needs torch.distributed.tensor.experimental._attention"
                       ".set_rotate_method('alltoall') in a custom entry point")
    if tuple(plan.mesh_order) != DEFAULT_MESH_ORDER:
        out.append(f"mesh_order {'/'.join(plan.mesh_order)}: torchtitan's mesh is always "
                   f"{'/'.join(DEFAULT_MESH_ORDER)} (outermost first), so groups may span other links than predicted")
    if plan.precision.reduce_dtype != "float32":
        out.append(f"precision.reduce_dtype {plan.precision.reduce_dtype}: torchtitan reduces gradients in "
                   "float32 only")
    if plan.parallelism.pp > 1:
        if version == "0.1":
            out.append("pipeline stages: torchtitan 0.1 counts the embedding and the output as one layer each when "
                       "it splits the model (no setting turns that off), so its stages differ from the plan's")
            if plan.pp_virtual_stages > 2:
                out.append(f"pp_virtual_stages={plan.pp_virtual_stages}: torchtitan 0.1 runs looped schedules with "
                           "2 stages per rank unless pipeline_parallel_layers_per_stage fits its rigid split")
        elif plan.pp_virtual_stages > 1 and pipeline_layers_per_stage(plan) is None:
            out.append(f"pp_virtual_stages={plan.pp_virtual_stages}: no pipeline_parallel_layers_per_stage gives "
                       f"{plan.parallelism.pp * plan.pp_virtual_stages} stages; torchtitan's default for looped "
                       "schedules is 2 stages per rank")
    if torchtitan_model(plan) is None:
        out.append(f"model {plan.model.get('name', '?')} ({_shape(plan)}) matches no torchtitan llama3 model: "
                   "add a flavor with this shape")
    return out


# ------------------------------------------------------------------------ torchtitan 0.3


def cli_overrides(plan: Plan) -> list[tuple[str, str]]:
    """``--section.key value`` pairs for torchtitan 0.3's tyro CLI."""
    p = plan.parallelism
    overrides = [
        ("--parallelism.data_parallel_replicate_degree", str(p.dp_replicate)),
        ("--parallelism.data_parallel_shard_degree", str(p.dp_shard)),
        ("--parallelism.tensor_parallel_degree", str(p.tp)),
        ("--parallelism.context_parallel_degree", str(p.cp)),
    ]
    overrides += [(f"--parallelism.{key}", str(value)) for key, value in pipeline_settings(plan).items()]
    if p.pp > 1:  # split like runtime/pipeline.py: no layer taken off the first and last stages
        overrides += [("--parallelism.pipeline_parallel_first_stage_less_layers", "0"),
                      ("--parallelism.pipeline_parallel_last_stage_less_layers", "0")]
    overrides += [
        ("--training.seq_len", str(plan.seq_len)),
        ("--training.local_batch_size", str(plan.local_batch_size)),
        ("--training.global_batch_size", str(global_batch_size(plan))),
        ("--training.mixed_precision_param", plan.precision.param_dtype),
        ("--training.mixed_precision_reduce", "float32"),
        ("--training.max_norm", repr(float(plan.optimizer.max_norm))),
        ("--lr_scheduler.warmup_steps", str(plan.optimizer.warmup_steps)),
    ]
    if plan.optimizer.total_steps:
        overrides.append(("--training.steps", str(plan.optimizer.total_steps)))
    return overrides


def launch_script_v03(plan: Plan) -> str:
    nodes, per_node = layout(plan)
    mode, _ = ac_mode(plan)
    model = torchtitan_model(plan)
    lines = ["#!/usr/bin/env bash",
             comment(f"autoplan: {summary(plan)}"),
             "# torchtitan 0.3: the plan's degrees, sequence, batch and AC as overrides of a llama3 config.",
             "# Usage: bash torchtitan_v0.3.sh [more torchtitan overrides, e.g. --training.steps 100]",
             "# The optimizer and data come from the --config function (edit CONFIG to choose another).",
             "set -euo pipefail"]
    lines += [comment(note) for note in fit_notes(plan) + notes(plan, "0.3")]
    if model is None:
        lines.append('CONFIG="${CONFIG:?set CONFIG to a torchtitan llama3 config_registry function for this model}"')
    else:
        lines.append(f'CONFIG="${{CONFIG:-{model[1]}}}"')
    if nodes > 1:
        lines += [f"# {nodes} nodes: run this script on each of them with the same MASTER_ADDR (the first node).",
                  ': "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"',
                  'MASTER_PORT="${MASTER_PORT:-29500}"',
                  'RDZV_ID="${RDZV_ID:-autoplan-torchtitan}"']
    launcher = rendezvous_args(nodes, per_node, '"${MASTER_ADDR}:${MASTER_PORT}"', '"${RDZV_ID}"')
    args = [f"{flag} {quote(value)}" for flag, value in cli_overrides(plan)]
    # tyro: the parent's flags (and the user's, "$@") before the subcommand that selects the AC policy.
    lines.append("exec torchrun " + " ".join(launcher) + ' -m torchtitan.train --module llama3 --config "${CONFIG}" \\')
    lines += [f"    {arg} \\" for arg in args]
    lines.append(f'    "$@" activation-checkpoint:{mode}')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ torchtitan 0.1 TOML


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    # A JSON string is a valid TOML basic string (same escapes: \" \\ \n \t \uXXXX).
    return json.dumps(str(value), ensure_ascii=False)


def toml_sections_v01(plan: Plan) -> dict[str, dict[str, object]]:
    p = plan.parallelism
    mode, _ = ac_mode(plan)
    model = torchtitan_model(plan)
    name = plan.model.get("name", "model")
    training: dict[str, object] = {
        "local_batch_size": plan.local_batch_size, "global_batch_size": global_batch_size(plan),
        "seq_len": plan.seq_len, "max_norm": float(plan.optimizer.max_norm),
        "mixed_precision_param": plan.precision.param_dtype, "mixed_precision_reduce": "float32"}
    if plan.optimizer.total_steps:
        training["steps"] = plan.optimizer.total_steps
    beta1, beta2 = plan.optimizer.betas
    return {
        "job": {"description": f"autoplan plan for {name}", "dump_folder": "./outputs"},
        "model": {"name": "llama3", "flavor": model[0] if model else "custom"},
        "optimizer": {"name": "AdamW", "lr": float(plan.optimizer.lr),
                      "weight_decay": float(plan.optimizer.weight_decay),
                      "beta1": float(beta1), "beta2": float(beta2)},
        "lr_scheduler": {"warmup_steps": plan.optimizer.warmup_steps},
        "training": training,
        "parallelism": {"data_parallel_replicate_degree": p.dp_replicate,
                        "data_parallel_shard_degree": p.dp_shard, "tensor_parallel_degree": p.tp,
                        "context_parallel_degree": p.cp,
                        "context_parallel_rotate_method": ROTATE[plan.cp_impl], **pipeline_settings(plan, "0.1")},
        # selective_ac_option "op": per-op selective AC, what the plan's 'selective' means.
        "activation_checkpoint": {"mode": mode, "selective_ac_option": "op"},
    }


def toml_v01(plan: Plan, file_name: str = "torchtitan_v0.1.toml") -> str:
    nodes, per_node = layout(plan)
    launcher = " ".join(rendezvous_args(nodes, per_node, "$MASTER_ADDR:$MASTER_PORT", "autoplan"))
    lines = ["# torchtitan 0.1 job file written by autoplan",
             comment(summary(plan)),
             f"# run: torchrun {launcher} -m torchtitan.train --job.config_file {file_name}"]
    lines += [comment(note) for note in fit_notes(plan) + notes(plan, "0.1")]
    layers = plan.activation_checkpoint.layer_modes(plan.model_spec().n_layers)
    n_full = layers.count("full")
    if set(layers) == {"full", "none"} and len(layers) % n_full == 0:
        lines.append(comment(f"alternative: mode = \"selective\" with selective_ac_option = "
                             f"\"{len(layers) // n_full}\" checkpoints one block in every {len(layers) // n_full} fully: "
                             f"as many full blocks ({n_full}) as the plan"))
    for section, values in toml_sections_v01(plan).items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def torchtitan_files(plan: Plan) -> dict[str, str]:
    return {"torchtitan_v0.3.sh": launch_script_v03(plan), "torchtitan_v0.1.toml": toml_v01(plan)}


def fit_notes(plan: Plan) -> list[str]:
    """What torchtitan needs for this layout by the torchtitan memory model (one line)."""
    from .torchtitan_fit import torchtitan_fit

    fit = torchtitan_fit(plan)
    return [fit.describe()] if fit is not None else ["not priced for torchtitan: the plan names no GPU"]
