"""Caveats a plan's answer carries: a longest length that is only the search's cap, and
a step so slow that the plan is impractical to train with."""

from __future__ import annotations

from cost_models.step import StepEstimate

from .units import format_tokens

# A step over 5 minutes is impractical: 1,000 steps take 3.5 days, and a checkpoint,
# a failed node or a loss spike costs minutes of the whole cluster per step lost. Long
# enough that plans people run (seconds to a minute per step) never trip it.
IMPRACTICAL_STEP_S = 300.0
# The longest length max-seqlen tries (memory, not compute, is what it searches on).
MAX_SEQ_LEN = 16 * 1024 * 1024


def caveats(estimate: StepEstimate, capped: bool) -> list[str]:
    lines = []
    if capped:
        lines.append(f"seq_len {format_tokens(MAX_SEQ_LEN)} or more fits: the search stops at its cap of "
                     f"{format_tokens(MAX_SEQ_LEN)} tokens")
    if estimate.step_time_s > IMPRACTICAL_STEP_S:
        days = 1000 * estimate.step_time_s / 86400
        lines.append(f"impractical: one step takes {estimate.step_time_s / 60:,.1f} min (over "
                     f"{IMPRACTICAL_STEP_S / 60:.0f} min; 1,000 steps take {days:,.1f} days): fits in memory, "
                     f"too slow to train; use more GPUs or a shorter sequence")
    return lines
