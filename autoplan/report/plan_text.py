"""Text for one plan or one configuration: the plan table, the cost report, the check table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cost_models.config import TrainConfig
from cost_models.pipeline import rank_counts_policy
from cost_models.specs import ClusterSpec, GiB, ModelSpec
from cost_models.step import StepEstimate

from ..checking import needed_bytes
from ..units import format_tokens
from .describe import describe_ac, describe_degrees, describe_schedule

if TYPE_CHECKING:
    from ..planner import PlanRequest, PlanResult


def _gib(value: float) -> str:
    return f"{value / GiB:.1f}"


def _top_memory(breakdown: dict[str, float], count: int = 4) -> str:
    items = sorted(((v, k) for k, v in breakdown.items() if v > 0), reverse=True)[:count]
    return ", ".join(f"{k} {_gib(v)}" for v, k in items)


def render_plan_table(request: PlanRequest, result: PlanResult) -> str:
    model = request.model
    if result.objective == "min-gpus":  # the answer's count, and the bound it was searched under
        gpus = (f"{result.plan.hardware['num_gpus']} x {request.gpu.name} (fewest that fit, searched up to "
                f"{request.num_gpus})" if result.plan is not None else
                f"up to {request.num_gpus} x {request.gpu.name}")
    else:
        gpus = f"{request.num_gpus} x {request.gpu.name}"
    lines = [f"autoplan: {model.name} ({model.num_params / 1e9:.2f}B params) on {gpus}, objective {result.objective}"
             + (f", target {format_tokens(request.target_seq_len)}" if request.target_seq_len else "")]
    if result.plan is None or result.estimate is None:
        lines.append("")
        lines += [f"  {line}" for line in result.explanation]
        return "\n".join(lines)
    plan, est = result.plan, result.estimate
    p = plan.parallelism
    lines += [
        "",
        f"  layout       {describe_degrees(p.to_spec())}"
        f"   mesh {' > '.join((['pp'] if p.pp > 1 else []) + list(plan.mesh_order))}"
        + (f"   cp_impl {plan.cp_impl}" if p.cp > 1 else ""),
        f"  sequence     {format_tokens(plan.seq_len)} tokens, local batch {plan.local_batch_size}, grad accum "
        f"{plan.grad_accum_steps}, global batch {plan.global_batch_tokens:,} tokens",
        f"  act. ckpt    {describe_ac(plan.activation_checkpoint.layer_modes(model.n_layers))} "
        f"(of {model.n_layers} layers)",
        f"  memory       {_gib(est.peak_memory_bytes)} of {_gib(request.usable_bytes)} GiB usable "
        f"({_gib(est.memory_capacity_bytes)} capacity, {request.memory_headroom} headroom): "
        f"{_top_memory(est.memory_breakdown_bytes)}",
        f"  step         {est.step_time_s:.3f} s, {est.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, "
        f"MFU {est.mfu * 100:.1f}%   (compute {est.time_breakdown_s['compute']:.3f} s, recompute "
        f"{est.time_breakdown_s['recompute']:.3f} s, exposed comm {est.time_breakdown_s['exposed_comm']:.3f} s)",
    ]
    if p.pp > 1:
        stages = ", ".join(_gib(b) for b in est.stage_peak_bytes)
        lines.insert(-2, f"  pipeline     {describe_schedule(plan.pp_schedule, p.pp, plan.microbatches, plan.pp_virtual_stages)}"
                         f", slowest pp rank {est.slowest_stage}; peak GiB per pp rank: {stages}")
    if result.alternatives:
        lines += ["", "  alternatives"]
        any_pp = any(alt.candidate.parallelism.pp > 1 for alt in result.alternatives)
        header = f"    {'dp_rep':>6} {'dp_shard':>8} {'cp':>4} {'tp':>3} " + (f"{'pp':>3} " if any_pp else "") + \
                 f"{'seq':>6} {'b':>3} {'AC':<24} {'tok/s/GPU':>10} {'MFU':>6}  bound by"
        lines.append(header)
        for alt in result.alternatives:
            c = alt.candidate
            q = c.parallelism
            modes = (rank_counts_policy(model.n_layers, q.pp, c.pp_virtual_stages, alt.counts) if q.pp > 1
                     else alt.counts)
            pp_cell = f"{q.pp:>3} " if any_pp else ""
            lines.append(f"    {q.dp_replicate:>6} {q.dp_shard:>8} {q.cp:>4} {q.tp:>3} {pp_cell}{format_tokens(c.seq_len):>6} "
                         f"{c.local_batch_size:>3} {describe_ac(modes):<24} "
                         f"{alt.estimate.tokens_per_second_per_gpu:>10,.0f} {alt.estimate.mfu * 100:>5.1f}%  "
                         f"{alt.bound_by}")
    lines += ["", "  why"]
    lines += [f"    {line}" for line in plan.explanation if not line.startswith("alternative ")]
    if not result.proven_optimal:
        lines.append("    (solver hit its time limit: the plan is feasible, not proven optimal)")
    return "\n".join(lines)


def format_cost_report(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig, estimate: StepEstimate,
                       executor: str) -> str:
    """``autoplan cost``: one configuration's predicted memory, time, FLOPs and collectives."""
    par = cfg.parallelism
    ac = describe_ac(cfg.ac_policy(model.n_layers).layer_modes)
    lines = [
        f"model     {model.name} ({model.num_params / 1e9:.2f}B params, {model.n_layers} layers)",
        f"hardware  {cluster.num_gpus} x {cluster.gpu.name} ({cluster.gpus_per_node} per node)",
        f"layout    {describe_degrees(par)}  mesh {' > '.join((['pp'] if par.pp > 1 else []) + list(cfg.mesh_order))}"
        f"  cp_impl={cfg.cp_impl}",
        f"sequence  {format_tokens(cfg.seq_len)} tokens, local batch {cfg.local_batch_size}, "
        f"grad accum {cfg.grad_accum_steps}, global batch {cfg.global_batch_tokens:,} tokens, AC {ac}, "
        f"executor {executor}",
        "",
        f"memory    {estimate.peak_memory_bytes / GiB:.2f} GiB peak of {estimate.memory_capacity_bytes / GiB:.2f} GiB"
        f" ({'fits' if estimate.fits else 'DOES NOT FIT'}; peak during {estimate.peak_phase})",
    ]
    for name, value in estimate.memory_breakdown_bytes.items():
        if value > 0:
            lines.append(f"  {name:<18}{value / GiB:9.2f} GiB")
    pipeline = estimate.pipeline
    if pipeline is not None:  # pp > 1: the breakdown above is the worst stage's
        lines.append(f"pipeline  {describe_schedule(cfg.pp_schedule, par.pp, cfg.pp_microbatches, cfg.pp_virtual_stages)}"
                     f"; per pp rank: layers, micro-batches in flight, peak, time per micro-batch")
        for stage in getattr(pipeline, "stages"):
            lines.append(f"  pp rank {stage.rank:<4} {len(stage.layers):>3} layers  {stage.in_flight:5.1f} in flight  "
                         f"{stage.peak_bytes / GiB:7.2f} GiB  {stage.microbatch_s * 1e3:8.1f} ms"
                         + ("  (embedding)" if stage.first else "") + ("  (output + loss)" if stage.last else ""))
    lines += [
        "",
        f"time      {estimate.step_time_s:.3f} s/step, {estimate.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, "
        f"MFU {estimate.mfu * 100:.1f}%",
    ]
    for name, value in estimate.time_breakdown_s.items():
        lines.append(f"  {name:<18}{value:9.3f} s")
    lines += ["", f"flops     {estimate.flops_per_token / 1e9:.2f} GFLOP/token (MFU convention), "
              f"{estimate.executed_flops_per_step / 1e12:.1f} TFLOP executed per GPU per step", "",
              "collectives (per GPU per step)"]
    for coll in estimate.collectives:
        lines.append(f"  {coll.name:<42} group {coll.group}={coll.group_size:<4} {coll.tier:<10} "
                     f"{coll.link_bytes / GiB:8.2f} GiB on link  {coll.time_s:7.3f} s")
    return "\n".join(lines)


