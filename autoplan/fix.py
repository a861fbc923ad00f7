"""``--fix dp_shard=8,cp=2,tp=1,...``: pin knobs of the plan; the planner optimizes the rest."""

from __future__ import annotations

from typing import Any

from cost_models.config import AC_MODES, CP_IMPLS, MESH_DIMS

from .errors import UsageError
from .units import parse_seq_len

INT_KNOBS = ("dp_replicate", "dp_shard", "cp", "tp", "pp", "local_batch_size", "grad_accum_steps")
KNOBS = INT_KNOBS + ("cp_impl", "ac", "mesh_order", "seq_len")


def parse_fix(text: str) -> dict[str, Any]:
    fixed: dict[str, Any] = {}
    for item in [part.strip() for part in str(text).split(",") if part.strip()]:
        if "=" not in item:
            raise UsageError(f"--fix {item!r}: expected knob=value, e.g. tp=8")
        knob, value = (s.strip() for s in item.split("=", 1))
        if knob not in KNOBS:
            raise UsageError(f"--fix {knob!r}: unknown knob; use one of {', '.join(KNOBS)}")
        if knob in INT_KNOBS:
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"--fix {knob}={value!r}: must be a positive integer")
            fixed[knob] = int(value)
            if knob == "pp" and fixed[knob] != 1:
                raise UsageError("--fix pp: only pp=1 is supported (pipeline parallelism is not modeled yet)")
        elif knob == "cp_impl":
            if value not in CP_IMPLS:
                raise UsageError(f"--fix cp_impl={value!r}: use one of {', '.join(CP_IMPLS)}")
            fixed[knob] = value
        elif knob == "ac":
            if value not in AC_MODES:
                raise UsageError(f"--fix ac={value!r}: use one of {', '.join(AC_MODES)}")
            fixed[knob] = value
        elif knob == "seq_len":
            fixed[knob] = parse_seq_len(value, flag="--fix seq_len")
        else:  # mesh_order
            order = tuple(s.strip() for s in value.replace(">", "/").split("/"))
            if sorted(order) != sorted(MESH_DIMS):
                raise UsageError(f"--fix mesh_order={value!r}: name each of {'/'.join(MESH_DIMS)} once, "
                                 "outermost first, separated by /")
            fixed[knob] = order
    fixed.pop("pp", None)
    return fixed
