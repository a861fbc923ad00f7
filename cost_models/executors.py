"""Executor profiles: how a training program lays out memory, as data.

The memory formulas in ``memory.py`` are the same for every executor; what differs
between this project's runtime and torchtitan (how the loss is computed, whether the
last block stays gathered, what is counted as reserve) is captured here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .specs import GiB, MiB, SpecError


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
    # Memory not in tensors: CUDA context + cuBLAS/cuDNN workspaces + NCCL buffers.
    # The CUDA context on a Hopper GPU takes ~500-600 MiB (nvidia-smi of an idle
    # torch process); NCCL allocates NCCL_BUFFSIZE (4 MiB) per channel and peer.
    cuda_context_bytes: int = 600 * MiB
    nccl_buffer_bytes_per_group: int = 64 * MiB
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
    # torch.compile per TransformerBlock (torchtitan's compile option): inductor fuses the
    # element-wise ops (fewer HBM bytes, fewer launches).
    compile: bool = False
    # HBM bytes per activation element of the same forward ops once inductor fuses them:
    # RMSNorm one kernel (read 2 + write 2), RoPE on q and k one kernel (read 2 + write 2),
    # SiLU x gate one kernel (read 2 + 2, write 2), residual add (read 2 + 2, write 2, the
    # following norm reads the sum in the same kernel), the transpose copy unchanged (4).
    compiled_elementwise_bytes_per_element: tuple[tuple[str, float], ...] = (
        ("rmsnorm", 4.0), ("rope", 4.0), ("swiglu", 6.0), ("residual", 6.0), ("relayout", 4.0))
    # Matmuls that "selective" AC recomputes. torchtitan's per-op SAC policy
    # (torchtitan/models/llama/parallelize_llama.py, _custom_policy: "Saves output of all
    # compute ops, except every second mm") counts mm calls per block in call order wq, wk,
    # wv, wo, w1, w3, w2 and recomputes the even ones: wk, wo, w3. This project's runtime
    # saves every matmul output (recomputes element-wise ops only).
    selective_recomputed_matmuls: tuple[str, ...] = ()
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

    def with_overrides(self, **overrides) -> "ExecutorProfile":
        return replace(self, **overrides)

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


EXECUTOR_PROFILES: dict[str, ExecutorProfile] = {
    # This project's runtime (runtime/loss.py): the output projection and the fp32
    # cross-entropy run per chunk of tokens under activation checkpointing, so only
    # one chunk's logits are alive, in forward and in backward.
    "autoplan": ExecutorProfile(name="autoplan", loss_chunk_tokens=4096),
    # torchtitan as of its first context-parallel release (late 2024): bf16 logits for
    # the whole local sequence, loss = cross_entropy(logits.flatten(0, 1).float(), labels)
    # over the full vocabulary, full AC per TransformerBlock, FSDP2 bf16 params / fp32
    # reduce, blocks resharded after forward except the last, embedding + final norm +
    # output projection in the root FSDP unit.
    "torchtitan": ExecutorProfile(name="torchtitan", loss_chunk_tokens=None,
                                  fsdp_last_block_resharded=False,
                                  selective_recomputed_matmuls=("wk", "wo", "w3"), optimizer_foreach=True,
                                  native_gqa=False),
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
