"""Pipeline parallelism: stages, bubble, per-stage memory and P2P, priced as runtime/pipeline.py runs it.

What the runtime does (runtime/pipeline.py, torch 2.13 ``torch.distributed.pipelining``):

- The model is cut between layers into ``pp x v`` stages (``v`` virtual stages, interleaved
  schedule only); when they do not divide evenly the earlier stages take one more layer.
  Stage ``s`` lives on pp rank ``s mod pp``. The embedding goes with stage 0, the final norm,
  output projection and loss with the last stage (pp rank ``pp - 1``). ``stage_layers``
  below is the split ``runtime.pipeline.stage_layers`` runs.
- Each local batch is split into ``m`` micro-batches. A step of the schedule takes
  ``(m + (pp - 1) / v) x t`` where ``t`` is one micro-batch's forward + backward on the
  slowest pp rank (all of its ``v`` chunks): GPipe and 1F1B idle ``(pp - 1) x t`` to fill
  and drain the pipeline, the interleaved schedule ``(pp - 1) / v x t`` (Narayanan et al.
  2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
  sec. 2.2.1-2.2.2: bubble fraction ``(p - 1) / m`` of the ideal time, ``/ v`` interleaved).
  The slowest rank sets the pace: the first holds the embedding (a lookup, cheap), the last
  the output projection and loss (at a 128k vocabulary, several blocks' worth of work).
- Activations in flight on pp rank ``r`` (torch 2.13 schedules.py): GPipe runs every
  forward first (``m`` micro-batches); 1F1B warms up with ``min(m, pp - r)`` forwards
  (``Schedule1F1B``: "first stage num_stages warmups"); Interleaved1F1B with
  ``min(m v, (v - 1) m_round + 2 (pp - 1 - r)) + 1`` chunk-forwards (``_get_warmup_ops``,
  ``m_round = m / max(1, m // pp)``), each one chunk (1 / v of the rank's layers). Rank 0 then
  holds ``pp + (pp - 1) / v`` micro-batches' worth (Korthikanti et al. 2022, sec. 4.2.3).
- FSDP2 under the schedule (``PipelineStage.backward_maybe_with_nosync``): every
  micro-batch backward runs with ``set_requires_gradient_sync(False)`` and
  ``set_reshard_after_backward(False)``; ``perform_reduce_grad`` reduces once after the
  last micro-batch. Blocks keep ``reshard_after_forward=True``. So per step each block is
  all-gathered about ``m + 1`` times (every forward re-gathers what the previous forward
  resharded, every backward re-gathers what the forward resharded; a backward following a
  backward finds it gathered), reduce-scattered once, and holds its unsharded gradient in
  the reduce dtype (``FSDPParam.to_accumulated_grad_if_needed``) from its first backward to
  the end of the step; after a backward its parameters stay gathered. The reduce-scatters
  run after the schedule: exposed.
- P2P: each micro-batch crosses each stage boundary once forward (activation) and once
  backward (its gradient): ``tokens / tp x d x 2`` bytes (bf16; sequence-parallel hidden
  states are sharded over tp). pp is the outermost mesh dim, so neighbours sit
  ``world / pp`` ranks apart: across the network unless the whole job is one node.
  One transfer is priced as ``comm.collective_time_s(send_recv)``; PyTorch's schedules wait
  for a stage's input before computing it, so these are exposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from .activations import layer_memory
from .comm import collective_time_s
from .config import AC_MODES, Parallelism, TrainConfig
from .executors import ExecutorProfile
from .memory import memory_terms, nccl_bytes
from .specs import ClusterSpec, ModelSpec
from .step import _fsdp_block_comm_s, layer_time, time_terms

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
FP32 = 4


def stage_layers(n_layers: int, stages: int) -> list[list[int]]:
    """Layer indices of each stage (``runtime.pipeline.stage_layers`` runs this split):
    earlier stages take one more layer when the split is uneven."""
    if stages < 1 or n_layers < stages:
        raise ValueError(f"{n_layers} layers cannot fill {stages} pipeline stages")
    base, extra = divmod(n_layers, stages)
    split, start = [], 0
    for s in range(stages):
        size = base + (1 if s < extra else 0)
        split.append(list(range(start, start + size)))
        start += size
    return split


def rank_layers(n_layers: int, pp: int, virtual: int = 1) -> list[list[int]]:
    """Layers each pp rank holds: stages ``r, r + pp, ...`` (the runtime's looped placement)."""
    return [list(layers) for layers in _rank_layers(n_layers, pp, virtual)]


@lru_cache(maxsize=1024)
def _rank_layers(n_layers: int, pp: int, virtual: int) -> tuple[tuple[int, ...], ...]:
    split = stage_layers(n_layers, pp * virtual)
    return tuple(tuple(i for v in range(virtual) for i in split[r + v * pp]) for r in range(pp))


def max_rank_layers(n_layers: int, pp: int, virtual: int = 1) -> int:
    """Layers on the most loaded pp rank."""
    return max(len(layers) for layers in _rank_layers(n_layers, pp, virtual))


def schedule_slots(pp: int, microbatches: int, virtual: int = 1) -> float:
    """Step time of one schedule run in units of one micro-batch on the slowest rank:
    ``m + (pp - 1) / v`` (Narayanan et al. 2021, sec. 2.2)."""
    return microbatches + (pp - 1) / virtual


def bubble_fraction(pp: int, microbatches: int, virtual: int = 1) -> float:
    """Share of the schedule's time a rank idles: ``((pp - 1) / v) / (m + (pp - 1) / v)``."""
    return ((pp - 1) / virtual) / schedule_slots(pp, microbatches, virtual)


def in_flight_microbatches(schedule: str, rank: int, pp: int, microbatches: int, virtual: int = 1) -> float:
    """Micro-batches' worth of this rank's saved activations alive at its peak (see module doc)."""
    if schedule == "gpipe":
        return float(microbatches)
    if schedule == "1f1b":
        return float(min(microbatches, pp - rank))
    rounds = max(1, microbatches // pp)
    per_round = microbatches // rounds
    chunks = min(microbatches * virtual, (virtual - 1) * per_round + 2 * (pp - 1 - rank) + 1)
    return chunks / virtual


def fsdp_gathers_per_step(microbatches: int) -> int:
    """All-gathers of one block per schedule run (module doc: ``m + 1``)."""
    return microbatches + 1


@lru_cache(maxsize=8192)
def micro_config(cfg: TrainConfig) -> TrainConfig:
    """One micro-batch of one stage, as a pp = 1 config: the per-layer cost models price it."""
    par = cfg.parallelism
    return replace(cfg, parallelism=Parallelism(par.dp_replicate, par.dp_shard, par.cp, par.tp, 1),
                   local_batch_size=cfg.local_batch_size // cfg.pp_microbatches, grad_accum_steps=1, ac=None,
                   pp_schedule="1f1b", pp_microbatches=1, pp_virtual_stages=1)


def p2p_bytes(model: ModelSpec, cfg: TrainConfig) -> float:
    """One micro-batch's hidden states on one rank (sequence-parallel: sharded over tp)."""
    micro = micro_config(cfg)
    return micro.tokens_per_gpu / cfg.parallelism.tp * model.dim * cfg.precision.activation_bytes


def p2p_tier(cluster: ClusterSpec) -> str:
    """pp is outermost: stage neighbours are world / pp ranks apart, so some boundary crosses
    the network unless the whole job fits in one node."""
    return "intra-node" if cluster.num_gpus <= cluster.ranks_per_node else "inter-node"


def p2p_seconds_per_microbatch(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig) -> float:
    """Exposed P2P per micro-batch on a middle rank: ``v`` activations forward and ``v``
    gradients backward (receives arrive on the other direction of the duplex link)."""
    one = collective_time_s(cluster, "send_recv", p2p_bytes(model, cfg), 2, p2p_tier(cluster))
    return 2 * cfg.pp_virtual_stages * one


@dataclass(frozen=True)
class StageCost:
    """One pp rank: its layers, time per micro-batch and memory at its peak."""

    rank: int
    layers: tuple[int, ...]
    first: bool
    last: bool
    in_flight: float  # micro-batches' worth of saved activations at the peak
    microbatch_s: float  # forward + backward (+ recompute, exposed comm, P2P) of one micro-batch
    parts_s: dict[str, float]  # microbatch_s by part: compute, recompute, tp, cp, fsdp, p2p
    tensor_bytes: float
    peak_bytes: float  # reserved peak + CUDA context + NCCL
    breakdown_bytes: dict[str, float]
    tensor_peak_phase: str = ""  # the forward + backward phase with the most tensor bytes
    phase_tensor_bytes: dict[str, float] = field(default_factory=dict)  # forward + backward phases
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # their breakdowns
    optimizer_tensor_bytes: float = 0.0  # the optimizer step's tensors

    @property
    def forward_backward_tensor_bytes(self) -> float:
        """Tensor peak outside the optimizer step (what a trace of forward + backward sees)."""
        return max(self.phase_tensor_bytes.values())


@dataclass(frozen=True)
class PipelineEstimate:
    stages: tuple[StageCost, ...]
    step_time_s: float
    schedule_s: float  # one schedule run (one gradient-accumulation step)
    bubble_fraction: float
    bubble_s: float  # per step
    p2p_s: float  # per step, exposed
    fsdp_exposed_s: float  # per step: end-of-schedule reduce-scatters + gathers not hidden
    optimizer_s: float
    compute_s: float  # per step on the slowest rank (forward + backward, no recompute)
    recompute_s: float
    exposed_tp_s: float = 0.0  # per step on the slowest rank
    exposed_cp_s: float = 0.0

    @property
    def peak_bytes(self) -> float:
        return max(s.peak_bytes for s in self.stages)

    @property
    def peak_stage(self) -> StageCost:
        return max(self.stages, key=lambda s: s.peak_bytes)

    @property
    def slowest_stage(self) -> StageCost:
        return max(self.stages, key=lambda s: s.microbatch_s)


@lru_cache(maxsize=4096)
def micro_layer_time(model: ModelSpec, cluster: ClusterSpec, micro: TrainConfig, executor: ExecutorProfile):
    """``layer_time`` of one micro-batch (cached: schedules and micro-batch counts share it)."""
    return layer_time(model, cluster, micro, executor)


@lru_cache(maxsize=4096)
def micro_parts(model: ModelSpec, cluster: ClusterSpec, micro: TrainConfig, executor: ExecutorProfile):
    """(layer_time, time_terms, memory_terms) of one micro-batch as a pp = 1 config (cached)."""
    return micro_layer_time(model, cluster, micro, executor), time_terms(model, cluster, micro, executor), \
        memory_terms(model, micro, executor)


def estimate_pipeline(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig, executor: ExecutorProfile,
                      layer_modes: tuple[str, ...]) -> PipelineEstimate:
    """Step time and per-stage memory of a pp > 1 layout with a per-layer AC assignment."""
    par = cfg.parallelism
    pp, m, v = par.pp, cfg.pp_microbatches, cfg.pp_virtual_stages
    micro = micro_config(cfg)
    layer, terms, mt = micro_parts(model, cluster, micro, executor)
    prec = cfg.precision
    tp, shards = par.tp, par.fsdp_degree
    block = model.params_per_layer / tp
    # Root parts of the pp = 1 terms (time_terms: compute = L (fwd + bwd) + root compute).
    root_compute = terms.compute_s - model.n_layers * (layer.forward_s + layer.backward_s)
    root_tp = terms.tp_comm_s - model.n_layers * layer.tp_comm_s
    # Collectives full / selective recompute repeats (as step.py: TP all-gathers, CP gathers).
    tp_again = {"none": 0.0, "selective": layer.tp_selective_recompute_comm_s, "full": layer.tp_recompute_comm_s}
    cp_again = {"none": 0.0, "selective": 0.0, "full": layer.cp_recompute_comm_s}
    gather = layer.fsdp_first_gather_s
    scatter = layer.fsdp_last_scatter_s  # reduce-scatter (+ HSDP all-reduce) of one block
    p2p = p2p_seconds_per_microbatch(model, cluster, cfg)
    embed = model.embedding_params / tp
    out = (model.output_params + model.dim) / tp
    comm = nccl_bytes(micro, executor) + executor.nccl_communicator_bytes + 2 * executor.nccl_alltoall_peer_bytes
    stages = []
    for r, layers in enumerate(_rank_layers(model.n_layers, pp, v)):
        first, last = r == 0, r == pp - 1
        modes = [layer_modes[i] for i in layers]
        k = len(layers)
        compute = k * (layer.forward_s + layer.backward_s) + (root_compute if last else 0.0)
        recompute = sum(layer.recompute_s[mode] for mode in modes) + (terms.root_recompute_s if last else 0.0)
        exposed_tp = k * layer.tp_comm_s + sum(tp_again[mode] for mode in modes) + (root_tp if last else 0.0)
        exposed_cp = k * layer.cp_comm_s + sum(cp_again[mode] for mode in modes)
        # FSDP gathers (m + 1 per block per run) hide behind the micro-batches' compute; the rest is exposed.
        gathers = k * gather * fsdp_gathers_per_step(m) / m if shards > 1 else 0.0
        exposed_fsdp = max(0.0, gathers - compute - recompute)
        t = compute + recompute + exposed_tp + exposed_cp + exposed_fsdp + p2p
        # --- memory at the rank's peak: the largest of its phases (``stage_memory_phases``)
        in_flight = in_flight_microbatches(cfg.pp_schedule, r, pp, m, v)
        phases = stage_memory_phases(model, cfg, executor, mt, modes, first, last, in_flight, r)
        name = max(phases, key=lambda key: sum(phases[key].values()))
        parts = phases[name]
        stage_params = k * block + (embed if first else 0.0) + (out if last else 0.0)
        root_params = (embed if first else 0.0) + (out if last else 0.0)
        optimizer_phase = (parts["params"] + parts["optimizer"] + stage_params / shards * prec.master_bytes
                           + mt.optimizer_temp_bytes)
        tensor = max(sum(parts.values()), optimizer_phase)
        stranded = mt.loss_stranded_bytes if last else 0.0
        ag_pool = prec.param_bytes * max(root_params, min(executor.fsdp_blocks_in_flight, k) * block)
        rs_pool = stage_params / shards * prec.master_bytes
        reserved = (tensor + stranded) * (1 + mt.fragmentation) + ag_pool + rs_pool
        overhead = reserved - tensor + executor.cuda_context_bytes
        breakdown = dict(parts, grads=0.0, comm_buffers=comm, overhead=overhead)
        peak = tensor + overhead + comm
        parts_s = {"compute": compute, "recompute": recompute, "tp": exposed_tp, "cp": exposed_cp, "fsdp": exposed_fsdp,
                   "p2p": p2p}
        stages.append(StageCost(r, tuple(layers), first, last, in_flight, t, parts_s, tensor, peak, breakdown,
                                tensor_peak_phase=name,
                                phase_tensor_bytes={key: sum(phase.values()) for key, phase in phases.items()},
                                phases=phases, optimizer_tensor_bytes=optimizer_phase))
    slow = max(stages, key=lambda s: s.microbatch_s)
    slowest = slow.microbatch_s
    slots = schedule_slots(pp, m, v)
    schedule_s = slots * slowest
    # After the schedule: rank 0 finishes last and reduce-scatters its blocks and the root.
    # Its embedding unit (the FSDP root of stage 0) is gathered once before the first
    # forward and reduced at the end: exposed too.
    k0 = len(stages[0].layers)
    embed_gather, embed_scatter, embed_replicate = _fsdp_block_comm_s(
        cluster, par, tuple(cfg.mesh_order), embed, prec.param_bytes, prec.grad_reduce_bytes)
    tail = k0 * scatter + embed_gather + embed_scatter + embed_replicate
    ga = cfg.grad_accum_steps
    optimizer = terms.optimizer_s * max(s.breakdown_bytes["params"] for s in stages) / max(
        1.0, model.num_params / tp / shards * prec.master_bytes)
    step = ga * (schedule_s + tail) + optimizer
    return PipelineEstimate(
        stages=tuple(stages), step_time_s=step, schedule_s=schedule_s,
        bubble_fraction=bubble_fraction(pp, m, v), bubble_s=ga * (slots - m) * slowest,
        p2p_s=ga * m * p2p, fsdp_exposed_s=ga * (tail + m * slow.parts_s["fsdp"]), optimizer_s=optimizer,
        compute_s=ga * m * slow.parts_s["compute"], recompute_s=ga * m * slow.parts_s["recompute"],
        exposed_tp_s=ga * m * slow.parts_s["tp"], exposed_cp_s=ga * m * slow.parts_s["cp"])


def stage_memory_phases(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile, mt, modes: list[str],
                        first: bool, last: bool, in_flight: float, rank: int = 0) -> dict[str, dict[str, float]]:
    """Tensor bytes of one pp rank in each phase of a steady-state schedule step, by part.

    What the runtime holds (traced op by op, tests/test_pipeline_trace.py): the rank's
    sharded params and AdamW states; every unit's gathered params and its unsharded
    gradient accumulated in the reduce dtype (no-sync: reduced once, after the schedule);
    ``in_flight`` micro-batches' saved activations, the schedule's receive buffers (one per
    micro-batch, each way) and the local batch's token ids. On top of that, one of:

    - ``layer_backward``: a block's backward working set, with the w2 weight grad already
      written (bf16), or the block's whole bf16 grads just before FSDP2's post-backward
      adds them to the accumulated ones (no reduce-scatter input: no-sync); on the last
      stage the output projection's bf16 grad is held too (its unit, the stage's FSDP
      root, accumulates only after the stage's whole backward); the worst block of the
      walk from the top (saved activations shrink, gathered blocks grow);
    - ``loss`` (last stage): the final norm's and loss's tensors of one micro-batch; under
      1F1B the stage's blocks are resharded then (its forward just ran), under GPipe not;
    - ``norm_backward`` (last stage): the final norm's backward (its fp32 temporaries),
      the output projection's grad written;
    - ``embedding_backward`` (first stage): the dense [vocab, d] embedding grad in the
      param dtype and its incoming grad, with the other in-flight micro-batches' saved
      activations. Under TP DTensor writes that grad dense on every TP rank (pp = 1's
      ``embedding_backward`` phase) and, with no reduce between micro-batches, FSDP2
      accumulates it at that size: the first stage keeps a full-vocabulary accumulated
      embedding grad instead of its vocab / tp rows;
    - ``reduce`` (FSDP over > 1 rank): after the schedule each unit's accumulated grads
      are copied into a reduce-scatter input and its output allocated (the root unit,
      resharded by then, is the largest).
    """
    par, prec = cfg.parallelism, cfg.precision
    tp, shards = par.tp, par.fsdp_degree
    micro = micro_config(cfg)
    tokens = micro.tokens_per_gpu
    a = prec.activation_bytes
    block = model.params_per_layer / tp
    embed = model.embedding_params / tp
    out = (model.output_params + model.dim) / tp
    k = len(modes)
    root = (embed if first else 0.0) + (out if last else 0.0)
    stage_params = k * block + root
    accumulated = stage_params * prec.grad_reduce_bytes
    if first and tp > 1:
        accumulated += (model.embedding_params - embed) * prec.grad_reduce_bytes
    common = {
        "params": stage_params / shards * prec.master_bytes,
        "optimizer": stage_params / shards * prec.optimizer_state_bytes,
        "fsdp_unsharded": stage_params * prec.param_bytes + accumulated,
    }
    ids = mt.input_bytes  # int64 ids and labels of one micro-batch
    # PipelineStage allocates a receive buffer per micro-batch up front and keeps them
    # (torch 2.13 stage.py, _setup_forward_recv_info / _setup_backward_recv_info): one for
    # the activation into every stage but the first, one for the grad into every stage but
    # the last. The local batch's ids and labels are alive all step.
    n_stages = par.pp * cfg.pp_virtual_stages
    receives = sum((s != 0) + (s != n_stages - 1) for s in range(rank, n_stages, par.pp))
    buffers = receives * cfg.pp_microbatches * p2p_bytes(model, cfg) + cfg.pp_microbatches * ids
    saved_one = sum(mt.layer.saved[mode] for mode in modes)  # one micro-batch, every chunk of the rank
    saved = in_flight * saved_one
    raw = layer_memory(model, micro, executor)
    first_grads = model.dim * model.ffn_dim / tp * prec.param_bytes  # w2's weight grad
    output_grad = model.output_params / tp * prec.param_bytes
    # A micro-batch's backward walks the rank's blocks from the top. At block j the other
    # in-flight micro-batches' activations are all saved, this one's up to block j. Under
    # 1F1B a forward ran since the blocks' last backward and resharded them: block j and
    # those above it (gathered by this backward, kept: reshard_after_backward=False) are
    # gathered (the traces show no block prefetched below); under GPipe all stay gathered.
    # Block j's own moment is the larger of its SwiGLU backward (all its saved tensors, the
    # gradient temporaries, w2's weight grad) and its end (traced: the attention norm's
    # backward with every weight grad of the block written in bf16, the block's other
    # saved tensors freed, the RMSNorm backward's fp32 temporaries as for the final norm).
    norm_in = a * tokens * model.dim / tp + FP32 * tokens / tp
    phases: dict[str, dict[str, float]] = {}
    best = -1.0
    for j in range(k - 1, -1, -1):
        mode = modes[j]
        gathered = k if cfg.pp_schedule == "gpipe" else k - j
        own = mt.layer.saved[mode]
        moment = max(own + raw.working[mode] + first_grads,
                     min(own, norm_in) + block * prec.param_bytes + mt.norm_backward_working_bytes)
        phase = dict(common, fsdp_unsharded=(root + gathered * block) * prec.param_bytes + accumulated,
                     activations=(in_flight - 1) * saved_one + sum(mt.layer.saved[m] for m in modes[:j]) + buffers,
                     recompute_working=moment, logits_loss=output_grad if last else 0.0)
        if sum(phase.values()) > best:
            best, phases["layer_backward"] = sum(phase.values()), phase
    if last:
        # 1F1B / interleaved: the last stage's backward of a micro-batch follows its forward
        # at once, and the forward resharded the stage's blocks (reshard_after_forward): the
        # loss runs with only the root unit gathered. GPipe ran every forward first; from
        # the second micro-batch's loss on, the blocks stay gathered since their backward.
        resharded = 0.0
        if cfg.pp_schedule != "gpipe":
            resharded = len(stage_layers(model.n_layers, par.pp * cfg.pp_virtual_stages)[-1]) * block
        loss_common = dict(common, fsdp_unsharded=common["fsdp_unsharded"] - resharded * prec.param_bytes)
        phases["loss"] = dict(loss_common, activations=saved + buffers + mt.root_activation_bytes,
                              recompute_working=0.0, logits_loss=mt.loss_logits_bytes)
        if mt.norm_backward_working_bytes:
            # The final norm's backward (pp = 1's norm_backward phase): its fp32 temporaries
            # and incoming grad, with its saved input and the output projection's bf16 grad.
            phases["norm_backward"] = dict(loss_common, activations=saved + buffers + mt.final_norm_saved_bytes,
                                           recompute_working=mt.norm_backward_working_bytes,
                                           logits_loss=output_grad)
    if first:
        incoming = a * tokens * model.dim  # the embedding output's grad (gathered over the sequence under TP)
        dense = model.embedding_params * prec.param_bytes
        phases["embedding_backward"] = dict(common, activations=max(0.0, in_flight - 1) * saved_one + buffers,
                                            recompute_working=dense + incoming, logits_loss=0.0)
    if shards > 1:
        unit = max(root, block) * prec.grad_reduce_bytes * (1 + 1 / shards)
        phases["reduce"] = dict(common, fsdp_unsharded=common["fsdp_unsharded"] - root * prec.param_bytes,
                                activations=buffers, recompute_working=unit, logits_loss=0.0)
    return phases


def rank_counts_policy(n_layers: int, pp: int, virtual: int, counts: dict[str, int]) -> tuple[str, ...]:
    """A per-layer AC assignment from per-rank counts: on every pp rank the first
    ``counts['full']`` of its layers full, the next ``counts['selective']`` selective,
    the rest none (a rank with fewer layers takes as many as it has)."""
    modes = ["none"] * n_layers
    for layers in _rank_layers(n_layers, pp, virtual):
        nf = min(counts.get("full", 0), len(layers))
        ns = min(counts.get("selective", 0), len(layers) - nf)
        for j, i in enumerate(layers):
            modes[i] = "full" if j < nf else ("selective" if j < nf + ns else "none")
    return tuple(modes)


__all__ = ["AC_MODES", "SCHEDULES", "PipelineEstimate", "StageCost", "bubble_fraction", "estimate_pipeline",
           "in_flight_microbatches", "max_rank_layers", "micro_config", "micro_layer_time", "micro_parts", "p2p_bytes", "p2p_seconds_per_microbatch", "p2p_tier",
           "rank_counts_policy", "rank_layers", "schedule_slots", "stage_layers", "FP32"]


def pipeline_step_estimate(model: ModelSpec, cluster: ClusterSpec, cfg: TrainConfig, executor: ExecutorProfile):
    """``estimate_step`` for pp > 1: the slowest rank's time, the worst rank's memory."""
    from . import flops
    from .step import StepEstimate

    par = cfg.parallelism
    modes = cfg.ac_policy(model.n_layers).layer_modes
    est = estimate_pipeline(model, cluster, cfg, executor, modes)
    worst = est.peak_stage
    # Tokens per GPU per step: the global batch over all GPUs (a pp rank runs 1 / pp of the layers).
    tokens_per_gpu_per_step = cfg.seq_len * cfg.local_batch_size * cfg.grad_accum_steps / (par.cp * par.tp * par.pp)
    throughput = tokens_per_gpu_per_step / est.step_time_s
    flops_per_token = flops.model_flops_per_token(model, cfg.seq_len)
    executed = flops.step_forward_backward_flops(model, cfg.tokens_per_gpu, cfg.seq_len, par.cp, par.tp)
    time_breakdown = {
        "compute": est.compute_s,
        "recompute": est.recompute_s,
        "exposed_comm": est.p2p_s + est.fsdp_exposed_s + est.exposed_tp_s + est.exposed_cp_s,
        "exposed_tp_comm": est.exposed_tp_s,  # on the slowest pp rank
        "exposed_cp_comm": est.exposed_cp_s,
        "exposed_fsdp_comm": est.fsdp_exposed_s,
        "optimizer": est.optimizer_s,
        "pipeline_bubble": est.bubble_s,
        "pipeline_p2p": est.p2p_s,
    }
    slowest = est.slowest_stage
    return StepEstimate(
        peak_memory_bytes=est.peak_bytes,
        memory_breakdown_bytes=dict(worst.breakdown_bytes),
        memory_capacity_bytes=float(cluster.gpu.memory_bytes),
        fits=est.peak_bytes <= cluster.gpu.memory_bytes,
        step_time_s=est.step_time_s,
        tokens_per_second_per_gpu=throughput,
        mfu=flops_per_token * throughput / cluster.gpu.bf16_flops_per_s,
        flops_per_token=flops_per_token,
        executed_flops_per_step=cfg.grad_accum_steps * sum(executed.values()) / par.pp,
        time_breakdown_s=time_breakdown,
        pipeline=est,
        stage_peak_bytes=tuple(s.peak_bytes for s in est.stages),
        slowest_stage=slowest.rank,
    )
