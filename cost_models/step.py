"""One training step on one GPU: compute, recompute, communication and what overlaps.

Compute time is executed FLOPs over achievable FLOP/s (matmul and attention each at
their own efficiency) plus the memory-bound element-wise work over HBM bandwidth.
Communication follows ``comm.py``; the overlap model is what FSDP2 and the CP
implementations actually do:

- FSDP all-gathers / reduce-scatters are issued on a separate stream one block ahead,
  so each block's collective hides behind the previous block's compute; only the
  excess (and the first gather) is exposed.
- TP collectives under DTensor sequence parallel are blocking: exposed.
- all-gather-KV context parallel gathers before attention: exposed. Ring CP overlaps
  each rotation with the attention of the chunk already held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from . import flops as F
from .comm import Collective, collective_seconds, make_collective
from .config import TrainConfig
from .executors import ExecutorProfile, resolve_executor
from .memory import MemoryEstimate, estimate_memory
from .rules import layout_violations
from .specs import ClusterSpec, ModelSpec, SpecError

OPTIMIZER_BYTES_PER_PARAM = 28 + 4  # AdamW fp32: read p, g, m, v; write p, m, v; + norm
FP32 = 4


@dataclass(frozen=True)
class LayerTime:
    """Seconds for one block on one micro-batch."""

    forward_s: float
    backward_s: float
    recompute_s: dict[str, float]  # extra seconds per AC mode
    tp_comm_s: float  # exposed TP collectives, forward + backward
    tp_recompute_comm_s: float  # TP collectives repeated by full recompute
    cp_comm_s: float  # exposed CP communication, forward + backward
    cp_recompute_comm_s: float
    fsdp_comm_s: float  # FSDP gather (fwd + bwd) + reduce-scatter for this block


@dataclass(frozen=True)
class StepEstimate:
    peak_memory_bytes: float
    memory_breakdown_bytes: dict[str, float]
    memory_capacity_bytes: float
    fits: bool
    step_time_s: float
    tokens_per_second_per_gpu: float
    mfu: float
    flops_per_token: float  # model FLOPs (MFU convention)
    executed_flops_per_step: float
    time_breakdown_s: dict[str, float]
    collectives: list[Collective] = field(default_factory=list)
    memory: MemoryEstimate | None = None

    @property
    def peak_phase(self) -> str:
        """The step phase where memory peaks (loss, backward, root_reduce, optimizer)."""
        return self.memory.peak_phase if self.memory is not None else "unknown"

    def summary(self) -> dict:
        return {
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_breakdown_bytes": dict(self.memory_breakdown_bytes),
            "memory_capacity_bytes": self.memory_capacity_bytes,
            "step_time_s": self.step_time_s,
            "tokens_per_second_per_gpu": self.tokens_per_second_per_gpu,
            "mfu": self.mfu,
            "flops_per_token": self.flops_per_token,
            "time_breakdown_s": dict(self.time_breakdown_s),
        }


def elementwise_bytes_per_token(model: ModelSpec, executor: ExecutorProfile) -> float:
    """HBM traffic of one block's memory-bound forward ops per token.

    Two RMSNorms over d, RoPE over q and k, SwiGLU over f, two residual adds over d, the
    attention-output re-layout over d_q; bytes per element from the executor profile.
    """
    per = dict(executor.elementwise_bytes_per_element)
    d, dq, dkv, f = model.dim, model.q_dim, model.kv_dim, model.ffn_dim
    return (2 * d * per["rmsnorm"] + (dq + dkv) * per["rope"] + f * per["swiglu"]
            + 2 * d * per["residual"] + dq * per["relayout"])


def loss_elementwise_bytes_per_token(model: ModelSpec, logits_bytes: int) -> float:
    """Upcast, log-softmax, nll and their backward over the vocabulary, per token."""
    forward = (logits_bytes + FP32) + 2 * FP32 + FP32  # cast, log_softmax r/w, nll read
    backward = 3 * FP32 + (FP32 + logits_bytes)  # nll grad, log_softmax bwd, cast back
    return (forward + backward) * model.vocab_size


def layer_time(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig,
               executor: ExecutorProfile) -> LayerTime:
    gpu = cluster.gpu
    par = cfg.parallelism
    tp, cp = par.tp, par.cp
    tokens = cfg.tokens_per_gpu
    a = cfg.precision.activation_bytes
    layer = F.layer_forward_flops(model, tokens, cfg.seq_len, cp, tp)
    matmul_rate = gpu.bf16_flops_per_s * gpu.matmul_efficiency
    attention_rate = gpu.bf16_flops_per_s * gpu.attention_efficiency
    # Element-wise bytes scale with the activation width (profile numbers are for bf16).
    elementwise_s = (elementwise_bytes_per_token(model, executor) * a / 2 * tokens / tp
                     / gpu.hbm_bytes_per_s)
    forward = layer.linear / matmul_rate + layer.attention / attention_rate + elementwise_s
    backward = (F.MATMUL_BACKWARD_FACTOR * layer.linear / matmul_rate
                + F.ATTENTION_BACKWARD_FACTOR * layer.attention / attention_rate
                + 2 * elementwise_s)
    order = cfg.mesh_order

    # Tensor parallel + sequence parallel: all-gather before attention and FFN,
    # reduce-scatter after wo and w2 (forward); the mirror image in backward.
    tp_comm = 0.0
    if tp > 1:
        buffer = a * tokens * model.dim
        one_ag = collective_seconds(cluster, par, order, "all_gather", ("tp",), buffer)
        one_rs = collective_seconds(cluster, par, order, "reduce_scatter", ("tp",), buffer)
        tp_comm = 2 * (2 * one_ag + 2 * one_rs)
    tp_forward = tp_comm / 2

    cp_comm = cp_forward = 0.0
    if cp > 1:
        kv_full = a * tokens * cp * 2 * model.kv_dim / tp  # K and V of the whole sequence
        if cfg.cp_impl == "allgather-kv":
            gather = collective_seconds(cluster, par, order, "all_gather", ("cp",), kv_full)
            scatter = collective_seconds(cluster, par, order, "reduce_scatter", ("cp",), kv_full)
            cp_forward = gather
            cp_comm = gather + scatter
        else:
            # Ring: cp - 1 rotations of the local K/V shard, each hidden behind the
            # attention of the shard already present; backward also rotates dK/dV.
            shard = kv_full / cp
            kind = "send_recv" if cfg.cp_impl == "ring-allgather" else "send_recv"
            hop = collective_seconds(cluster, par, order, kind, ("cp",), shard)
            attention_per_hop_fwd = layer.attention / attention_rate / cp
            attention_per_hop_bwd = F.ATTENTION_BACKWARD_FACTOR * attention_per_hop_fwd
            cp_forward = (cp - 1) * max(0.0, hop - attention_per_hop_fwd)
            cp_comm = cp_forward + (cp - 1) * max(0.0, 2 * hop - attention_per_hop_bwd)

    # FSDP over dp_shard x cp: gather the block's params in forward and again in
    # backward, reduce-scatter its grads; HSDP adds an all-reduce of the shard.
    block_bytes = model.params_per_layer / tp
    fsdp_comm = _fsdp_block_comm_s(cluster, par, tuple(order), block_bytes, cfg.precision.param_bytes,
                                   cfg.precision.grad_reduce_bytes)
    # FSDP2 copies params into the all-gather buffer and out of it (fwd and bwd), and
    # casts + copies grads into the reduce-scatter buffer: memory-bound, on the compute
    # stream, so it adds to compute time.
    fsdp_copy_bytes = block_bytes * (2 * 2 * 2 * cfg.precision.param_bytes
                                     + cfg.precision.param_bytes + cfg.precision.grad_reduce_bytes)
    fsdp_copy_s = fsdp_copy_bytes / gpu.hbm_bytes_per_s if par.fsdp_degree > 1 else 0.0
    backward += fsdp_copy_s
    recompute = {
        "none": 0.0,
        "selective": elementwise_s,
        "full": forward,
    }
    return LayerTime(forward_s=forward, backward_s=backward, recompute_s=recompute,
                     tp_comm_s=tp_comm, tp_recompute_comm_s=tp_forward,
                     cp_comm_s=cp_comm, cp_recompute_comm_s=cp_forward,
                     fsdp_comm_s=fsdp_comm)


@lru_cache(maxsize=16384)
def _fsdp_block_comm_s(cluster: ClusterSpec, par, order: tuple[str, ...], block_params: float, param_bytes: int,
                       reduce_bytes: int) -> float:
    """One block's FSDP traffic time: 2 all-gathers + reduce-scatter (+ HSDP all-reduce).
    Cached: it does not depend on sequence length, batch or CP implementation."""
    fsdp_dims = ("dp_shard", "cp")
    gather = make_collective(cluster, par, order, "fsdp", "all_gather", fsdp_dims, block_params * param_bytes, 1).time_s
    scatter = make_collective(cluster, par, order, "fsdp", "reduce_scatter", fsdp_dims,
                              block_params * reduce_bytes, 1).time_s
    replicate = make_collective(cluster, par, order, "hsdp", "all_reduce", ("dp_replicate",),
                                block_params * reduce_bytes / par.fsdp_degree, 1).time_s
    return 2 * gather + scatter + replicate


@dataclass(frozen=True)
class TimeTerms:
    """Step time as a function of how many layers use each AC mode (linear but for one
    max, so the planner's ILP can price checkpointing jointly with the layout):

    micro = base + sum_m n_m (recompute_m + recompute_comm_m)
            + max(0, fsdp_comm - hiding_compute - sum_m n_m recompute_m)
    step  = grad_accum x micro + optimizer
    """

    base_s: float  # compute + exposed TP/CP comm + first FSDP gather, per micro-batch
    hiding_compute_s: float  # compute FSDP traffic can hide behind (no AC)
    fsdp_comm_s: float  # all FSDP traffic of one micro-batch
    fsdp_tail_s: float  # the part that can never hide (first gather, last scatter)
    recompute_s: dict[str, float]  # per layer, by AC mode (compute)
    recompute_comm_s: dict[str, float]  # per layer, by AC mode (exposed comm redone)
    optimizer_s: float
    grad_accum_steps: int
    compute_s: float
    root_recompute_s: float
    tp_comm_s: float
    cp_comm_s: float

    def micro_s(self, counts: dict[str, int]) -> float:
        recompute = sum(n * self.recompute_s[m] for m, n in counts.items())
        comm = sum(n * self.recompute_comm_s[m] for m, n in counts.items())
        exposed = max(0.0, self.fsdp_comm_s - self.hiding_compute_s - recompute)
        return self.base_s + recompute + comm + exposed

    def step_s(self, counts: dict[str, int]) -> float:
        return self.grad_accum_steps * self.micro_s(counts) + self.optimizer_s


def time_terms(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig,
               executor: ExecutorProfile | str | None = None) -> TimeTerms:
    executor = resolve_executor(executor)
    gpu = cluster.gpu
    par = cfg.parallelism
    tokens = cfg.tokens_per_gpu
    layer = layer_time(model, cluster, cfg, executor)
    matmul_rate = gpu.bf16_flops_per_s * gpu.matmul_efficiency

    # Root: output projection (re-run per chunk by the checkpointed loss) + loss ops.
    output_fwd = F.output_forward_flops(model, tokens, par.tp) / matmul_rate
    loss_ew = loss_elementwise_bytes_per_token(model, executor.logits_bytes) * tokens / par.tp / gpu.hbm_bytes_per_s
    chunked = executor.loss_chunk_tokens is not None and par.tp == 1
    root_compute = output_fwd * (1 + F.MATMUL_BACKWARD_FACTOR) + loss_ew
    root_recompute = output_fwd + loss_ew / 3 if chunked else 0.0

    n_layers = model.n_layers
    compute = n_layers * (layer.forward_s + layer.backward_s) + root_compute
    tp_comm = n_layers * layer.tp_comm_s
    cp_comm = n_layers * layer.cp_comm_s
    # FSDP: traffic runs on its own stream one block ahead and hides behind compute;
    # the first gather (forward) and the last reduce-scatter cannot hide.
    fsdp_tail = layer.fsdp_comm_s / 3
    sharded_params = model.num_params / par.tp / par.fsdp_degree
    return TimeTerms(
        base_s=compute + root_recompute + tp_comm + cp_comm + fsdp_tail,
        hiding_compute_s=compute + root_recompute,
        fsdp_comm_s=n_layers * layer.fsdp_comm_s,
        fsdp_tail_s=fsdp_tail,
        recompute_s=dict(layer.recompute_s),
        recompute_comm_s={"none": 0.0, "selective": 0.0,
                          "full": layer.tp_recompute_comm_s + layer.cp_recompute_comm_s},
        optimizer_s=sharded_params * OPTIMIZER_BYTES_PER_PARAM / gpu.hbm_bytes_per_s,
        grad_accum_steps=cfg.grad_accum_steps,
        compute_s=compute,
        root_recompute_s=root_recompute,
        tp_comm_s=tp_comm,
        cp_comm_s=cp_comm,
    )


def estimate_step(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig,
                  executor: ExecutorProfile | str | None = None) -> StepEstimate:
    """Predicted peak memory, step time, tokens/s per GPU and MFU for one layout."""
    executor = resolve_executor(executor)
    violations = layout_violations(model, cfg, cluster)
    if violations:
        raise SpecError("layout cannot run: " + "; ".join(violations))
    memory = estimate_memory(model, cfg, executor)
    gpu = cluster.gpu
    par = cfg.parallelism
    tokens = cfg.tokens_per_gpu
    modes = cfg.ac_policy(model.n_layers).layer_modes
    counts = {m: sum(1 for x in modes if x == m) for m in ("none", "selective", "full")}
    terms = time_terms(model, cluster, cfg, executor)
    step = terms.step_s(counts)
    ga = cfg.grad_accum_steps
    recompute = terms.root_recompute_s + sum(n * terms.recompute_s[m] for m, n in counts.items())
    exposed_fsdp = terms.fsdp_tail_s + max(0.0, terms.fsdp_comm_s - terms.hiding_compute_s
                                           - (recompute - terms.root_recompute_s))
    n_full = counts["full"]
    layer = layer_time(model, cluster, cfg, executor)
    exposed_tp = terms.tp_comm_s + n_full * layer.tp_recompute_comm_s
    exposed_cp = terms.cp_comm_s + n_full * layer.cp_recompute_comm_s
    compute = terms.compute_s
    optimizer = terms.optimizer_s

    tokens_per_gpu_per_step = cfg.seq_len * cfg.local_batch_size * cfg.grad_accum_steps / (par.cp * par.tp)
    throughput = tokens_per_gpu_per_step / step
    flops_per_token = F.model_flops_per_token(model, cfg.seq_len)
    mfu = flops_per_token * throughput / gpu.bf16_flops_per_s
    executed = F.step_forward_backward_flops(model, tokens, cfg.seq_len, par.cp, par.tp)
    executed_total = cfg.grad_accum_steps * sum(executed.values())
    time_breakdown = {
        "compute": ga * compute,
        "recompute": ga * recompute,
        "exposed_comm": ga * (exposed_tp + exposed_cp + exposed_fsdp),
        "exposed_tp_comm": ga * exposed_tp,
        "exposed_cp_comm": ga * exposed_cp,
        "exposed_fsdp_comm": ga * exposed_fsdp,
        "optimizer": optimizer,
    }
    collectives = _collectives(model, cluster, cfg, n_full)
    capacity = float(gpu.memory_bytes)
    return StepEstimate(
        peak_memory_bytes=memory.peak_bytes,
        memory_breakdown_bytes=memory.breakdown_bytes,
        memory_capacity_bytes=capacity,
        fits=memory.peak_bytes <= capacity,
        step_time_s=step,
        tokens_per_second_per_gpu=throughput,
        mfu=mfu,
        flops_per_token=flops_per_token,
        executed_flops_per_step=executed_total,
        time_breakdown_s=time_breakdown,
        collectives=collectives,
        memory=memory,
    )


def _collectives(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig, n_full: int) -> list[Collective]:
    """The step's collectives with volumes, for reports (time totals are in estimate_step)."""
    par, order, prec = cfg.parallelism, cfg.mesh_order, cfg.precision
    ga, layers = cfg.grad_accum_steps, model.n_layers
    fsdp = ("dp_shard", "cp")
    out = [
        make_collective(cluster, par, order, "fsdp all-gather params (fwd + bwd)", "all_gather", fsdp,
                        model.params_per_layer / par.tp * prec.param_bytes, 2 * layers * ga),
        make_collective(cluster, par, order, "fsdp reduce-scatter grads", "reduce_scatter", fsdp,
                        model.params_per_layer / par.tp * prec.grad_reduce_bytes, layers * ga),
    ]
    if par.dp_replicate > 1:
        out.append(make_collective(cluster, par, order, "hsdp all-reduce grad shards", "all_reduce",
                                   ("dp_replicate",), model.num_params / par.tp / par.fsdp_degree
                                   * prec.grad_reduce_bytes, ga))
    tokens = cfg.tokens_per_gpu
    if par.tp > 1:
        calls = (8 * layers + 2 * n_full) * ga
        out.append(make_collective(cluster, par, order, "tp all-gather / reduce-scatter (SP)", "all_gather",
                                   ("tp",), prec.activation_bytes * tokens * model.dim, calls))
    if par.cp > 1:
        kv = prec.activation_bytes * tokens * par.cp * 2 * model.kv_dim / par.tp
        if cfg.cp_impl == "allgather-kv":
            out.append(make_collective(cluster, par, order, "cp all-gather K/V + reduce-scatter dK/dV",
                                       "all_gather", ("cp",), kv, (2 * layers + n_full) * ga))
        else:
            out.append(make_collective(cluster, par, order, f"cp {cfg.cp_impl} K/V rotations", "send_recv",
                                       ("cp",), kv / par.cp, 3 * (par.cp - 1) * layers * ga))
    return out
