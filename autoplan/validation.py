"""The memory model against the runtime's traced memory, over a grid.

Each cell builds a plan (model, layout, AC, sequence length), traces rank 0's second
training step with fake tensors (runtime/trace.py) and compares the predicted tensor
peak (cost_models, executor 'autoplan', no allocator reserve / CUDA context, which are
not tensors) with the traced peak. Models with many layers are traced with a few
layers: the prediction is made for the same reduced model, so the comparison is exact,
and per-layer terms extrapolate linearly.
"""

from __future__ import annotations

import time
from dataclasses import replace

from cost_models.specs import MODEL_PRESETS

LAYOUTS = {
    "FSDP": ({"dp_shard": 8}, None),
    "FSDPxTP": ({"dp_shard": 4, "tp": 2}, None),
    "FSDPxCP": ({"dp_shard": 4, "cp": 2}, None),
    "TPxCP": ({"tp": 2, "cp": 4}, None),
    "HSDP": ({"dp_replicate": 2, "dp_shard": 4}, None),
    "HSDPxCP-cp-outer": ({"dp_replicate": 2, "dp_shard": 2, "cp": 2}, ["dp_replicate", "cp", "dp_shard", "tp"]),
}
# The CUDA program's grid (``--program cuda``, fake CUDA device): PyTorch's ring attention
# (both rotations), bf16 mixed precision and the flash SDPA ops, which the CPU trace cannot run.
CUDA_LAYOUTS = {  # name: (degrees, mesh order, CP implementation)
    "FSDP": ({"dp_shard": 8}, None, "none"),
    "FSDPxTP": ({"dp_shard": 4, "tp": 2}, None, "none"),
    "FSDPxCP-allgather-kv": ({"dp_shard": 4, "cp": 2}, None, "allgather-kv"),
    "FSDPxCP-ring-allgather": ({"dp_shard": 4, "cp": 2}, None, "ring-allgather"),
    "FSDPxCP-ring-alltoall": ({"dp_shard": 4, "cp": 2}, None, "ring-alltoall"),
    "FSDPxCP4-ring-allgather": ({"dp_shard": 2, "cp": 4}, None, "ring-allgather"),
    "TPxCP-ring-allgather": ({"tp": 2, "cp": 4}, None, "ring-allgather"),
    # TP 8 (a whole node, as in the README's 70B plan): the vocab-sharded embedding's dense
    # backward grad and the loss no longer shrink together with tp.
    "TP8": ({"tp": 8}, None, "none"),
    "TP8xCP2-ring-allgather": ({"tp": 8, "cp": 2}, None, "ring-allgather"),
}
MODELS = {"1B": ("llama3.2-1b", 2), "8B": ("llama3-8b", 2), "70B": ("llama3-70b", 1)}
ACS = ("none", "selective", "full")
SEQS = (4096, 16384, 65536)


def cell_plan(model_key: str, layout: str, ac: str, seq_len: int, program: str = "cpu"):
    """The reduced model and the plan of one grid cell (also used to re-price stored traces)."""
    from autoplan.plan import ActivationCheckpointDoc, Plan

    preset, layers = MODELS[model_key]
    model = replace(MODEL_PRESETS[preset], n_layers=layers)
    if program == "cuda":
        parallelism, order, cp_impl = CUDA_LAYOUTS[layout]
    else:  # the CPU program runs CP through the portable all-gather-K/V path
        parallelism, order = LAYOUTS[layout]
        cp_impl = "allgather-kv" if parallelism.get("cp", 1) > 1 else "none"
    plan = Plan(seq_len=seq_len, parallelism=parallelism, model=model.to_dict(),
                activation_checkpoint=ActivationCheckpointDoc(mode=ac), loss_chunk_tokens=4096, cp_impl=cp_impl,
                **({"mesh_order": order} if order else {}))
    return model, plan


def run_cell(model_key: str, layout: str, ac: str, seq_len: int, program: str = "cpu") -> dict:
    from cost_models.memory import estimate_memory

    model, plan = cell_plan(model_key, layout, ac, seq_len, program)
    layers = model.n_layers
    began = time.perf_counter()
    if program == "cuda":
        from .checking import TracedPeak, sdpa_backend, trace_cuda

        found, why = trace_cuda(plan, sdpa_backend(plan))
        if found is None:
            raise RuntimeError(f"validate --program cuda: {why}")
        traced = TracedPeak(found["peak_bytes"], found["components"])
    else:
        from runtime.trace import trace_plan_memory

        traced = trace_plan_memory(plan)
    predicted = estimate_memory(model, plan.train_config(), plan.executor_spec())
    return {"model": model_key, "layers": layers, "layout": layout, "ac": ac, "seq_len": seq_len,
            "traced_bytes": traced.peak_bytes, "predicted_bytes": predicted.forward_backward_tensor_peak_bytes,
            "error": predicted.forward_backward_tensor_peak_bytes / traced.peak_bytes - 1, "phase": predicted.peak_phase,
            "traced_components": traced.components, "trace_s": time.perf_counter() - began}

