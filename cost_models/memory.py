"""Peak memory of one training step on one GPU, as a breakdown of what is alive then.

The step goes through phases; each holds a different set of tensors, and the peak is
the largest phase, not the sum of everything:

- forward of the loss: all saved activations + the logits / loss working set;
- backward of layer ``l`` (layers run backward from the last): saved activations of
  layers ``<= l`` + that layer's working set (its recomputed forward under AC and the
  gradient temporaries) + FSDP's gathered params and grads for the blocks in flight +
  the sharded grads already reduced for layers ``> l``;
- the optimizer step: sharded params, grads and both AdamW states.

Per-layer saved activations follow the runtime's model (runtime/model.py): with ``T``
tokens on this GPU (``local_batch x seq_len / cp``), ``a`` bytes per activation element,
``d`` model dim, ``d_q``/``d_kv`` query/key-value widths, ``f`` FFN width, ``H`` heads:

- ``none``: norm inputs ``2 d`` (sequence-sharded under TP) + fp32 rstd, the norm
  outputs that feed the column-parallel matmuls ``2 d`` (gathered under SP), q after
  RoPE, K and V at kv-head width (the whole sequence under all-gather CP), the
  attention output (``wo``'s input is a view of it) + its fp32 log-sum-exp, and the
  SwiGLU tensors w1 out, silu out, w3 out, their product (``4 f``);
- ``selective``: the block input + every matmul output (q, k, v, wo, w1, w3, w2) + the
  attention output and lse; the element-wise ops are recomputed;
- ``full``: the block input only.

Selective AC is the executor's: ``ExecutorProfile.selective_saves`` names what one block
keeps (``save_bytes``). torchtitan's per-op policy recomputes every second mm, so it
keeps wq, wv, w1, w2 of the seven; per-block torch.compile drops saves no backward op
reads. tests/test_torchtitan_profile.py checks both against a trace of the policy.

Under PyTorch's ring CP the attention's transients (gathered K/V, fp32 merge and grad
accumulators, rotation buffers; ``ring_attention_bytes``) enter the backward working set
and a "forward" phase (all saved activations + the last layer's forward transient).

What a GPU reports is not the tensor peak. ``MemoryEstimate.reserved_peak_bytes`` is the
caching allocator's reserved peak (torchtitan's logged memory): per phase, (tensors + the
loss's stranded blocks, from ``simulate_allocator`` over the loss's request sequence) x
(1 + a fitted fragmentation remainder) + the pools of FSDP2's side streams (all-gather
outputs; reduce-scatter outputs = sharded grads). ``peak_bytes`` adds the CUDA context
and NCCL (per communicator, per all-to-all peer), which live outside the allocator.
The per-block and loss terms live in ``activations.py``, the allocator simulation in
``allocator.py``, the phases and their closed form in ``phases.py``; this module
composes the terms and the estimate.
For the planner's linear constraints the stranded blocks and the ring forward phase are
folded into ``loss_working_bytes`` and the pools into ``fixed_overhead_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .activations import (
    LayerMemory,
    layer_memory,
    loss_chunk_tokens,
    loss_working_bytes,
    ring_attention_bytes,
    save_bytes,
    selective_saves,
    torchtitan_layer_sac_modes,
)
from .allocator import allocator_loss_stranded_bytes, simulate_allocator
from .config import AC_MODES, TrainConfig
from .executors import ExecutorProfile, resolve_executor
from .phases import MemoryTerms
from .specs import ModelSpec

FP32 = 4
INDEX_BYTES = 8  # int64 token ids and labels


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: float
    breakdown_bytes: dict[str, float]
    peak_phase: str
    tensor_peak_bytes: float  # what a traced / torch.cuda.max_memory_allocated peak sees
    phase_tensor_bytes: dict[str, float] = field(default_factory=dict)
    reserved_peak_bytes: float = 0.0  # caching allocator's reserved peak (no context / NCCL)
    tensor_peak_phase: str = ""  # the phase of tensor_peak_bytes (peak_phase is the reserved one)
    # breakdown_bytes["overhead"] in parts: CUDA context, FSDP2 side-stream pools, the loss's
    # stranded blocks, the fitted fragmentation remainder.
    overhead_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def forward_backward_tensor_peak_bytes(self) -> float:
        """Tensor peak outside the optimizer step (what a trace of forward + backward sees)."""
        return max(v for k, v in self.phase_tensor_bytes.items() if k != "optimizer")


def memory_terms(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile | str | None = None
                 ) -> MemoryTerms:
    executor = resolve_executor(executor)
    par = cfg.parallelism
    prec = cfg.precision
    tp, shards = par.tp, par.fsdp_degree
    tokens = cfg.tokens_per_gpu
    a = prec.activation_bytes

    block_params = model.params_per_layer / tp
    root_params = model.root_params / tp
    sharded = (model.num_params / tp) / shards
    static = sharded * (prec.master_bytes + prec.optimizer_state_bytes)
    grad_per_layer = block_params / shards * prec.master_bytes
    grad_root = root_params / shards * prec.master_bytes

    gathered_block = block_params * prec.param_bytes
    forward_blocks = 0.0 if executor.fsdp_last_block_resharded else gathered_block
    # Backward: the block being computed + the next one prefetched (when there is one).
    # Its unsharded grads appear op by op: at the widest moment of its backward (the
    # SwiGLU product, the block's first backward ops) only w2's weight grad exists.
    # FSDP2's post-backward then reshards the block's params and copies all its grads
    # into a reduce-dtype buffer for the reduce-scatter, after the block's activations
    # are gone: that moment competes with the working set (a max, folded into
    # LayerMemory.working), it does not add to it.
    in_flight = min(executor.fsdp_blocks_in_flight, model.n_layers)
    backward_blocks = in_flight * gathered_block
    # Block 0 has no block below it to prefetch (the root unit is already gathered).
    no_prefetch_saving = gathered_block if in_flight > 1 else 0.0
    first_grads = model.dim * model.ffn_dim / tp * prec.param_bytes
    all_grads = block_params * prec.param_bytes
    reduce_copy = block_params * prec.grad_reduce_bytes if prec.grad_reduce_bytes != prec.param_bytes else 0.0
    output_grad = model.vocab_size * model.dim / tp * prec.param_bytes
    # End of backward: the root unit (embedding, final norm, output) is resharded and its
    # grads reduced: unsharded grads + their reduce-dtype copy.
    root_reduce = root_params * prec.param_bytes + (root_params * prec.grad_reduce_bytes
                                                    if prec.grad_reduce_bytes != prec.param_bytes else 0.0)
    # FSDP2 keeps the last reduce-scatter's input (the block's grads in the reduce dtype,
    # unsharded) until the next block's post-backward (torch 2.13 _fsdp_param_group.py,
    # reduce_scatter_states, max_input_buffers=1): every block but the top one runs its
    # backward next to the one above's; its own post-backward frees it first.
    held_reduce_input = block_params * prec.grad_reduce_bytes if model.n_layers > 1 else 0.0
    layer = layer_memory(model, cfg, executor)
    post_backward = all_grads + reduce_copy - gathered_block
    top_working = {m: max(w + first_grads, post_backward) for m, w in layer.working.items()}
    layer = LayerMemory(saved=layer.saved,
                        working={m: max(w + first_grads + held_reduce_input, post_backward)
                                 for m, w in layer.working.items()})

    norm_in = a * tokens * model.dim / tp + FP32 * tokens / tp
    normed = a * tokens * model.dim  # gathered for the column-parallel output projection
    ids = 2 * INDEX_BYTES * tokens
    root_activations = norm_in + normed + ids

    loss_extra = 0.0
    if executor.loss_num_chunks and loss_chunk_tokens(cfg, executor) < tokens:
        # torchtitan 0.3 ChunkedLossWrapper: contiguous copies of every hidden-state chunk
        # (a x T x d) and the fp32 GradAccumulator buffer for d(hidden) (4 x T x d).
        loss_extra = (a + FP32) * tokens * model.dim
    elif loss_chunk_tokens(cfg, executor) < tokens:
        # Our runtime's chunks are checkpointed slices of the hidden states (runtime/loss.py):
        # autograd accumulates d(hidden) over the chunks in one T x d tensor, alive while
        # the later chunks run backward, by adding each chunk's slice_backward (a zero-
        # padded T x d tensor) to it: at that add the accumulator, the padded grad and
        # their sum (3 x T x d) are alive, the chunk's logits already freed. At TP 8 and
        # 64k local tokens that moment outgrows the chunk's own working set.
        hidden_grad = a * tokens * model.dim
        loss_extra = max(hidden_grad, 3 * hidden_grad - loss_working_bytes(model, cfg, executor))

    forward_working = 0.0
    if cfg.cp_impl in ("ring-allgather", "ring-alltoall") and par.cp > 1:
        forward_working = ring_attention_bytes(model, cfg, executor)[0]
    # The final norm's backward: its fp32 temporaries + the incoming grad of its output
    # (gathered for the column-parallel output projection under TP), with every block's
    # saved activations, the root's gathered params + output-projection grad and the
    # first blocks prefetched for backward alive.
    wide = max(a, FP32)
    norm_temps = 1.0 if executor.compile else executor.norm_backward_fp32_temporaries
    norm_backward = norm_temps * wide * tokens * model.dim / tp + a * tokens * model.dim

    # Caching-allocator pools of FSDP2's side streams (torch 2.13 _fsdp_collectives.py):
    # foreach_all_gather allocates the all-gather output (the unit's unsharded params,
    # param dtype) on the all-gather copy-in stream - the root unit's, or the blocks in
    # flight - and foreach_reduce allocates the reduce-scatter output on the
    # reduce-scatter stream, which the sharded grads keep as views until zero_grad.
    root_unit = root_params / 2 if executor.fsdp_root_units == 2 and not model.tie_embeddings else root_params
    ag_pool = prec.param_bytes * max(root_unit, in_flight * block_params)
    rs_pool = model.n_layers * grad_per_layer + grad_root
    # TP's vocab-sharded embedding (RowwiseParallel, ours and torchtitan's): DTensor has no
    # strategy that writes embedding_dense_backward's grad sharded by vocabulary rows
    # (torch 2.13 distributed/tensor/_ops/_embedding_ops.py), so each TP rank gathers the
    # incoming grad over the sequence (tokens x d) and writes a dense [vocab, d] grad in
    # the param dtype, then copies out its own rows. Meanwhile every block's grads are
    # reduced, FSDP2 still holds the last block's reduce-scatter input (reduce dtype) until
    # the next reduce-scatter, and the root's params are gathered; with one root unit its
    # output-projection grad is still unsharded, with torchtitan 0.3's two units the
    # [norm, output] unit was reduced before the blocks ran backward.
    # A tied weight's two grads are then summed into a third tensor of the rank's rows.
    embedding_backward = embedding_unsharded = embedding_grads = 0.0
    if tp > 1:
        own_rows = model.vocab_size / tp * model.dim * prec.param_bytes
        copies = 2 if model.tie_embeddings else 1
        embedding_backward = (model.vocab_size * model.dim * prec.param_bytes
                              + max(a * tokens * model.dim, copies * own_rows))
        block_0_reduce_input = block_params * prec.grad_reduce_bytes
        if executor.fsdp_root_units == 2 and not model.tie_embeddings:
            embedding_unsharded = root_params * prec.param_bytes + block_0_reduce_input
            embedding_grads = model.n_layers * grad_per_layer + grad_root / 2
        else:
            embedding_unsharded = root_params * prec.param_bytes + output_grad + block_0_reduce_input
            embedding_grads = model.n_layers * grad_per_layer
    loss_logits = (loss_working_bytes(model, cfg, executor) + loss_extra
                   + (output_grad if loss_chunk_tokens(cfg, executor) < tokens else 0.0))
    stranded = allocator_loss_stranded_bytes(model, cfg, executor)
    return MemoryTerms(
        static_bytes=static,
        sharded_grad_bytes_per_layer=grad_per_layer,
        sharded_grad_bytes_root=grad_root,
        # The root unit stays gathered (FSDP2 never reshards the root after forward); with
        # the embedding in its own unit (0.3) it is resharded after forward and only
        # [norm, lm_head] (not resharded by torchtitan's choice) stays gathered.
        root_unsharded_bytes=root_params * prec.param_bytes * (
            0.5 if executor.fsdp_root_units == 2 and not model.tie_embeddings else 1.0),
        root_activation_bytes=root_activations,
        input_bytes=ids,
        # With several loss chunks, the output projection's unsharded grad (accumulated
        # over chunks) is alive while later chunks run backward.
        loss_working_bytes=max(loss_logits + stranded,
                               forward_working + backward_blocks - forward_blocks + ids - root_activations,
                               norm_backward + backward_blocks - forward_blocks + output_grad + ids + norm_in
                               - root_activations),
        norm_backward_working_bytes=norm_backward,
        final_norm_saved_bytes=norm_in,
        loss_logits_bytes=loss_logits,
        forward_block_bytes=forward_blocks,
        backward_block_bytes=backward_blocks,
        root_grad_bytes=output_grad,
        root_reduce_bytes=root_reduce,
        top_layer_working=top_working,
        first_layer_block_saving_bytes=no_prefetch_saving,
        embedding_backward_working_bytes=embedding_backward,
        embedding_backward_unsharded_bytes=embedding_unsharded,
        embedding_backward_grad_bytes=embedding_grads,
        # AdamW (foreach=False) updates one parameter at a time: sqrt(v), its bias-
        # corrected copy and the update are three fp32 temporaries of that shard.
        optimizer_temp_bytes=3 * prec.master_bytes * max(model.vocab_size * model.dim, model.dim * model.ffn_dim,
                                                         model.dim * model.q_dim) / tp / shards,
        layer=layer,
        comm_buffer_bytes=nccl_bytes(cfg, executor),
        # CUDA context + the side-stream allocator pools: bytes the tensor budget never gets.
        fixed_overhead_bytes=executor.cuda_context_bytes + ag_pool + rs_pool,
        fragmentation=executor.allocator_fragmentation,
        n_layers=model.n_layers,
        forward_working_bytes=forward_working,
        allocator_pool_bytes=ag_pool + rs_pool,
        loss_stranded_bytes=stranded,
    )


def nccl_communicators(cfg: TrainConfig) -> int:
    """NCCL communicators one rank creates: one per process group that runs a collective
    (ProcessGroupNCCL creates its communicator lazily on first use): FSDP's (dp_shard x
    cp flattened), TP's, CP's (attention), HSDP's replicate group. A 1-D mesh over the
    whole world reuses the default group (one communicator)."""
    par = cfg.parallelism
    groups = [par.fsdp_degree, par.tp, par.cp, par.dp_replicate]
    return sum(1 for size in groups if size > 1)


def nccl_bytes(cfg: TrainConfig, executor: ExecutorProfile) -> float:
    """NCCL device memory (outside the caching allocator): per communicator, plus per
    all-to-all peer. PyTorch's ring CP rotates dK/dV with ``permute_tensor``
    (all_to_all_single) in backward, for both rotate methods, and the alltoall rotater
    also K/V in forward: each rank sends to one peer and receives from another, one
    peer-pair's worth of connections (NCCL #986: a connection per peer)."""
    peers = 1 if (cfg.cp_impl in ("ring-allgather", "ring-alltoall") and cfg.parallelism.cp > 1) else 0
    return nccl_communicators(cfg) * executor.nccl_communicator_bytes + peers * executor.nccl_alltoall_peer_bytes


