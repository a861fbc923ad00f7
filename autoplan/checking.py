"""A plan's predicted memory against the runtime's traced memory (fake tensors, no GPU)."""

from __future__ import annotations

from .plan import Plan
from .planner import DEFAULT_MEMORY_HEADROOM
from .units import MemoryHeadroom

COMPONENTS = ("params", "optimizer", "grads", "fsdp_unsharded", "activations")
# CP implementations the CPU trace runs as the plan says. PyTorch's ring attention
# (context_parallel) needs CUDA SDPA kernels (design.md), so a ring plan is traced through
# the portable all-gather-K/V path and the trace gives no verdict on the ring itself.
TRACEABLE_CP_IMPLS = ("none", "allgather-kv")


def traced_program(plan: Plan) -> str:
    """One line saying what the trace runs, so nobody reads it as the CUDA program."""
    p = plan.parallelism
    cp = ""
    if p.cp > 1:
        cp = ", CP all-gather-K/V (portable)"
        if plan.cp_impl not in TRACEABLE_CP_IMPLS:
            cp += f" standing in for {plan.cp_impl}"
    return (f"traced: this project's runtime on CPU under fake tensors (rank 0 of {p.world_size}, fake process "
            f"group), params {plan.precision.param_dtype} / fp32 master, FSDP2{', TP' if p.tp > 1 else ''}{cp}, "
            "CPU attention kernels; not the CUDA program (kernel workspaces, CUDA context, NCCL are not tensors here)")


def check_plan(plan: Plan, memory_headroom: MemoryHeadroom | None = None) -> dict:
    """Predicted vs traced tensor bytes per component, and whether the plan fits in its
    usable memory: capacity less ``memory_headroom`` (default: the headroom the plan was
    made with, else the planner's default)."""
    from cost_models.memory import estimate_memory
    from runtime.trace import trace_plan_memory

    model = plan.model_spec()
    stand_in = plan.cp_impl not in TRACEABLE_CP_IMPLS
    traced_plan = plan.model_copy(update={"cp_impl": "allgather-kv"}) if stand_in else plan
    # Compare like with like: the prediction for the program that was traced.
    predicted = estimate_memory(model, traced_plan.train_config(), plan.executor_spec())
    traced = trace_plan_memory(traced_plan)
    # The plan's own program, for the verdict when the trace could not run it.
    planned = estimate_memory(model, plan.train_config(), plan.executor_spec()) if stand_in else predicted
    tensor_predicted = dict(predicted.breakdown_bytes)
    # Activations on our side = saved activations + working sets + loss tensors.
    tensor_predicted["activations"] = sum(tensor_predicted.pop(k, 0.0) for k in
                                          ("activations", "recompute_working", "logits_loss"))
    non_tensor = tensor_predicted.pop("overhead", 0.0) + tensor_predicted.pop("comm_buffers", 0.0)
    rows = {name: (tensor_predicted.get(name, 0.0), traced.components.get(name, 0.0)) for name in COMPONENTS}
    cluster = plan.cluster_spec()
    capacity = float(cluster.gpu.memory_bytes) if cluster else None
    usable = None
    if capacity is not None:
        if memory_headroom is not None:
            headroom = memory_headroom.bytes_of(capacity)
        elif plan.predicted is not None and plan.predicted.memory_headroom_bytes is not None:
            headroom = plan.predicted.memory_headroom_bytes
        else:
            headroom = DEFAULT_MEMORY_HEADROOM.bytes_of(capacity)
        usable = capacity - headroom
    # The trace covers forward + backward (see runtime/trace.py); compare like with like
    # and fit-check the larger of the traced peak and the predicted optimizer phase.
    predicted_fb = predicted.forward_backward_tensor_peak_bytes
    optimizer_phase = predicted.phase_tensor_bytes.get("optimizer", 0.0)
    return {"rows": rows, "predicted_tensor_peak": predicted_fb, "traced_peak": traced.peak_bytes,
            "optimizer_phase": optimizer_phase, "non_tensor_bytes": non_tensor, "capacity": capacity,
            "usable": usable,
            "phase": predicted.peak_phase, "error": predicted_fb / traced.peak_bytes - 1,
            "program": traced_program(plan), "cp_impl": plan.cp_impl,
            # Set when the trace ran another CP path: the verdict is then the model's alone.
            "untraced_path_need": planned.peak_bytes if stand_in else None}


def needed_bytes(result: dict) -> float:
    """What must fit: the larger of the traced peak and the optimizer phase, plus the reserve;
    for a path the trace did not run, the model's peak for the plan as written."""
    if result.get("untraced_path_need") is not None:
        return result["untraced_path_need"]
    return max(result["traced_peak"], result["optimizer_phase"]) + result["non_tensor_bytes"]


def fits(result: dict) -> bool:
    return result["usable"] is None or needed_bytes(result) <= result["usable"]
