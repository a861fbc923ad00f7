"""Apply a plan's parallelism to the model, one small function each, in this order:
tensor parallel -> context parallel -> activation checkpointing -> FSDP.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .context_parallel import AllGatherKVAttention
from .mesh import ParallelDims, replicate_shard_mesh
from .model import Transformer

# Ops whose outputs 'selective' checkpointing keeps (the rest of the block is recomputed).
def _selective_save_ops() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           torch.ops.autoplan.cp_attention.default}  # the portable CP attention (one op)
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_mm"):
        op = getattr(aten, name, None)
        if op is not None:
            ops.add(op.default)
    return ops


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool = True) -> None:
    """Megatron-style TP with sequence parallel, as torchtitan lays it out."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    outer = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # The loss gathers the normed hidden states once and feeds the projection per chunk.
        "output": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    # A pipeline stage (runtime/pipeline.py) holds only some of them.
    parallelize_module(model, tp_mesh, {name: style for name, style in outer.items()
                                        if getattr(model, name, None) is not None})
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
    if model.spec.tie_embeddings and model.output is not None:  # parallelize_module unties them
        model.output.weight = model.tok_embeddings.weight


def uses_native_cp(cp_impl: str, device_type: str) -> bool:
    """Ring CP through PyTorch's ``context_parallel`` needs CUDA SDPA kernels."""
    return device_type == "cuda" and cp_impl in ("ring-allgather", "ring-alltoall")


def apply_cp(model: Transformer, cp_mesh: DeviceMesh, cp_rank: int, cp: int, cp_impl: str = "allgather-kv",
             device_type: str = "cpu") -> None:
    """Portable all-gather-KV attention, unless the native ring path takes over (then the
    model keeps plain SDPA and the training step runs inside ``context_parallel``)."""
    if uses_native_cp(cp_impl, device_type):
        from torch.distributed.tensor.experimental._attention import set_rotate_method
        set_rotate_method("alltoall" if cp_impl == "ring-alltoall" else "allgather")
        return
    for block in model.layers.values():
        block.attention.attention_fn = AllGatherKVAttention(cp_mesh, cp_rank, cp)


def apply_ac(model: Transformer, layer_modes: tuple[str, ...]) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save_ops = _selective_save_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE

    for (name, block), mode in zip(list(model.layers.items()), layer_modes):
        if mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            model.layers[name] = checkpoint_wrapper(
                block, preserve_rng_state=False,
                context_fn=partial(create_selective_checkpoint_contexts, policy))


def apply_fsdp(model: Transformer, dims: ParallelDims, mesh: DeviceMesh, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, shard_over_cp: bool = True) -> None:
    """FSDP2 over dp_shard x cp (HSDP with dp_replicate when > 1).

    CP ranks hold different tokens, so their gradients must be reduced too: sharding
    over dp_shard alone (``shard_over_cp=False``, kept only to show the failure) is wrong.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shard_dims = ("dp_shard", "cp") if shard_over_cp else ("dp_shard",)
    if dims.dp_replicate > 1:
        fsdp_mesh = replicate_shard_mesh(mesh, shard_dims)
    else:
        fsdp_mesh = mesh["dp_shard_cp" if shard_over_cp else "dp_shard"]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers.values():
        fully_shard(block, mesh=fsdp_mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp)


def parallelize(model: Transformer, dims: ParallelDims, mesh: DeviceMesh, layer_modes: tuple[str, ...],
                param_dtype: torch.dtype, reduce_dtype: torch.dtype, shard_over_cp: bool = True,
                cp_impl: str = "allgather-kv", device_type: str = "cpu") -> nn.Module:
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    if dims.cp > 1:
        apply_cp(model, mesh["cp"], mesh["cp"].get_local_rank(), dims.cp, cp_impl, device_type)
    apply_ac(model, layer_modes)
    apply_fsdp(model, dims, mesh, param_dtype, reduce_dtype, shard_over_cp)
    return model
