"""One training step on one GPU: compute, recompute, communication and what overlaps.

Per block, the GPU runs (all terms per micro-batch):

- GEMMs at ``peak x clock_fraction x matmul_efficiency x shape factor`` (``gemm_time_s``):
  the shape factor is wave quantization of 128 x 256 output tiles over the SMs times a
  pipeline fill/drain term ``K / (K + 128)`` (two 64-deep k-tiles), and a GEMM never runs
  faster than its operands stream from HBM (roofline). Small per-GPU dims under TP and
  small token counts lose efficiency through these terms, not through a per-case factor.
- Attention on the executor's SDPA backend at a rate per backend x GPU family x
  direction (``ATTENTION_KERNELS``, from published kernel tables), ramping with the
  keys one kernel call sees (short calls run below the long-sequence rate).
- Memory-bound element-wise ops at HBM bandwidth (fewer bytes when compiled).
- Context parallel as torch 2.13 runs it (``_context_parallel/_attention.py``): the
  ``_SDPAMerger`` fp32 upcast + merge after every ring step, the K/V ``cat`` per step,
  fp32 dK/dV accumulation in backward.
- The host issues ~60 eager ops per block forward; the host runs ahead of the GPU, so a
  block takes ``max(GPU time, host time)``.

Communication follows ``comm.py``; the overlap model is what FSDP2, TP and the CP
implementations actually do:

- FSDP2 all-gathers / reduce-scatters run on their own streams one block ahead and hide
  behind compute; the root unit's (embedding, final norm, output) all-gather before the
  first block and its reduce-scatter after the last, the first block's all-gather and the
  last block's reduce-scatter cannot hide. Context-parallel traffic on the same links
  (both inside a node, or both across nodes) competes for the time FSDP could hide in.
- TP collectives under DTensor sequence parallel are blocking: exposed.
- CP ``allgather-kv`` (this project's portable CP): all-gather K/V before attention, the
  autograd backward a reduce-scatter of dK/dV: exposed.
- CP ``ring-allgather``: one all-gather of K/V issued at ring step 0 and waited at step 1,
  so only the diagonal step's attention hides it; backward gathers again, and dK/dV
  rotate in fp32 with all-to-all (send/recv to the next rank) each step, hidden behind
  the next step's attention backward except the last hop.
- CP ``ring-alltoall``: cp - 1 bf16 K/V rotations, each hidden behind the attention of
  the chunk held; backward rotates K/V and fp32 dK/dV together, last dK/dV hop exposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from . import flops
from .comm import Collective, collective_seconds, group_tier, make_collective
from .config import TrainConfig
from .executors import ExecutorProfile, resolve_executor
from .kernels import (
    CP_BWD_KV_BYTES_PER_ELEMENT,
    CP_BWD_Q_BYTES_PER_ELEMENT,
    CP_KV_CAT_BYTES_PER_ELEMENT,
    CP_MERGE_ACTIVE_FRACTION,
    CP_MERGE_BYTES_PER_ELEMENT,
    CP_MERGE_ONCE_BYTES_PER_ELEMENT,
    attention_backend_for,
    attention_keys_per_call,
    attention_rate_per_s,
    elementwise_bytes_per_token,
    gemm_time_s,
    layer_matmul_s,
    loss_elementwise_bytes_per_token,
    optimizer_time_s,
)
from .memory import MemoryEstimate, estimate_memory
from .rules import layout_violations
from .specs import ClusterSpec, ModelSpec, SpecError

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
    tp_selective_recompute_comm_s: float = 0.0  # TP all-gathers selective AC re-runs
    # --- step time detail (defaults keep older constructors working)
    matmul_s: float = 0.0  # forward + backward GEMMs
    attention_s: float = 0.0  # forward + backward attention kernels
    elementwise_s: float = 0.0  # forward + backward memory-bound ops (incl. FSDP copies)
    cp_elementwise_s: float = 0.0  # CP merge / accumulate / cat, forward + backward
    cp_hidden_comm_s: float = 0.0  # CP traffic hidden behind attention (occupies the link)
    fsdp_first_gather_s: float = 0.0
    fsdp_last_scatter_s: float = 0.0


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
    # pp > 1 (cost_models/pipeline.py): the pipeline's estimate and each pp rank's peak.
    pipeline: object | None = None
    stage_peak_bytes: tuple[float, ...] = ()
    slowest_stage: int | None = None

    @property
    def peak_phase(self) -> str:
        """The step phase where memory peaks (loss, backward, root_reduce, optimizer)."""
        if self.memory is None and self.stage_peak_bytes:  # pp > 1: where the pipeline peaks
            worst = max(range(len(self.stage_peak_bytes)), key=lambda r: self.stage_peak_bytes[r])
            return f"pp rank {worst} of {len(self.stage_peak_bytes)}"
        return self.memory.peak_phase if self.memory is not None else "unknown"

    def summary(self) -> dict:
        return {
            "peak_memory_bytes": self.peak_memory_bytes,
            # The caching allocator's reserved peak (torch.cuda.max_memory_reserved, what
            # torchtitan logs as memory); peak_memory_bytes adds the CUDA context and NCCL.
            "peak_memory_reserved_bytes": self.memory.reserved_peak_bytes if self.memory is not None else None,
            "memory_breakdown_bytes": dict(self.memory_breakdown_bytes),
            "memory_capacity_bytes": self.memory_capacity_bytes,
            "step_time_s": self.step_time_s,
            "tokens_per_second_per_gpu": self.tokens_per_second_per_gpu,
            "mfu": self.mfu,
            "flops_per_token": self.flops_per_token,
            "time_breakdown_s": dict(self.time_breakdown_s),
        } | self._pipeline_summary()

    def _pipeline_summary(self) -> dict:
        """pp > 1 only (pp = 1 summaries are unchanged): bubble, per-stage peaks, slowest stage."""
        if self.pipeline is None:
            return {}
        return {"pipeline_bubble_fraction": getattr(self.pipeline, "bubble_fraction"),
                "stage_peak_memory_bytes": list(self.stage_peak_bytes), "slowest_stage": self.slowest_stage}


def layer_time(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig,
               executor: ExecutorProfile) -> LayerTime:
    gpu = cluster.gpu
    par = cfg.parallelism
    tp, cp = par.tp, par.cp
    tokens = cfg.tokens_per_gpu
    a = cfg.precision.activation_bytes
    hbm = gpu.hbm_bytes_per_s
    layer = flops.layer_forward_flops(model, tokens, cfg.seq_len, cp, tp)
    matmul_fwd, matmul_bwd, per_gemm = layer_matmul_s(model, gpu, tokens, tp)
    backend = attention_backend_for(cfg, executor, model)
    keys = attention_keys_per_call(cfg)
    attention_fwd = layer.attention / attention_rate_per_s(gpu, backend, False, keys)
    attention_bwd = flops.ATTENTION_BACKWARD_FACTOR * layer.attention / attention_rate_per_s(gpu, backend, True, keys)
    # Element-wise bytes scale with the activation width (profile numbers are for bf16).
    elementwise_s = elementwise_bytes_per_token(model, executor) * a / 2 * tokens / tp / hbm
    dq, dkv = model.q_dim / tp, model.kv_dim / tp

    # Context parallel: element-wise work of the CP attention path (merge, accumulate, cat).
    cp_ew_fwd = cp_ew_bwd = 0.0
    if cp > 1 and cfg.cp_impl in ("ring-allgather", "ring-alltoall"):
        steps = cp - 1
        cp_ew_fwd = tokens * (steps * (CP_MERGE_ACTIVE_FRACTION * CP_MERGE_BYTES_PER_ELEMENT * dq
                                       + CP_KV_CAT_BYTES_PER_ELEMENT * 2 * dkv)
                              + CP_MERGE_ONCE_BYTES_PER_ELEMENT * dq) / hbm
        cp_ew_bwd = tokens * steps * (CP_MERGE_ACTIVE_FRACTION * CP_BWD_Q_BYTES_PER_ELEMENT * dq
                                      + CP_BWD_KV_BYTES_PER_ELEMENT * 2 * dkv
                                      + CP_KV_CAT_BYTES_PER_ELEMENT * 2 * dkv) / hbm
    elif cp > 1 and model.n_heads != model.n_kv_heads:
        # allgather-kv: runtime/context_parallel.py expands the gathered K/V to the query
        # heads (repeat_interleave, read 2 + write 2) for the causal prefix of each local
        # chunk, ~S keys in all; backward sums the expanded grads back (read 2 + write 2).
        expanded = cfg.local_batch_size * cfg.seq_len * 2 * dq * 4.0
        cp_ew_fwd = expanded / hbm
        cp_ew_bwd = expanded / hbm

    gpu_forward = matmul_fwd + attention_fwd + elementwise_s + cp_ew_fwd
    gpu_backward = matmul_bwd + attention_bwd + 2 * elementwise_s + cp_ew_bwd
    # Host: eager ops (DTensor ops for the 7 linears under TP); the host runs ahead, so a
    # block takes the longer of the two.
    ops = executor.compiled_ops_per_layer_forward if executor.compile else executor.eager_ops_per_layer_forward
    host_forward = ops * executor.host_op_overhead_s
    if tp > 1:
        host_forward += 7 * (executor.dtensor_op_overhead_s - executor.host_op_overhead_s)
    forward = max(gpu_forward, host_forward)
    backward = max(gpu_backward, 2 * host_forward)
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
    # torchtitan's per-op SAC saves neither all-gather output (only mm, SDPA and
    # reduce_scatter are on its save list), so recomputing wk and w3 (inputs: the gathered
    # norm outputs) re-runs the attention and FFN all-gathers under TP.
    tp_selective = 0.0
    if tp > 1:
        regathered = {"wq", "wk", "wv"} & set(executor.selective_recomputed_matmuls), \
            {"w1", "w3"} & set(executor.selective_recomputed_matmuls)
        tp_selective = sum(one_ag for group in regathered if group)

    cp_comm = cp_forward = cp_hidden = 0.0
    if cp > 1:
        kv_local = a * tokens * 2 * dkv  # K and V of the local tokens (this GPU's heads)
        kv_full = kv_local * cp
        attn_step_fwd = attention_fwd / cp
        attn_step_bwd = attention_bwd / cp
        if cfg.cp_impl == "allgather-kv":
            gather = collective_seconds(cluster, par, order, "all_gather", ("cp",), kv_full)
            scatter = collective_seconds(cluster, par, order, "reduce_scatter", ("cp",), kv_full)
            cp_forward = gather
            cp_comm = gather + scatter
        elif cfg.cp_impl == "ring-allgather":
            gather = collective_seconds(cluster, par, order, "all_gather", ("cp",), kv_full)
            dkv_hop = collective_seconds(cluster, par, order, "send_recv", ("cp",), kv_local / a * FP32)
            cp_forward = max(0.0, gather - attn_step_fwd)
            bwd = max(0.0, gather - attn_step_bwd) + (cp - 1) * max(0.0, dkv_hop - attn_step_bwd) + dkv_hop
            cp_comm = cp_forward + bwd
            cp_hidden = 2 * gather + cp * dkv_hop - cp_comm
        else:  # ring-alltoall
            kv_hop = collective_seconds(cluster, par, order, "send_recv", ("cp",), kv_local)
            dkv_hop = collective_seconds(cluster, par, order, "send_recv", ("cp",), kv_local / a * FP32)
            cp_forward = (cp - 1) * max(0.0, kv_hop - attn_step_fwd)
            bwd = (cp - 1) * max(0.0, kv_hop + dkv_hop - attn_step_bwd) + dkv_hop
            cp_comm = cp_forward + bwd
            cp_hidden = 2 * (cp - 1) * kv_hop + cp * dkv_hop - cp_comm

    # FSDP over dp_shard x cp: gather the block's params in forward and again in
    # backward, reduce-scatter its grads; HSDP adds an all-reduce of the shard.
    block_bytes = model.params_per_layer / tp
    gather, scatter, replicate = _fsdp_block_comm_s(cluster, par, tuple(order), block_bytes,
                                                    cfg.precision.param_bytes, cfg.precision.grad_reduce_bytes)
    fsdp_comm = 2 * gather + scatter + replicate
    # FSDP2 copies params into the all-gather buffer and out of it (fwd and bwd), and
    # casts + copies grads into the reduce-scatter buffer: memory-bound, on the compute
    # stream, so it adds to compute time.
    fsdp_copy_bytes = block_bytes * (2 * 2 * 2 * cfg.precision.param_bytes
                                     + cfg.precision.param_bytes + cfg.precision.grad_reduce_bytes)
    fsdp_copy_s = fsdp_copy_bytes / hbm if par.fsdp_degree > 1 else 0.0
    backward += fsdp_copy_s
    sac_matmul_s = sum(t for name, t in per_gemm if name in executor.selective_recomputed_matmuls)
    recompute = {
        "none": 0.0,
        "selective": elementwise_s + sac_matmul_s,
        "full": forward,
    }
    return LayerTime(forward_s=forward, backward_s=backward, recompute_s=recompute,
                     tp_comm_s=tp_comm, tp_recompute_comm_s=tp_forward,
                     tp_selective_recompute_comm_s=tp_selective, cp_comm_s=cp_comm, cp_recompute_comm_s=cp_forward,
                     fsdp_comm_s=fsdp_comm, matmul_s=matmul_fwd + matmul_bwd,
                     attention_s=attention_fwd + attention_bwd,
                     elementwise_s=3 * elementwise_s + fsdp_copy_s,
                     cp_elementwise_s=cp_ew_fwd + cp_ew_bwd, cp_hidden_comm_s=max(0.0, cp_hidden),
                     fsdp_first_gather_s=gather, fsdp_last_scatter_s=scatter + replicate)


@lru_cache(maxsize=16384)
def _fsdp_block_comm_s(cluster: ClusterSpec, par, order: tuple[str, ...], block_params: float, param_bytes: int,
                       reduce_bytes: int) -> tuple[float, float, float]:
    """One block's FSDP traffic: (all-gather, reduce-scatter, HSDP all-reduce) seconds.
    Cached: it does not depend on sequence length, batch or CP implementation."""
    fsdp_dims = ("dp_shard", "cp")
    gather = collective_seconds(cluster, par, order, "all_gather", fsdp_dims, block_params * param_bytes)
    scatter = collective_seconds(cluster, par, order, "reduce_scatter", fsdp_dims, block_params * reduce_bytes)
    replicate = collective_seconds(cluster, par, order, "all_reduce", ("dp_replicate",),
                                   block_params * reduce_bytes / par.fsdp_degree)
    return gather, scatter, replicate


@dataclass(frozen=True)
class TimeTerms:
    """Step time as a function of how many layers use each AC mode (linear but for one
    max, so the planner's ILP can price checkpointing jointly with the layout):

    micro = base + sum_m n_m (recompute_m + recompute_comm_m)
            + max(0, fsdp_comm - hiding_compute - sum_m n_m recompute_m)
    step  = grad_accum x micro + optimizer

    Gradient accumulation repeats every micro-batch's FSDP traffic: FSDP2 all-gathers and
    reduce-scatters (and HSDP all-reduces) in every backward unless the program turns
    gradient sync off, which neither runtime/train.py nor torchtitan (late 2024) does.
    """

    base_s: float  # compute + exposed TP/CP comm + FSDP tail, per micro-batch
    hiding_compute_s: float  # compute FSDP traffic can hide behind (no AC)
    fsdp_comm_s: float  # FSDP traffic that can hide (+ CP traffic on the same links), per micro-batch
    fsdp_tail_s: float  # never hides: root unit gather + scatter, first block gather, last scatter
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
    return _time_terms(model, cluster, cfg, executor)


@lru_cache(maxsize=4096)
def _time_terms(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig, executor: ExecutorProfile) -> TimeTerms:
    gpu = cluster.gpu
    par = cfg.parallelism
    order = cfg.mesh_order
    tokens = cfg.tokens_per_gpu
    a = cfg.precision.activation_bytes
    layer = layer_time(model, cluster, cfg, executor)

    # Root: output projection (re-run per chunk by the checkpointed loss) + loss ops.
    output_fwd = gemm_time_s(gpu, tokens, model.vocab_size // par.tp, model.dim)
    output_bwd = (gemm_time_s(gpu, tokens, model.dim, model.vocab_size // par.tp)
                  + gemm_time_s(gpu, model.dim, model.vocab_size // par.tp, tokens))
    loss_ew = loss_elementwise_bytes_per_token(model, executor.logits_bytes) * tokens / par.tp / gpu.hbm_bytes_per_s
    # runtime/loss.py checkpoints the output projection + loss per chunk of tokens, with or
    # without TP (loss_parallel on vocab shards under TP): forward runs again in backward.
    chunked = executor.loss_chunk_tokens is not None
    root_compute = output_fwd + output_bwd + loss_ew
    root_recompute = output_fwd + loss_ew / 3 if chunked else 0.0
    # Under TP the output projection's input is all-gathered from the sequence shards
    # (forward; again in the chunked recompute) and its grad reduce-scattered: exposed.
    root_tp = 0.0
    if par.tp > 1:
        hidden = a * tokens * model.dim
        gather = collective_seconds(cluster, par, order, "all_gather", ("tp",), hidden)
        root_tp = gather * (2 if chunked else 1) + collective_seconds(cluster, par, order, "reduce_scatter",
                                                                       ("tp",), hidden)

    n_layers = model.n_layers
    compute = n_layers * (layer.forward_s + layer.backward_s) + root_compute
    tp_comm = n_layers * layer.tp_comm_s + root_tp
    cp_comm = n_layers * layer.cp_comm_s
    # FSDP root unit (embedding, final norm, output): FSDP2 gathers it before the first
    # block and does not reshard it after forward (the root is needed again at once);
    # its reduce-scatter (+ HSDP all-reduce) follows the last gradient: both exposed.
    root_bytes = model.root_params / par.tp
    root_gather, root_scatter, root_replicate = _fsdp_block_comm_s(
        cluster, par, tuple(order), root_bytes, cfg.precision.param_bytes, cfg.precision.grad_reduce_bytes)
    root_fsdp = root_gather + root_scatter + root_replicate
    # The first block's gather and the last block's reduce-scatter cannot hide either.
    block_tail = layer.fsdp_first_gather_s + layer.fsdp_last_scatter_s
    fsdp_tail = root_fsdp + block_tail
    # The rest of the blocks' FSDP traffic hides behind compute, minus the time the same
    # links carry context-parallel traffic that itself hides behind attention.
    shared = 0.0
    if par.cp > 1 and layer.cp_hidden_comm_s > 0 and par.fsdp_degree > 1:
        if group_tier(cluster, par, order, ("cp",)) == group_tier(cluster, par, order, ("dp_shard", "cp")):
            shared = n_layers * layer.cp_hidden_comm_s
    fsdp_hideable = max(0.0, n_layers * layer.fsdp_comm_s - block_tail) + shared
    return TimeTerms(
        base_s=compute + root_recompute + tp_comm + cp_comm + fsdp_tail,
        hiding_compute_s=compute + root_recompute,
        fsdp_comm_s=fsdp_hideable,
        fsdp_tail_s=fsdp_tail,
        recompute_s=dict(layer.recompute_s),
        recompute_comm_s={"none": 0.0, "selective": layer.tp_selective_recompute_comm_s,
                          "full": layer.tp_recompute_comm_s + layer.cp_recompute_comm_s},
        optimizer_s=optimizer_time_s(model, gpu, cfg, executor),
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
    if cfg.parallelism.pp > 1:
        from .pipeline import pipeline_step_estimate
        return pipeline_step_estimate(model, cluster, cfg, executor)
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
    exposed_tp = (terms.tp_comm_s + n_full * layer.tp_recompute_comm_s
                  + counts["selective"] * layer.tp_selective_recompute_comm_s)
    exposed_cp = terms.cp_comm_s + n_full * layer.cp_recompute_comm_s
    compute = terms.compute_s
    optimizer = terms.optimizer_s

    tokens_per_gpu_per_step = cfg.seq_len * cfg.local_batch_size * cfg.grad_accum_steps / (par.cp * par.tp)
    throughput = tokens_per_gpu_per_step / step
    flops_per_token = flops.model_flops_per_token(model, cfg.seq_len)
    mfu = flops_per_token * throughput / gpu.bf16_flops_per_s
    executed = flops.step_forward_backward_flops(model, tokens, cfg.seq_len, par.cp, par.tp)
    executed_total = cfg.grad_accum_steps * sum(executed.values())
    time_breakdown = {
        "compute": ga * compute,
        "recompute": ga * recompute,
        "exposed_comm": ga * (exposed_tp + exposed_cp + exposed_fsdp),
        "exposed_tp_comm": ga * exposed_tp,
        "exposed_cp_comm": ga * exposed_cp,
        "exposed_fsdp_comm": ga * exposed_fsdp,
        "optimizer": optimizer,
        # Where the compute goes (forward + backward, no recompute), per step.
        "matmul": ga * model.n_layers * layer.matmul_s,
        "attention": ga * model.n_layers * layer.attention_s,
        "elementwise": ga * model.n_layers * layer.elementwise_s,
        "cp_elementwise": ga * model.n_layers * layer.cp_elementwise_s,
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
    out += [
        make_collective(cluster, par, order, "fsdp root unit all-gather (embedding, norm, output)", "all_gather",
                        fsdp, model.root_params / par.tp * prec.param_bytes, ga),
        make_collective(cluster, par, order, "fsdp root unit reduce-scatter", "reduce_scatter", fsdp,
                        model.root_params / par.tp * prec.grad_reduce_bytes, ga),
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
        dkv_fp32 = kv / par.cp / prec.activation_bytes * FP32
        if cfg.cp_impl == "allgather-kv":
            out.append(make_collective(cluster, par, order, "cp all-gather K/V", "all_gather", ("cp",), kv,
                                       (layers + n_full) * ga))
            out.append(make_collective(cluster, par, order, "cp reduce-scatter dK/dV", "reduce_scatter", ("cp",),
                                       kv, layers * ga))
        elif cfg.cp_impl == "ring-allgather":
            out.append(make_collective(cluster, par, order, "cp ring all-gather K/V (fwd + bwd)", "all_gather",
                                       ("cp",), kv, (2 * layers + n_full) * ga))
            out.append(make_collective(cluster, par, order, "cp ring dK/dV rotations (fp32)", "send_recv",
                                       ("cp",), dkv_fp32, par.cp * layers * ga))
        else:
            out.append(make_collective(cluster, par, order, "cp ring K/V rotations (fwd + bwd)", "send_recv",
                                       ("cp",), kv / par.cp, (2 * layers + n_full) * (par.cp - 1) * ga))
            out.append(make_collective(cluster, par, order, "cp ring dK/dV rotations (fp32)", "send_recv",
                                       ("cp",), dkv_fp32, par.cp * layers * ga))
    return out
