"""Executor profiles: how a training program lays out memory, as data.

The memory formulas in ``memory.py`` are the same for every executor; what differs
between this project's runtime and torchtitan (how the loss is computed, whether the
last block stays gathered, what is counted as reserve) is captured here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from typing import Any

from .specs import GiB, MiB, SpecError

# A Llama block's matmuls in call order (runtime/model.py; torchtitan's model alike).
BLOCK_MATMULS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


@dataclass(frozen=True)
class ExecutorProfile:
    name: str
    # Loss: tokens per chunk of the (checkpointed) output projection + cross-entropy.
    # None = the whole local sequence at once (logits for every token alive together).
    loss_chunk_tokens: int | None
    # Bytes per element of the logits the output projection writes (bf16 under FSDP MP).
    logits_bytes: int = 2
    # The loss upcasts logits to fp32 before log_softmax.
    loss_upcast_fp32: bool = True
    # FSDP2: blocks gathered at once in backward (current + prefetched next).
    fsdp_blocks_in_flight: int = 2
    # FSDP2 reshards every block after forward unless told otherwise; torchtitan keeps
    # the last block gathered (it is needed first in backward).
    fsdp_last_block_resharded: bool = True
    # Under sequence parallel, DTensor saves the all-gathered (full-sequence) input of the
    # column-parallel matmuls; Megatron-style SP would save the shard (factor 1/tp).
    sp_saves_gathered_matmul_input: bool = True
    # Memory outside the caching allocator: the CUDA context (+ cuBLAS/cuDNN handles) on a
    # Hopper GPU takes ~500-600 MiB (nvidia-smi of an idle torch process). NCCL's share is
    # nccl_communicator_bytes / nccl_alltoall_peer_bytes below (it replaced a flat 64 MiB
    # per group, far below the measured footprints cited there).
    cuda_context_bytes: int = 600 * MiB
    # HBM bytes moved per activation element by the memory-bound forward ops, as eager
    # PyTorch runs them with bf16 activations (backward moves about twice as much):
    # RMSNorm upcasts to fp32 (read 2 + write 4), squares/means (read 4), scales (read 4
    # + write 4), casts back (read 4 + write 2), multiplies by the weight (read 2 +
    # write 2): 28. RoPE via complex multiply in fp32: about the same, 28. SiLU (read 2,
    # write 2) + gate product (read 4, write 2): 10 per ffn element. Residual add
    # (read 4, write 2): 6. Attention output transpose copy (read 2, write 2): 4.
    elementwise_bytes_per_element: tuple[tuple[str, float], ...] = (
        ("rmsnorm", 28.0), ("rope", 28.0), ("swiglu", 10.0), ("residual", 6.0), ("relayout", 4.0))
    # Caching-allocator fragmentation: reserved / allocated - 1 at the peak.
    allocator_fragmentation: float = 0.05
    # --- step time ---
    # SDPA backend the program runs: "flash" (FlashAttention-2 in PyTorch), "cudnn" or
    # "efficient" (memory-efficient / xformers-style). PyTorch's default priority since
    # pytorch #128539 (reverting cuDNN-first from #125343) is flash first; torchtitan
    # enabled cuDNN explicitly only in its PR #1000 (March 2025).
    # torch 2.13: torch._C._get_sdp_priority_order() = flash, efficient, math, cudnn.
    attention_backend: str = "flash"
    # K/V handed to SDPA at kv-head width with enable_gqa=True (runtime/model.py), which
    # only the flash and math kernels accept (SDPA docstring, torch 2.13), or expanded to
    # the query heads first (torchtitan's repeat_kv: a bf16 copy of K and V, read at kv
    # width and written at q width, forward; the backward sums it back).
    native_gqa: bool = True
    # HBM bytes per activation element of the same forward ops once inductor fuses them:
    # RMSNorm one kernel (read 2 + write 2), RoPE on q and k one kernel (read 2 + write 2),
    # SiLU x gate one kernel (read 2 + 2, write 2), residual add (read 2 + 2, write 2, the
    # following norm reads the sum in the same kernel), the transpose copy unchanged (4).
    compiled_elementwise_bytes_per_element: tuple[tuple[str, float], ...] = (
        ("rmsnorm", 4.0), ("rope", 4.0), ("swiglu", 6.0), ("residual", 6.0), ("relayout", 4.0))
    # Optimizer and clip_grad_norm_: foreach (multi-tensor) kernels or one op per parameter.
    # runtime/train.py: AdamW(foreach=False), clip_grad_norm_(foreach=False); torchtitan's
    # defaults (late 2024): foreach AdamW and foreach clipping.
    optimizer_foreach: bool = False
    # Host (CPU) time per eager op: Python + dispatcher + kernel launch, ~10 us in eager
    # PyTorch (order of magnitude from the PyTorch profiler's CPU time of small ops; not
    # fitted), and per DTensor op (sharding propagation cached, ~3x a plain op; assumed).
    # The host runs ahead of the GPU, so it only shows when it exceeds the GPU time.
    host_op_overhead_s: float = 10e-6
    dtensor_op_overhead_s: float = 30e-6
    # Eager ops per block forward in a Llama block (2 RMSNorm x ~8 ops, 7 linears, RoPE ~12,
    # SDPA + views/transposes ~10, SiLU, mul, 2 adds ~ 60); backward about twice. A
    # compiled block launches its fused kernels and extern matmuls: ~15.
    eager_ops_per_layer_forward: int = 60
    compiled_ops_per_layer_forward: int = 15
    # --- memory ---
    # What one selective (per-op) AC block keeps, by name; bytes per name are in
    # cost_models/memory.py (SAVE_NAMES). This project's runtime saves every matmul
    # and attention output (runtime/parallelize.py::_selective_save_ops); wo's and w2's
    # saved outputs are the full-width partial sums before the SP reduce-scatter.
    selective_saves: tuple[str, ...] = ("block_input", "wq", "wk", "wv", "attention", "wo", "w1", "w3", "w2")
    # Saves that per-block torch.compile drops: AOTAutograd's partitioner keeps only what
    # backward reads, so outputs of MUST_SAVE ops consumed by nothing in backward (wo's
    # and w2's outputs go only into the residual add, whose backward reads nothing) are
    # not kept, whereas eager SAC caches every MUST_SAVE output until the block's
    # recompute (torch/utils/checkpoint.py, _CachingTorchDispatchMode).
    compile_drops_saves: tuple[str, ...] = ("wo", "w2", "wo_rs", "w2_rs")
    # The model output (bf16 logits) is dropped before backward (torchtitan: ``del pred``).
    logits_freed_before_backward: bool = True
    # The compiled loss (0.3, compile.components has "loss") fuses the fp32 upcast into the
    # log-softmax: no fp32 copy of the logits.
    loss_compiled_with_model: bool = False
    # Caching allocator (c10/cuda/CUDACachingAllocator.cpp): PYTORCH_CUDA_ALLOC_CONF
    # expandable_segments maps one growing segment per stream instead of a cudaMalloc per
    # request; either way freed blocks stay reserved and are reused only by requests that
    # fit them (after merging with free neighbours), per stream.
    expandable_segments: bool = False
    # NCCL memory outside PyTorch's allocator (not in reserved_bytes), per communicator
    # (NCCL issue #964: 544-688 MB per PyTorch process group on 4xA100, measured with
    # nvidia-smi; NCCL issue #864: ~1.6 GB for one communicator; midpoint of #964 taken,
    # channel buffers NCCL_BUFFSIZE=4 MiB x channels x 2 ring connections, NCCL #986)
    # and per all-to-all peer (NCCL issue #1685: all-to-all raised NCCL's footprint on
    # 8xH100 from 1.06 GB to 4.34 GB for 7 peers: (4.34 - 1.06) / 7 = 0.469 GB per peer;
    # #986: all-to-all keeps one connection per peer, a ring two in total).
    nccl_communicator_bytes: int = 587 * MiB
    nccl_alltoall_peer_bytes: int = 447 * MiB
    # RMSNorm backward in eager PyTorch upcasts to fp32: at its widest moment five fp32
    # tensors of the norm's input size are alive (runtime/model.py RMSNormFunction.backward:
    # xhat, g*w, xhat*mean(...), the difference, dx; then grad.float() and its product for
    # dw). Matters for the final norm, whose backward runs with every block's saved
    # activations alive. A compiled (fused) norm writes only dx.
    norm_backward_fp32_temporaries: float = 5.0
    # Bytes per input element one RMSNorm keeps for backward besides its output, None =
    # the input in the activation dtype (the runtime's RMSNormFunction: x + rstd).
    # Eager nn.RMSNorm (composite in torch 2.13) keeps the fp32 upcast input and the fp32
    # normalized x: 8 (traced on torchtitan 0.1.0's own block, bf16 and fp32). Compiled: None.
    norm_saved_bytes_per_element: float | None = None
    # Loss in a fixed number of sequence chunks (torchtitan 0.3 ChunkedLossWrapper), or None.
    loss_num_chunks: int | None = None
    # FSDP units outside the blocks: 1 = embedding + norm + output in the root (late-2024
    # torchtitan, this runtime), 2 = embedding and [norm, lm_head] apart (0.3).
    fsdp_root_units: int = 1
    # --- step time and memory ---
    # torch.compile per TransformerBlock (torchtitan's compile option): inductor fuses the
    # element-wise ops (fewer HBM bytes and launches) and its partitioner drops saves
    # backward does not read (compile_drops_saves).
    compile: bool = False

    def with_overrides(self, **overrides) -> "ExecutorProfile":
        return replace(self, **overrides)

    @cached_property
    def selective_recomputed_matmuls(self) -> tuple[str, ...]:
        """Matmuls 'selective' AC recomputes: the block's matmuls it does not save."""
        return tuple(m for m in BLOCK_MATMULS if m not in self.selective_saves)

    @property
    def sdpa_kv_expanded(self) -> bool:
        """SDPA gets K and V copied to the query heads (torchtitan's repeat_kv)."""
        return not self.native_gqa

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "executor_profile") -> "ExecutorProfile":
        """The inverse of ``to_dict`` (JSON/YAML lists back to tuples); unknown fields are an error."""
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a mapping of profile fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}.{unknown[0]}: unknown executor profile field (known: {', '.join(sorted(known))})")
        values = {k: _tuples(v) for k, v in data.items()}
        try:
            return cls(**values)
        except TypeError as error:
            raise SpecError(f"{where}: {error}") from None


