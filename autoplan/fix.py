"""``--fix dp_shard=8,cp=2,tp=1,...``: pin knobs of the plan; the planner optimizes the rest.

Knobs are the plan's own field names:

============================  ====================================================
dp_replicate, dp_shard, cp,   mesh degrees (positive integers; pp > 1 is pipeline
tp, pp                        parallelism, the outermost mesh dim)
pp_schedule (schedule)        1f1b, gpipe, interleaved-1f1b (or interleaved)
pp_microbatches               micro-batches per local batch (>= pp, divides it)
(microbatches)
pp_virtual_stages (virtual)   model chunks per pp rank (>= 2: interleaved-1f1b)
local_batch_size,             positive integers
grad_accum_steps
seq_len                       a size: 64k, 1M, 262144 (k = 1024)
cp_impl                       none, allgather-kv, ring-allgather, ring-alltoall
ac                            none, selective, full (every layer)
mesh_order                    the four mesh dims, outermost first, joined by '/'
============================  ====================================================

Bad input raises ``UsageError`` naming the knob and what it accepts.
"""

from __future__ import annotations

from typing import Any

from cost_models.config import AC_MODES, CP_IMPLS, DEGREES, MESH_DIMS
from cost_models.rules import PP_SCHEDULES, seq_len_violation

from .errors import UsageError
from .units import parse_seq_len

INT_KNOBS = DEGREES + ("local_batch_size", "grad_accum_steps", "pp_microbatches", "pp_virtual_stages")
KNOBS = INT_KNOBS + ("cp_impl", "ac", "mesh_order", "seq_len", "pp_schedule")
# Short names of the pipeline knobs (the plan's field names work too).
ALIASES = {"schedule": "pp_schedule", "microbatches": "pp_microbatches", "virtual": "pp_virtual_stages"}


def _parse_value(knob: str, value: str) -> Any:
    if knob in INT_KNOBS:
        if not value.isascii() or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--fix {knob}={value!r}: must be a positive integer")
        return int(value)
    if knob == "pp_schedule":
        value = "interleaved-1f1b" if value == "interleaved" else value
        if value not in PP_SCHEDULES:
            raise UsageError(f"--fix pp_schedule={value!r}: use one of {', '.join(PP_SCHEDULES)}")
        return value
    if knob == "cp_impl":
        if value not in CP_IMPLS:
            raise UsageError(f"--fix cp_impl={value!r}: use one of {', '.join(CP_IMPLS)}")
        return value
    if knob == "ac":
        if value not in AC_MODES:
            raise UsageError(f"--fix ac={value!r}: use one of {', '.join(AC_MODES)}")
        return value
    if knob == "seq_len":
        return parse_seq_len(value, flag="--fix seq_len")
    # mesh_order: outermost first, '/' (or '>') between the dims.
    order = tuple(part.strip() for part in value.replace(">", "/").split("/"))
    if sorted(order) != sorted(MESH_DIMS):
        raise UsageError(f"--fix mesh_order={value!r}: name each of {', '.join(MESH_DIMS)} once, "
                         f"outermost first, separated by / (e.g. {'/'.join(MESH_DIMS)})")
    return order


def parse_fix(text: str) -> dict[str, Any]:
    """``'tp=8,cp=4,ac=full'`` -> ``{'tp': 8, 'cp': 4, 'ac': 'full'}``, every value validated.

    Integers become ``int``, ``seq_len`` a token count, ``mesh_order`` a tuple of dim names.
    ``pp=1`` is kept (it rules pipelines out); pipeline knobs need ``pp`` > 1 and must agree.
    """
    fixed: dict[str, Any] = {}
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        if "=" not in item:
            raise UsageError(f"--fix {item!r}: expected knob=value, e.g. tp=8 (knobs: {', '.join(KNOBS)})")
        knob, value = (part.strip() for part in item.split("=", 1))
        knob = ALIASES.get(knob, knob)
        if knob not in KNOBS:
            raise UsageError(f"--fix {knob!r}: unknown knob; use one of {', '.join(KNOBS)}")
        if knob in fixed:
            raise UsageError(f"--fix {knob}: given twice; pin each knob once")
        fixed[knob] = _parse_value(knob, value)
    cp = fixed.get("cp")
    if cp is not None and cp > 1 and fixed.get("cp_impl") == "none":
        raise UsageError(f"--fix cp={cp} with cp_impl=none: pick one of "
                         f"{', '.join(i for i in CP_IMPLS if i != 'none')}")
    violation = seq_len_violation(fixed["seq_len"], cp) if cp is not None and "seq_len" in fixed else None
    if violation:
        raise UsageError(f"--fix seq_len={fixed['seq_len']} with cp={cp}: {violation}")
    _check_pipeline_pins(fixed)
    return fixed


def _check_pipeline_pins(fixed: dict[str, Any]) -> None:
    pp = fixed.get("pp")
    knobs = [k for k in ("pp_schedule", "pp_microbatches", "pp_virtual_stages") if k in fixed]
    if knobs and pp is not None and pp == 1:
        raise UsageError(f"--fix pp=1 with {','.join(knobs)}: pipeline knobs need pp > 1")
    schedule, virtual = fixed.get("pp_schedule"), fixed.get("pp_virtual_stages")
    if schedule is not None and virtual is not None and (schedule == "interleaved-1f1b") != (virtual > 1):
        raise UsageError(f"--fix pp_schedule={schedule},pp_virtual_stages={virtual}: use virtual >= 2 with "
                         "interleaved-1f1b and 1 otherwise")
    micro = fixed.get("pp_microbatches")
    if micro is not None and pp is not None and micro < pp:
        raise UsageError(f"--fix pp_microbatches={micro} with pp={pp}: use at least pp micro-batches")
    batch = fixed.get("local_batch_size")
    if micro is not None and batch is not None and batch % micro:
        raise UsageError(f"--fix pp_microbatches={micro}: must divide local_batch_size={batch}")


def check_conflicts(fixed: dict[str, Any], target_seq_len: int | None = None, ac: str | None = None) -> None:
    """Pins that contradict another flag are a usage error, not a silent choice of one."""
    from .units import format_tokens

    if "seq_len" in fixed and target_seq_len is not None and fixed["seq_len"] != target_seq_len:
        raise UsageError(f"--fix seq_len={format_tokens(fixed['seq_len'])} and --target-seqlen "
                         f"{format_tokens(target_seq_len)} disagree: give one of them")
    if "ac" in fixed and ac not in (None, "auto") and fixed["ac"] != ac:
        raise UsageError(f"--fix ac={fixed['ac']} and --ac {ac} disagree: give one of them")
