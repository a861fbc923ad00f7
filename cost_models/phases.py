"""The step's memory phases from its terms (``MemoryTerms``): what is alive in each phase,
per layer and per AC assignment, and the closed form the planner's constraints follow.

``cost_models/memory.py`` computes the terms (module docstring there: what each phase
holds and why); this module only composes them, so the phase walk and its closed form
sit side by side and can be checked against each other (tests/test_memory_phases.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .activations import LayerMemory


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
    # Working set on top of every saved activation, as the ILP's loss constraint reads
    # it: the largest of (the loss's tensors + the allocator blocks they strand), the last
    # attention's ring-CP forward transient and the final norm's backward, each re-based
    # onto the loss phase. The parts are loss_logits_bytes, loss_stranded_bytes,
    # forward_working_bytes, norm_backward_working_bytes.
    loss_working_bytes: float
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
    # Attention's forward transient under ring CP (alive on top of every layer's saved
    # activations while the last layer's forward runs): the "forward" phase.
    forward_working_bytes: float = 0.0
    # Caching allocator (reserved, not allocated): blocks cached by FSDP2's side streams
    # (all-gather outputs on the copy-in stream, sharded grads = reduce-scatter outputs on
    # the reduce-scatter stream), never reusable by the compute stream.
    allocator_pool_bytes: float = 0.0
    # Free blocks the loss's large tensors leave that no later request of the loss fits
    # (reserved on top of the loss phase's tensors; see allocator_loss_stranded_bytes).
    loss_stranded_bytes: float = 0.0
    # The loss's tensors alone (includes the output projection's grad when chunked).
    loss_logits_bytes: float = 0.0
    # The final norm's backward ("norm_backward" phase): its working set, and its saved
    # input + rstd (alive then, part of root_activation_bytes in the loss phase).
    norm_backward_working_bytes: float = 0.0
    final_norm_saved_bytes: float = 0.0
    # The vocab-sharded embedding's backward under TP ("embedding_backward" phase): its
    # working set (a dense full-vocabulary grad + the gathered incoming grad) and what else
    # is alive then (gathered root params, grads not yet reduced, FSDP's held buffers).
    embedding_backward_working_bytes: float = 0.0
    embedding_backward_unsharded_bytes: float = 0.0
    embedding_backward_grad_bytes: float = 0.0
    # Where a block sits matters: the top block's working set holds no reduce-scatter
    # input from a block above it (``layer.working`` is a middle block's), and block 0
    # gathers one block fewer (nothing below it to prefetch).
    top_layer_working: dict[str, float] = field(default_factory=dict)
    first_layer_block_saving_bytes: float = 0.0

    def phases(self, layer_modes: tuple[str, ...]) -> dict[str, dict[str, float]]:
        """Breakdown of each phase for a per-layer AC assignment."""
        saved = [self.layer.saved[m] for m in layer_modes]
        total_saved = sum(saved)
        common = {"params_and_optimizer": self.static_bytes, "comm_buffers": self.comm_buffer_bytes}
        phases: dict[str, dict[str, float]] = {}
        phases["loss"] = dict(common, fsdp_unsharded=self.root_unsharded_bytes + self.forward_block_bytes,
                              activations=total_saved + self.root_activation_bytes,
                              logits_loss=self.loss_logits_bytes)
        if self.loss_stranded_bytes:
            phases["loss"]["allocator_stranded"] = self.loss_stranded_bytes
        if self.norm_backward_working_bytes:
            phases["norm_backward"] = dict(common, fsdp_unsharded=self.root_unsharded_bytes + self.backward_block_bytes
                                           + self.root_grad_bytes,
                                           activations=total_saved + self.input_bytes + self.final_norm_saved_bytes,
                                           recompute_working=self.norm_backward_working_bytes)
        if self.forward_working_bytes:
            phases["forward"] = dict(common, fsdp_unsharded=self.root_unsharded_bytes + self.backward_block_bytes,
                                     activations=total_saved + self.input_bytes,
                                     recompute_working=self.forward_working_bytes)
        # Backward walks layers from the last; at layer l only layers <= l are saved.
        alive = total_saved
        worst_layer_phase: dict[str, float] | None = None
        for index in range(self.n_layers - 1, -1, -1):
            mode = layer_modes[index]
            later_layers = self.n_layers - 1 - index
            phase = dict(common,
                         fsdp_unsharded=self.root_unsharded_bytes + self._blocks_at(index) + self.root_grad_bytes,
                         grads=later_layers * self.sharded_grad_bytes_per_layer,
                         activations=alive + self.input_bytes,
                         recompute_working=self._working_at(index, mode))
            if worst_layer_phase is None or sum(phase.values()) > sum(worst_layer_phase.values()):
                worst_layer_phase = phase
            alive -= saved[index]
        if worst_layer_phase is not None:
            phases["backward"] = worst_layer_phase
        if self.embedding_backward_working_bytes:
            phases["embedding_backward"] = dict(common, grads=self.embedding_backward_grad_bytes,
                                                fsdp_unsharded=self.embedding_backward_unsharded_bytes,
                                                activations=self.input_bytes,
                                                recompute_working=self.embedding_backward_working_bytes)
        phases["root_reduce"] = dict(common, grads=self.n_layers * self.sharded_grad_bytes_per_layer,
                                     fsdp_unsharded=self.root_reduce_bytes, activations=self.input_bytes)
        phases["optimizer"] = dict(common, grads=self.n_layers * self.sharded_grad_bytes_per_layer
                                   + self.sharded_grad_bytes_root, activations=self.optimizer_temp_bytes)
        return phases

    def _blocks_at(self, index: int) -> float:
        """Gathered block params while block ``index`` runs backward."""
        return self.backward_block_bytes - (self.first_layer_block_saving_bytes if index == 0 else 0.0)

    def _working_at(self, index: int, mode: str) -> float:
        if index == self.n_layers - 1 and self.top_layer_working:
            return self.top_layer_working[mode]
        return self.layer.working[mode]

    def peak_tensor_bytes_for_counts(self, n_full: int, n_selective: int, n_none: int) -> float:
        """Closed form of max(phases) for layers ordered full, selective, none: tensor
        bytes + the loss's stranded allocator blocks (what the budget
        ``(capacity - fixed_overhead_bytes - comm_buffer_bytes) / (1 + fragmentation)`` bounds).

        Within a run of same-mode layers the backward phase is linear in the layer
        index, except that block 0 gathers no prefetched block and the top block holds no
        reduce-scatter input: the two ends of each run and their neighbours, instead of
        a loop over layers.
        """
        A, g = self.layer.saved, self.sharded_grad_bytes_per_layer
        saved_full, saved_sel, saved_none = A["full"] * n_full, A["selective"] * n_selective, A["none"] * n_none
        peaks = [
            self.static_bytes + self.root_unsharded_bytes + self.forward_block_bytes + self.root_activation_bytes
            + self.loss_working_bytes + saved_full + saved_sel + saved_none,
            self.static_bytes + self.n_layers * g + self.sharded_grad_bytes_root + self.optimizer_temp_bytes,
            self.static_bytes + self.n_layers * g + self.root_reduce_bytes + self.input_bytes,
            self.static_bytes + self.embedding_backward_grad_bytes + self.embedding_backward_unsharded_bytes
            + self.input_bytes + self.embedding_backward_working_bytes,
        ]
        base = (self.static_bytes + self.root_unsharded_bytes + self.root_grad_bytes + self.input_bytes
                + self.backward_block_bytes)
        top = self.n_layers - 1
        save0 = self.first_layer_block_saving_bytes
        top_working = self.top_layer_working or self.layer.working
        below = 0.0  # saved activations of the runs below this one
        first = 0
        for mode, count in (("full", n_full), ("selective", n_selective), ("none", n_none)):
            if not count:
                continue
            last = first + count - 1
            saved, working = A[mode], self.layer.working[mode]
            # Linear inside a run; block 0 and the top block differ from their neighbours.
            for index in (first, first + 1, last - 1, last) if count > 3 else range(first, last + 1):
                peaks.append(base + below + saved * (index - first + 1) + g * (top - index)
                             + (top_working[mode] if index == top else working) - (save0 if index == 0 else 0.0))
            below += saved * count
            first += count
        return max(peaks)

    def reserved_phase_bytes(self, layer_modes: tuple[str, ...]) -> dict[str, float]:
        """Caching-allocator reserved bytes per phase (what ``torch.cuda.max_memory_reserved``
        and torchtitan's logged memory see; CUDA context and NCCL are outside it).

        The phase's tensors + the loss's stranded blocks in the loss phase, times (1 + the
        fitted fragmentation remainder), + the side-stream pools.
        """
        out = {}
        for name, phase in self.phases(layer_modes).items():
            # Sharded grads live in the reduce-scatter stream's pool and are counted again
            # in the phase (conservative by at most the sharded grads, and linear for the ILP).
            compute = sum(phase.values()) - phase.get("comm_buffers", 0.0)
            out[name] = compute * (1 + self.fragmentation) + self.allocator_pool_bytes
        return out

    def tensor_peak(self, layer_modes: tuple[str, ...]) -> tuple[str, dict[str, float]]:
        phases = self.phases(layer_modes)
        name = max(phases, key=lambda key: sum(phases[key].values()))
        return name, phases[name]