def format_check(result: dict) -> str:
    """``autoplan check``: predicted vs traced memory per component and the verdict."""
    lines = [result["note"]] if result.get("note") else []
    lines += [result["program"]] if result.get("program") else []
    lines.append(f"{'component':<18}{'predicted GiB':>14}{'traced GiB':>12}{'error':>9}")
    for name, (pred, traced) in result["rows"].items():
        error = f"{(pred / traced - 1) * 100:+.1f}%" if traced else ("" if not pred else "n/a")
        lines.append(f"{name:<18}{pred / GiB:>14.3f}{traced / GiB:>12.3f}{error:>9}")
    lines.append(f"{'fwd+bwd peak':<18}{result['predicted_tensor_peak'] / GiB:>14.3f}{result['traced_peak'] / GiB:>12.3f}"
                 f"{result['error'] * 100:>+8.1f}%   (predicted step peak during {result['phase']})")
    lines.append(f"optimizer step (predicted, not traced): {result['optimizer_phase'] / GiB:.3f} GiB")
    lines.append("components are at each side's own peak moment; the peaks are what must fit")
    if result["capacity"] and result.get("untraced_path_need") is not None:
        need = needed_bytes(result)
        verdict = "fits" if need <= result["usable"] else "does not fit"
        lines.append(f"{result['cp_impl']} was not traced (PyTorch's ring attention runs only on CUDA SDPA kernels): "
                     "no verdict from the trace")
        lines.append(f"the model alone, for {result['cp_impl']}: {need / GiB:.2f} GiB of {result['usable'] / GiB:.2f} "
                     f"usable ({result['capacity'] / GiB:.2f} capacity): {verdict} (model only; its ring transients "
                     "are checked against a trace of torch's ring functions in the test suite)")
    elif result["capacity"]:
        need = needed_bytes(result)
        verdict = "fits" if need <= result["usable"] else "DOES NOT FIT"
        lines.append(f"traced peak + {result['non_tensor_bytes'] / GiB:.2f} GiB non-tensor reserve (CUDA context, "
                     f"NCCL, fragmentation) = {need / GiB:.2f} GiB of {result['usable'] / GiB:.2f} usable "
                     f"({result['capacity'] / GiB:.2f} capacity): {verdict}")
    return "\n".join(lines)