# torchtitan late 2024 (commit 9dec370, the published Dec-2024 runs), memory-relevant
# choices. Per-op SAC (parallelize_llama.py ``_save_list`` = {aten.mm, SDPA flash,
# SDPA efficient, _c10d_functional.reduce_scatter_tensor, aten.max} and a per-block
# ``forward_mm_count`` that recomputes every second mm): of a Llama block's 7 mms in
# order wq, wk, wv, wo, w1, w3, w2 it keeps wq, wv, w1, w2 (odd counts), recomputes wk,
# wo, w3; the SDPA output + logsumexp and, under TP, both reduce-scatter outputs are
# kept. Verified in torchtitan 0.1.0's wheel (PyPI, 2025; models/llama3/infra/
# parallelize.py has this _save_list and counter verbatim, and the every-Nth-block
# option; tests trace its functions): its Attention calls repeat_kv before SDPA (K/V at
# query width), train.py does ``del pred`` before ``loss.backward()``, the last block is
# not resharded after forward, the root is fully_shard(model). 0.1.0 also compiles the
# loss under compile; the Dec-2024 compiled run's published 77.0 GiB is only reachable
# with an uncompiled loss (a compiled one would predict ~57 GiB), so the late-2024 profile
# keeps loss_compiled_with_model False. 0.3.0's SelectiveAC (read in the wheel) has the
# same counter and saves the same outputs for this block.
# Its optimizer and clipping use foreach (multi-tensor) kernels by default.
TORCHTITAN_2024: dict[str, Any] = dict(
    selective_saves=("block_input", "wq", "wv", "attention", "w1", "w2", "wo_rs", "w2_rs"),
    norm_saved_bytes_per_element=8.0,
    native_gqa=False,
    logits_freed_before_backward=True,
    optimizer_foreach=True,
)