def estimate_memory(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile | str | None = None
                    ) -> MemoryEstimate:
    """Peak bytes one GPU needs: the caching allocator's reserved peak + CUDA context +
    NCCL, with the breakdown of the phase that sets it."""
    terms = memory_terms(model, cfg, executor)
    modes = cfg.ac_policy(model.n_layers).layer_modes
    if len(modes) != model.n_layers:
        raise ValueError(f"activation checkpoint policy has {len(modes)} layers, model has {model.n_layers}")
    phases = terms.phases(modes)
    tensor = {k: sum(v.values()) - v.get("comm_buffers", 0.0) - v.get("allocator_stranded", 0.0)
              for k, v in phases.items()}
    reserved = terms.reserved_phase_bytes(modes)
    phase_name = max(reserved, key=lambda name: reserved[name])
    context = terms.fixed_overhead_bytes - terms.allocator_pool_bytes
    breakdown = dict(phases[phase_name])
    # The names scripts read (design.md): params, grads, optimizer, activations, ...
    sharded = breakdown.pop("params_and_optimizer")
    prec = cfg.precision
    per_byte = sharded / (prec.master_bytes + prec.optimizer_state_bytes)
    ordered = {
        "params": per_byte * prec.master_bytes,
        "grads": breakdown.pop("grads", 0.0),
        "optimizer": per_byte * prec.optimizer_state_bytes,
        "fsdp_unsharded": breakdown.pop("fsdp_unsharded", 0.0),
        "activations": breakdown.pop("activations", 0.0),
        "recompute_working": breakdown.pop("recompute_working", 0.0),
        "logits_loss": breakdown.pop("logits_loss", 0.0),
        "comm_buffers": breakdown.pop("comm_buffers", 0.0),
        # Everything not a tensor nor NCCL: CUDA context + the caching allocator's reserve
        # (details in MemoryEstimate.overhead_bytes).
        "overhead": context + reserved[phase_name] - tensor[phase_name],
    }
    stranded = breakdown.pop("allocator_stranded", 0.0)
    assert not breakdown, breakdown
    overhead = {
        "cuda_context": context,
        "allocator_side_stream_pools": terms.allocator_pool_bytes,
        "allocator_stranded": stranded,
        "allocator_fragmentation": reserved[phase_name] - tensor[phase_name] - stranded - terms.allocator_pool_bytes,
    }
    return MemoryEstimate(
        peak_bytes=sum(ordered.values()),
        breakdown_bytes=ordered,
        peak_phase=phase_name,
        tensor_peak_bytes=max(tensor.values()),
        phase_tensor_bytes=tensor,
        reserved_peak_bytes=reserved[phase_name],
        tensor_peak_phase=max(tensor, key=lambda name: tensor[name]),
        overhead_bytes=overhead,
    )


def predict_reserved_peak_bytes(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile | str | None = None,
                                fragmentation: float | None = None) -> float:
    """Peak reserved caching-allocator bytes (``torch.cuda.max_memory_reserved``, what
    torchtitan logs as memory), for the calibration. ``fragmentation`` overrides the
    profile's fitted remainder."""
    executor = resolve_executor(executor)
    if fragmentation is not None:
        executor = executor.with_overrides(allocator_fragmentation=fragmentation)
    return estimate_memory(model, cfg, executor).reserved_peak_bytes


__all__ = ["AC_MODES", "LayerMemory", "MemoryEstimate", "MemoryTerms", "estimate_memory", "layer_memory",
           "loss_chunk_tokens", "loss_working_bytes", "memory_terms", "nccl_bytes", "predict_reserved_peak_bytes",
           "ring_attention_bytes", "save_bytes", "selective_saves", "simulate_allocator",
           "torchtitan_layer_sac_modes"]
