"""A person-readable report of one configuration's predicted step."""

from __future__ import annotations

from .config import TrainConfig
from .specs import GiB, ClusterSpec, ModelSpec
from .step import StepEstimate


def format_seq(tokens: int) -> str:
    for unit, size in (("M", 1024 * 1024), ("k", 1024)):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def format_report(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig, estimate: StepEstimate,
                  executor: str) -> str:
    par = cfg.parallelism
    ac = cfg.ac_policy(model.n_layers).summary
    lines = [
        f"model     {model.name} ({model.num_params / 1e9:.2f}B params, {model.n_layers} layers)",
        f"hardware  {cluster.num_gpus} x {cluster.gpu.name} ({cluster.gpus_per_node} per node)",
        f"layout    dp_replicate={par.dp_replicate} dp_shard={par.dp_shard} cp={par.cp} tp={par.tp}"
        f"  mesh {' > '.join(cfg.mesh_order)}  cp_impl={cfg.cp_impl}",
        f"sequence  {format_seq(cfg.seq_len)} tokens, local batch {cfg.local_batch_size}, "
        f"grad accum {cfg.grad_accum_steps}, global batch {cfg.global_batch_tokens:,} tokens, AC {ac}, "
        f"executor {executor}",
        "",
        f"memory    {estimate.peak_memory_bytes / GiB:.2f} GiB peak of {estimate.memory_capacity_bytes / GiB:.2f} GiB"
        f" ({'fits' if estimate.fits else 'DOES NOT FIT'}; peak during {estimate.memory.peak_phase})",
    ]
    for name, value in estimate.memory_breakdown_bytes.items():
        if value > 0:
            lines.append(f"  {name:<18}{value / GiB:9.2f} GiB")
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
