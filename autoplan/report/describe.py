"""One vocabulary for what a plan is: every printer (plan table, explanations, capacity,
sweep, launch-script headers, the cost report) describes layouts and activation
checkpointing with these functions, so the same plan reads the same everywhere."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cost_models.config import AC_MODES, Parallelism

# Layers are laid out full first, then selective, then none (ACPolicy.mix): the
# description follows that order.
AC_ORDER = ("full", "selective", "none")


def ac_counts(modes: Iterable[str] | Mapping[str, int]) -> dict[str, int]:
    """Layers per AC mode, in AC_ORDER, from per-layer modes or a {mode: count} map."""
    if isinstance(modes, Mapping):
        named = set(modes)
        counts = {m: int(modes.get(m, 0)) for m in AC_ORDER}
    else:
        layers = list(modes)
        named = set(layers)
        counts = {m: layers.count(m) for m in AC_ORDER}
    unknown = named - set(AC_MODES)
    if unknown:
        raise ValueError(f"activation checkpoint modes {sorted(unknown)}: use {', '.join(AC_MODES)}")
    return counts


def describe_ac(modes: Iterable[str] | Mapping[str, int]) -> str:
    """'full' when every layer uses one mode, else '20 full + 12 none'."""
    used = {m: n for m, n in ac_counts(modes).items() if n}
    if len(used) == 1:
        return next(iter(used))
    if not used:
        return "none"
    return " + ".join(f"{n} {m}" for m, n in used.items())


def describe_schedule(schedule: str, pp: int, microbatches: int, virtual: int) -> str:
    """'1f1b m=16 bubble 48%' / 'interleaved-1f1b v=2 m=32 bubble 19%' (bubble: the share of
    the schedule's time a rank idles, cost_models/pipeline.py)."""
    from cost_models.pipeline import bubble_fraction

    pp_virtual = f" v={virtual}" if virtual > 1 else ""
    return f"{schedule}{pp_virtual} m={microbatches} bubble {bubble_fraction(pp, microbatches, virtual):.0%}"


LAYOUT_FAMILIES = ("FSDP", "FSDP+CP", "FSDP+TP", "FSDP+TP+CP")


def layout_family(parallelism: Parallelism) -> str:
    """Which parallelisms beyond data parallel a layout uses: 'FSDP', 'FSDP+CP', 'FSDP+TP', 'FSDP+TP+CP'."""
    return "FSDP" + ("+TP" if parallelism.tp > 1 else "") + ("+CP" if parallelism.cp > 1 else "") \
        if not (parallelism.tp > 1 and parallelism.cp > 1) else "FSDP+TP+CP"


def describe_degrees(parallelism: Parallelism) -> str:
    """'dp_replicate=1 dp_shard=8 cp=4 tp=2' (pp appears once it is not 1)."""
    p = parallelism
    text = f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}"
    return text + (f" pp={p.pp}" if p.pp > 1 else "")


def describe_layout(parallelism: Parallelism, cp_impl: str, local_batch_size: int) -> str:
    """The short form used in tables and alternatives: 'dp_rep=1 dp_shard=8 cp=4 tp=1 ring-allgather b=1'."""
    p = parallelism
    text = f"dp_rep={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}"
    if p.pp > 1:
        text += f" pp={p.pp}"
    if p.cp > 1:
        text += f" {cp_impl}"
    return text + f" b={local_batch_size}"
