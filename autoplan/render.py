"""Human-readable rendering of a planning result."""

from __future__ import annotations

from cost_models.report import format_seq
from cost_models.specs import GiB

from .planner import PlanRequest, PlanResult


def _gib(value: float) -> str:
    return f"{value / GiB:.1f}"


def _ac_text(modes: dict[str, int] | None, summary: str) -> str:
    if not modes:
        return summary
    used = [f"{n} {m}" for m, n in modes.items() if n]
    return used[0].split(" ", 1)[1] if len(used) == 1 else " + ".join(used)


def _top_memory(breakdown: dict[str, float], count: int = 4) -> str:
    items = sorted(((v, k) for k, v in breakdown.items() if v > 0), reverse=True)[:count]
    return ", ".join(f"{k} {_gib(v)}" for v, k in items)


def render_plan_table(request: PlanRequest, result: PlanResult) -> str:
    model = request.model
    lines = [f"autoplan: {model.name} ({model.num_params / 1e9:.2f}B params) on {request.num_gpus} x "
             f"{request.gpu.name}, objective {result.objective}"
             + (f", target {format_seq(request.target_seq_len)}" if request.target_seq_len else "")]
    if result.plan is None:
        lines.append("")
        lines += [f"  {line}" for line in result.explanation]
        return "\n".join(lines)
    plan, est = result.plan, result.estimate
    p = plan.parallelism
    counts = {m: sum(1 for x in plan.activation_checkpoint.layer_modes(model.n_layers) if x == m)
              for m in ("none", "selective", "full")}
    lines += [
        "",
        f"  layout       dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}"
        f"   mesh {' > '.join(plan.mesh_order)}" + (f"   cp_impl {plan.cp_impl}" if p.cp > 1 else ""),
        f"  sequence     {format_seq(plan.seq_len)} tokens, local batch {plan.local_batch_size}, grad accum "
        f"{plan.grad_accum_steps}, global batch {plan.global_batch_tokens:,} tokens",
        f"  act. ckpt    {_ac_text(counts, plan.activation_checkpoint.mode)} (of {model.n_layers} layers)",
        f"  memory       {_gib(est.peak_memory_bytes)} of {_gib(est.memory_capacity_bytes)} GiB: "
        f"{_top_memory(est.memory_breakdown_bytes)}",
        f"  step         {est.step_time_s:.3f} s, {est.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, "
        f"MFU {est.mfu * 100:.1f}%   (compute {est.time_breakdown_s['compute']:.3f} s, recompute "
        f"{est.time_breakdown_s['recompute']:.3f} s, exposed comm {est.time_breakdown_s['exposed_comm']:.3f} s)",
    ]
    if result.alternatives:
        lines += ["", "  alternatives"]
        header = f"    {'dp_rep':>6} {'dp_shard':>8} {'cp':>4} {'tp':>3} {'seq':>6} {'b':>3} {'AC':<24} " \
                 f"{'tok/s/GPU':>10} {'MFU':>6}  bound by"
        lines.append(header)
        for alt in result.alternatives:
            c = alt.candidate
            q = c.parallelism
            lines.append(f"    {q.dp_replicate:>6} {q.dp_shard:>8} {q.cp:>4} {q.tp:>3} {format_seq(c.seq_len):>6} "
                         f"{c.local_batch_size:>3} {_ac_text(alt.counts, ''):<24} "
                         f"{alt.estimate.tokens_per_second_per_gpu:>10,.0f} {alt.estimate.mfu * 100:>5.1f}%  "
                         f"{alt.bound_by}")
    lines += ["", "  why"]
    lines += [f"    {line}" for line in plan.explanation if not line.startswith("alternative ")]
    if not result.proven_optimal:
        lines.append("    (solver hit its time limit: the plan is feasible, not proven optimal)")
    return "\n".join(lines)