EXECUTOR_PROFILES: dict[str, ExecutorProfile] = {
    # This project's runtime (runtime/loss.py): the output projection and the fp32
    # cross-entropy run per chunk of tokens under activation checkpointing, so only
    # one chunk's logits are alive, in forward and in backward.
    "autoplan": ExecutorProfile(name="autoplan", loss_chunk_tokens=4096),
    # torchtitan as of its first context-parallel release (late 2024): bf16 logits for
    # the whole local sequence, loss = cross_entropy(logits.flatten(0, 1).float(), labels)
    # over the full vocabulary, per-op selective AC as torchtitan runs it (above), FSDP2
    # bf16 params / fp32 reduce, blocks resharded after forward except the last,
    # embedding + final norm + output projection in the root FSDP unit.
    "torchtitan": ExecutorProfile(name="torchtitan", loss_chunk_tokens=None,
                                  fsdp_last_block_resharded=False, **TORCHTITAN_2024),
    # torchtitan 0.3.0 (PyPI wheel, read): SelectiveAC saves get_default_op_list()'s
    # compute-intensive ops + linear/SDPA/reduce_scatter/all_to_all and recomputes every
    # second mm (same per-block counter as late 2024); the Llama 3 8B config uses
    # ChunkedLossWrapper (num_chunks=8: lm_head + fp32 CE per chunk, backward per chunk,
    # lm_head kept unsharded); compile.components defaults to ["model", "loss"]; all
    # decoder blocks reshard after forward, [norm, lm_head] do not
    # (distributed/fsdp.py::apply_fsdp_to_decoder).
    "torchtitan-0.3": ExecutorProfile(name="torchtitan-0.3", loss_chunk_tokens=None, loss_num_chunks=8,
                                      fsdp_last_block_resharded=True, loss_compiled_with_model=True,
                                      fsdp_root_units=2,
                                      **{**TORCHTITAN_2024, "native_gqa": True}),
}
# torchtitan with its per-block torch.compile on (training.compile / compile = true).
EXECUTOR_PROFILES["torchtitan-compile"] = replace(EXECUTOR_PROFILES["torchtitan"], name="torchtitan-compile",
                                                  compile=True)
DEFAULT_EXECUTOR = "autoplan"


def _tuples(value: Any) -> Any:
    """Lists (as JSON and YAML write tuples) back to tuples, recursively; the profile is hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def resolve_executor(name: str | ExecutorProfile | None) -> ExecutorProfile:
    if isinstance(name, ExecutorProfile):
        return name
    key = (name or DEFAULT_EXECUTOR).strip().lower()
    if key not in EXECUTOR_PROFILES:
        raise SpecError(f"--executor {name!r}: use one of {', '.join(EXECUTOR_PROFILES)}")
    return EXECUTOR_PROFILES[key]


__all__ = ["ExecutorProfile", "EXECUTOR_PROFILES", "DEFAULT_EXECUTOR", "resolve_executor", "GiB"]
