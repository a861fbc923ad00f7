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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import AC_MODES, TrainConfig
from .executors import ExecutorProfile, resolve_executor
from .specs import ModelSpec

FP32 = 4
INDEX_BYTES = 8  # int64 token ids and labels


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one block holds for backward (``saved``) and needs on top while it runs
    backward (``working``), per AC mode."""

    saved: dict[str, float]
    working: dict[str, float]


@dataclass(frozen=True)
class MemoryTerms:
    """Everything the peak depends on, split so the planner's ILP can use it linearly.

    peak = max over phases; each phase is ``base + sum_m n_m * saved_m + extra``.
    """

    static_bytes: float  # sharded params + optimizer states (always alive)
    sharded_grad_bytes_per_layer: float
    sharded_grad_bytes_root: float
    root_unsharded_bytes: float  # root FSDP unit's gathered params (never resharded)
    root_activation_bytes: float  # final-norm input/output + loss chunk inputs + ids
    input_bytes: float  # token ids and labels (alive all step)
    loss_working_bytes: float  # includes the output projection's grad when the loss is chunked
    forward_block_bytes: float  # gathered block params alive during the loss
    backward_block_bytes: float  # gathered params + unsharded grads of blocks in flight
    root_grad_bytes: float  # unsharded output-projection grad, alive through backward
    root_reduce_bytes: float  # root unit's unsharded grads + their reduce-dtype copy at the end
    optimizer_temp_bytes: float  # single-tensor AdamW's temporaries for the largest local shard
    layer: LayerMemory
    comm_buffer_bytes: float
    fixed_overhead_bytes: float
    fragmentation: float
    n_layers: int

    def phases(self, layer_modes: tuple[str, ...]) -> dict[str, dict[str, float]]:
        """Breakdown of each phase for a per-layer AC assignment."""
        saved = [self.layer.saved[m] for m in layer_modes]
        total_saved = sum(saved)
        common = {"params_and_optimizer": self.static_bytes, "comm_buffers": self.comm_buffer_bytes}
        phases: dict[str, dict[str, float]] = {}
        phases["loss"] = dict(common, fsdp_unsharded=self.root_unsharded_bytes + self.forward_block_bytes,
                              activations=total_saved + self.root_activation_bytes,
                              logits_loss=self.loss_working_bytes)
        # Backward walks layers from the last; at layer l only layers <= l are saved.
        alive = total_saved
        worst_layer_phase: dict[str, float] | None = None
        for index in range(self.n_layers - 1, -1, -1):
            mode = layer_modes[index]
            later_layers = self.n_layers - 1 - index
            phase = dict(common,
                         fsdp_unsharded=self.root_unsharded_bytes + self.backward_block_bytes
                         + self.root_grad_bytes,
                         grads=later_layers * self.sharded_grad_bytes_per_layer,
                         activations=alive + self.input_bytes,
                         recompute_working=self.layer.working[mode])
            if worst_layer_phase is None or sum(phase.values()) > sum(worst_layer_phase.values()):
                worst_layer_phase = phase
            alive -= saved[index]
        if worst_layer_phase is not None:
            phases["backward"] = worst_layer_phase
        phases["root_reduce"] = dict(common, grads=self.n_layers * self.sharded_grad_bytes_per_layer,
                                     fsdp_unsharded=self.root_reduce_bytes, activations=self.input_bytes)
        phases["optimizer"] = dict(common, grads=self.n_layers * self.sharded_grad_bytes_per_layer
                                   + self.sharded_grad_bytes_root, activations=self.optimizer_temp_bytes)
        return phases

    def peak_tensor_bytes_for_counts(self, n_full: int, n_selective: int, n_none: int) -> float:
        """Closed form of max(phases) for layers ordered full, selective, none.

        Within a run of same-mode layers the backward phase is linear in the layer
        index, so its maximum is at one end of the run: six values instead of a loop.
        """
        A, W, g = self.layer.saved, self.layer.working, self.sharded_grad_bytes_per_layer
        saved_full, saved_sel, saved_none = A["full"] * n_full, A["selective"] * n_selective, A["none"] * n_none
        peaks = [
            self.static_bytes + self.root_unsharded_bytes + self.forward_block_bytes + self.root_activation_bytes
            + self.loss_working_bytes + saved_full + saved_sel + saved_none,
            self.static_bytes + self.n_layers * g + self.sharded_grad_bytes_root + self.optimizer_temp_bytes,
            self.static_bytes + self.n_layers * g + self.root_reduce_bytes + self.input_bytes,
        ]
        base = (self.static_bytes + self.root_unsharded_bytes + self.backward_block_bytes + self.root_grad_bytes
                + self.input_bytes)
        if n_none:
            peaks.append(base + saved_full + saved_sel + saved_none + W["none"])
            peaks.append(base + saved_full + saved_sel + A["none"] + g * (n_none - 1) + W["none"])
        if n_selective:
            peaks.append(base + saved_full + saved_sel + g * n_none + W["selective"])
            peaks.append(base + saved_full + A["selective"] + g * (n_none + n_selective - 1) + W["selective"])
        if n_full:
            peaks.append(base + saved_full + g * (n_none + n_selective) + W["full"])
            peaks.append(base + A["full"] + g * (self.n_layers - 1) + W["full"])
        return max(peaks)

    def tensor_peak(self, layer_modes: tuple[str, ...]) -> tuple[str, dict[str, float]]:
        phases = self.phases(layer_modes)
        name = max(phases, key=lambda key: sum(phases[key].values()))
        return name, phases[name]


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: float
    breakdown_bytes: dict[str, float]
    peak_phase: str
    tensor_peak_bytes: float  # what a traced / torch.cuda.max_memory_allocated peak sees
    phase_tensor_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def forward_backward_tensor_peak_bytes(self) -> float:
        """Tensor peak outside the optimizer step (what a trace of forward + backward sees)."""
        return max(v for k, v in self.phase_tensor_bytes.items() if k != "optimizer")


def layer_memory(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile) -> LayerMemory:
    """Saved and working bytes of one block for each AC mode (see the module docstring)."""
    par = cfg.parallelism
    tp, cp = par.tp, par.cp
    a = cfg.precision.activation_bytes
    tokens = cfg.tokens_per_gpu
    d, dq, dkv, f, heads = model.dim, model.q_dim, model.kv_dim, model.ffn_dim, model.n_heads
    sp_gathered = d if (tp == 1 or executor.sp_saves_gathered_matmul_input) else d / tp
    # What attention keeps of K and V (runtime/model.py): kv-head width (SDPA's native
    # GQA), for the whole sequence under all-gather CP.
    kv_tokens = tokens * cp if cfg.cp_impl == "allgather-kv" else tokens
    kv_saved = a * kv_tokens * 2 * dkv / tp
    norm_in = a * tokens * d / tp + FP32 * tokens / tp  # input + rstd
    attention_out = a * tokens * dq / tp + FP32 * tokens * heads / tp  # out + lse

    none = (2 * norm_in + 2 * a * tokens * sp_gathered
            + a * tokens * dq / tp + kv_saved  # q, k, v after RoPE
            + attention_out  # wo's input is a view of the attention output
            + 4 * a * tokens * f / tp)
    block_input = a * tokens * d / tp
    # Rowwise (wo, w2) outputs are partial sums over the full sequence before the
    # reduce-scatter under TP.
    selective = (block_input + a * tokens * (dq + 2 * dkv) / tp + attention_out
                 + 2 * a * tokens * d + 2 * a * tokens * f / tp)
    full = block_input

    # Gradient temporaries while one block runs backward. Autograd frees a node's saved
    # tensors once the node has run, so at the SwiGLU product's backward (the widest
    # moment) its two new f-wide input grads exist while w2's saved input is already gone:
    # +2 f. Attention backward holds dq, dk, dv (all-gathered width under CP before the
    # reduce-scatter). The residual-stream gradient (sequence-sharded under SP) is alive
    # throughout.
    ffn_grads = 2 * a * tokens * f / tp
    attention_grads = a * tokens * dq / tp + kv_saved
    transient = max(ffn_grads, attention_grads) + a * tokens * d / tp
    working = {
        "none": transient,
        "selective": max(none - selective, 0.0) + transient,
        "full": none - full + transient,
    }
    return LayerMemory(saved={"none": none, "selective": selective, "full": full}, working=working)


def loss_chunk_tokens(cfg: TrainConfig, executor: ExecutorProfile) -> int:
    tokens = cfg.tokens_per_gpu
    return min(tokens, executor.loss_chunk_tokens) if executor.loss_chunk_tokens else tokens


def loss_working_bytes(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile) -> float:
    """Logits and cross-entropy tensors alive at once, for one chunk of tokens.

    tp == 1, fused ``F.cross_entropy`` on fp32-upcast logits: forward holds the logits,
    their fp32 copy and the log-softmax output (logits + 4 + 4 bytes per element);
    backward holds the saved log-softmax output, nll_loss's dense gradient and
    log-softmax's input gradient (3 x 4).
    tp > 1, ``loss_parallel`` on vocab-sharded logits (torch/distributed/tensor/parallel/
    loss.py): forward holds logits, the fp32 copy, the max-shifted copy, its exp and the
    result (logits + 4 x 4); backward holds the saved result, a zeros gradient, exp(x),
    their sum and the product with grad_output (5 x 4) plus the cast-back gradient.
    """
    chunk = loss_chunk_tokens(cfg, executor)
    vocab = model.vocab_size / cfg.parallelism.tp
    upcast = FP32 if executor.loss_upcast_fp32 else executor.logits_bytes
    if cfg.parallelism.tp > 1:
        forward = executor.logits_bytes + 4 * upcast
        backward = 5 * upcast + executor.logits_bytes
    else:
        forward = executor.logits_bytes + 2 * upcast
        backward = 3 * upcast
    return max(forward, backward) * chunk * vocab


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
    first_grads = model.dim * model.ffn_dim / tp * prec.param_bytes
    all_grads = block_params * prec.param_bytes
    reduce_copy = block_params * prec.grad_reduce_bytes if prec.grad_reduce_bytes != prec.param_bytes else 0.0
    output_grad = model.vocab_size * model.dim / tp * prec.param_bytes
    # End of backward: the root unit (embedding, final norm, output) is resharded and its
    # grads reduced: unsharded grads + their reduce-dtype copy.
    root_reduce = root_params * prec.param_bytes + (root_params * prec.grad_reduce_bytes
                                                    if prec.grad_reduce_bytes != prec.param_bytes else 0.0)
    layer = layer_memory(model, cfg, executor)
    layer = LayerMemory(saved=layer.saved,
                        working={m: max(w + first_grads, all_grads + reduce_copy - gathered_block)
                                 for m, w in layer.working.items()})

    norm_in = a * tokens * model.dim / tp + FP32 * tokens / tp
    normed = a * tokens * model.dim  # gathered for the column-parallel output projection
    ids = 2 * INDEX_BYTES * tokens
    root_activations = norm_in + normed + ids

    groups = sum(1 for degree in (par.dp_replicate, shards, par.cp, tp) if degree > 1)
    return MemoryTerms(
        static_bytes=static,
        sharded_grad_bytes_per_layer=grad_per_layer,
        sharded_grad_bytes_root=grad_root,
        root_unsharded_bytes=root_params * prec.param_bytes,
        root_activation_bytes=root_activations,
        input_bytes=ids,
        # With several loss chunks, the output projection's unsharded grad (accumulated
        # over chunks) is alive while later chunks run backward.
        loss_working_bytes=loss_working_bytes(model, cfg, executor)
        + (output_grad if loss_chunk_tokens(cfg, executor) < tokens else 0.0),
        forward_block_bytes=forward_blocks,
        backward_block_bytes=backward_blocks,
        root_grad_bytes=output_grad,
        root_reduce_bytes=root_reduce,
        # AdamW (foreach=False) updates one parameter at a time: sqrt(v), its bias-
        # corrected copy and the update are three fp32 temporaries of that shard.
        optimizer_temp_bytes=3 * prec.master_bytes * max(model.vocab_size * model.dim, model.dim * model.ffn_dim,
                                                         model.dim * model.q_dim) / tp / shards,
        layer=layer,
        comm_buffer_bytes=groups * executor.nccl_buffer_bytes_per_group,
        fixed_overhead_bytes=executor.cuda_context_bytes,
        fragmentation=executor.allocator_fragmentation,
        n_layers=model.n_layers,
    )


def estimate_memory(model: ModelSpec, cfg: TrainConfig, executor: ExecutorProfile | str | None = None
                    ) -> MemoryEstimate:
    """Peak bytes one GPU needs (tensors + fragmentation + CUDA context), with breakdown."""
    terms = memory_terms(model, cfg, executor)
    modes = cfg.ac_policy(model.n_layers).layer_modes
    if len(modes) != model.n_layers:
        raise ValueError(f"activation checkpoint policy has {len(modes)} layers, model has {model.n_layers}")
    phases = terms.phases(modes)
    phase_name = max(phases, key=lambda key: sum(phases[key].values()))
    breakdown = dict(phases[phase_name])
    tensor_peak = sum(breakdown.values()) - breakdown.get("comm_buffers", 0.0)
    overhead = terms.fixed_overhead_bytes + terms.fragmentation * tensor_peak
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
        "overhead": overhead,
    }
    assert not breakdown, breakdown
    return MemoryEstimate(
        peak_bytes=sum(ordered.values()),
        breakdown_bytes=ordered,
        peak_phase=phase_name,
        tensor_peak_bytes=tensor_peak,
        phase_tensor_bytes={k: sum(v.values()) - v.get("comm_buffers", 0.0) for k, v in phases.items()},
    )


__all__ = ["AC_MODES", "LayerMemory", "MemoryTerms", "MemoryEstimate", "layer_memory",
           "loss_working_bytes", "memory_terms", "estimate_memory"]
