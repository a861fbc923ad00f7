"""``autoplan check PLAN.yaml``: trace the plan's training step with fake tensors (no GPU)
and compare its memory with the prediction, component by component."""

from __future__ import annotations

import importlib.util

from cost_models.specs import GiB

from .errors import UsageError
from .plan import Plan

COMPONENTS = ("params", "optimizer", "grads", "fsdp_unsharded", "activations")


def check_plan(plan: Plan) -> dict:
    """Predicted vs traced tensor bytes per component, and whether the plan fits."""
    from cost_models.memory import estimate_memory
    from runtime.trace import trace_plan_memory

    model = plan.model_spec()
    predicted = estimate_memory(model, plan.train_config(), plan.executor)
    traced = trace_plan_memory(plan)
    tensor_predicted = dict(predicted.breakdown_bytes)
    # Activations on our side = saved activations + working sets + loss tensors.
    tensor_predicted["activations"] = sum(tensor_predicted.pop(k, 0.0) for k in
                                          ("activations", "recompute_working", "logits_loss"))
    non_tensor = tensor_predicted.pop("overhead", 0.0) + tensor_predicted.pop("comm_buffers", 0.0)
    rows = {name: (tensor_predicted.get(name, 0.0), traced.components.get(name, 0.0)) for name in COMPONENTS}
    capacity = (plan.cluster_spec().gpu.memory_bytes if plan.cluster_spec() else None)
    # The trace covers forward + backward (see runtime/trace.py); compare like with like
    # and fit-check the larger of the traced peak and the predicted optimizer phase.
    predicted_fb = predicted.forward_backward_tensor_peak_bytes
    optimizer_phase = predicted.phase_tensor_bytes.get("optimizer", 0.0)
    return {"rows": rows, "predicted_tensor_peak": predicted_fb, "traced_peak": traced.peak_bytes,
            "optimizer_phase": optimizer_phase, "non_tensor_bytes": non_tensor, "capacity": capacity,
            "phase": predicted.peak_phase, "error": predicted_fb / traced.peak_bytes - 1}


def format_check(result: dict) -> str:
    lines = [f"{'component':<18}{'predicted GiB':>14}{'traced GiB':>12}{'error':>9}"]
    for name, (pred, traced) in result["rows"].items():
        error = f"{(pred / traced - 1) * 100:+.1f}%" if traced else ("" if not pred else "n/a")
        lines.append(f"{name:<18}{pred / GiB:>14.3f}{traced / GiB:>12.3f}{error:>9}")
    lines.append(f"{'fwd+bwd peak':<18}{result['predicted_tensor_peak'] / GiB:>14.3f}{result['traced_peak'] / GiB:>12.3f}"
                 f"{result['error'] * 100:>+8.1f}%   (predicted step peak during {result['phase']})")
    lines.append(f"optimizer step (predicted, not traced): {result['optimizer_phase'] / GiB:.3f} GiB")
    lines.append("components are at each side's own peak moment; the peaks are what must fit")
    if result["capacity"]:
        need = max(result["traced_peak"], result["optimizer_phase"]) + result["non_tensor_bytes"]
        verdict = "fits" if need <= result["capacity"] else "DOES NOT FIT"
        lines.append(f"traced peak + {result['non_tensor_bytes'] / GiB:.2f} GiB non-tensor reserve (CUDA context, "
                     f"NCCL, fragmentation) = {need / GiB:.2f} GiB of {result['capacity'] / GiB:.2f}: {verdict}")
    return "\n".join(lines)


def handle(args) -> int:
    if importlib.util.find_spec("torch") is None:
        raise UsageError("autoplan check traces the runtime and needs PyTorch: pip install 'autoplan[runtime]'")
    plan = Plan.load(args.plan_path)
    result = check_plan(plan)
    print(format_check(result))
    need = max(result["traced_peak"], result["optimizer_phase"]) + result["non_tensor_bytes"]
    fits = result["capacity"] is None or need <= result["capacity"]
    return 0 if fits else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser("check", help="trace a plan's memory on CPU (fake tensors) vs the prediction")
    parser.add_argument("plan_path", metavar="PLAN.yaml")
    parser.set_defaults(func=handle)
