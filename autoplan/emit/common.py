"""What every launcher needs from a plan: node layout, a one-line summary, safe comments."""

from __future__ import annotations

import re

from ..errors import UsageError
from ..plan import Plan
from ..report.describe import describe_degrees
from ..units import format_tokens

PLAN_FILE = "plan.yaml"


def layout(plan: Plan) -> tuple[int, int]:
    """(nodes, GPUs per node) for the plan's world size and ``hardware.gpus_per_node``."""
    world = plan.parallelism.world_size
    per_node = plan.hardware.get("gpus_per_node") or world
    if not isinstance(per_node, int) or isinstance(per_node, bool) or per_node < 1:
        raise UsageError(f"plan hardware.gpus_per_node={per_node!r}: must be a positive integer")
    per_node = min(per_node, world)
    if world % per_node:
        raise UsageError(f"plan: {world} GPUs are not a whole number of nodes of {per_node} "
                         "(fix hardware.gpus_per_node)")
    return world // per_node, per_node


def one_line(text: object) -> str:
    """Text safe inside a shell or TOML comment: no newlines or other control characters."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", str(text)).strip()


def comment(text: object) -> str:
    return "# " + one_line(text)


def summary(plan: Plan) -> str:
    """'llama3-8b on 64 GPUs (8 nodes x 8): dp_replicate=1 dp_shard=4 cp=8 tp=2, seq_len 256k, ...'."""
    p = plan.parallelism
    nodes, per_node = layout(plan)
    return (f"{plan.model.get('name', 'model')} on {p.world_size} GPUs ({nodes} node{'s' if nodes > 1 else ''} "
            f"x {per_node}): {describe_degrees(p.to_spec())}, "
            f"seq_len {format_tokens(plan.seq_len)}, local_batch_size {plan.local_batch_size}, "
            f"grad_accum_steps {plan.grad_accum_steps}, ac {plan.describe_ac()}, cp_impl {plan.cp_impl}")


def rendezvous_args(nodes: int, per_node: int, endpoint: str, rdzv_id: str,
                    standalone: bool = True) -> list[str]:
    """torchrun flags: ``--standalone`` on one node (unless ``standalone`` is False), c10d
    rendezvous at ``endpoint`` otherwise.

    ``endpoint`` and ``rdzv_id`` are shell words (already quoted or variable references).
    """
    if nodes == 1 and standalone:
        return ["--standalone", f"--nproc-per-node={per_node}"]
    return [f"--nnodes={nodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}"]
