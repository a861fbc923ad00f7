"""A plan's predicted memory against the runtime's traced memory (fake tensors, no GPU).

Two programs can be traced. The CUDA program (``runtime/cuda_trace.py``, a process of its
own on a fake CUDA device): FSDP2 mixed precision as on GPU, the fused SDPA kernel's ops
and PyTorch's own ring attention - what a GPU would run, less kernel workspaces. The CPU
program (``runtime/trace.py`` in this process): CPU attention kernels, and ring CP through
the portable all-gather-K/V path. ``program="auto"`` traces the CUDA program where it can
be built (torch 2.13.0 and a C++ compiler) and says when it fell back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .plan import Plan
from .planner import DEFAULT_MEMORY_HEADROOM
from .units import MemoryHeadroom

COMPONENTS = ("params", "optimizer", "grads", "fsdp_unsharded", "activations")
# CP implementations the CPU trace runs as the plan says. PyTorch's ring attention
# (context_parallel) needs CUDA SDPA kernels (design.md), so a ring plan is traced through
# the portable all-gather-K/V path and the trace gives no verdict on the ring itself.
TRACEABLE_CP_IMPLS = ("none", "allgather-kv")


PROGRAMS = ("auto", "cuda", "cpu")
TRACE_TIMEOUT_S = 3600.0  # a 405B rank traces in minutes; a hang must not hang check


def sdpa_backend(plan: Plan) -> str:
    """The SDPA kernel the plan's program runs (the cost model's reading of the program)."""
    from cost_models.kernels import attention_backend_for

    return attention_backend_for(plan.train_config(), plan.executor_spec(), plan.model_spec())


def traced_cuda_program(plan: Plan, backend: str) -> str:
    p = plan.parallelism
    cp = "" if p.cp == 1 else (f", CP {plan.cp_impl} (PyTorch's context_parallel)" if plan.cp_impl.startswith("ring")
                               else ", CP all-gather-K/V (portable)")
    return (f"traced: the CUDA program on a fake CUDA device (fake tensors, rank 0 of {p.world_size}, fake process "
            f"group): FSDP2 params {plan.precision.param_dtype} / reduce {plan.precision.reduce_dtype}"
            f"{', TP' if p.tp > 1 else ''}{cp}, SDPA {backend}; tensor bytes only (no kernel workspaces, "
            "CUDA context, NCCL)")


def trace_cuda(plan: Plan, backend: str) -> tuple[dict | None, str]:
    """(trace, why not): the CUDA program traced in a subprocess, or None and the reason."""
    with tempfile.TemporaryDirectory() as folder:
        plan_path = Path(folder) / "plan.yaml"
        plan.save(plan_path)
        out = Path(folder) / "trace.json"
        try:
            result = subprocess.run([sys.executable, "-m", "runtime.cuda_trace", str(plan_path), "--json", str(out),
                                     "--sdpa-backend", backend], capture_output=True, text=True,
                                    timeout=TRACE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"the trace took more than {TRACE_TIMEOUT_S / 60:.0f} minutes"
        if out.exists():
            return json.loads(out.read_text()), ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    why = next((line.split(": ", 1)[1] for line in lines if line.startswith("runtime.cuda_trace: ")), None)
    return None, why or f"the trace process failed ({lines[-1] if lines else 'exit ' + str(result.returncode)})"


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


@dataclass(frozen=True)
class StagePrediction:
    """One pp rank's predicted memory, read like a pp = 1 ``MemoryEstimate`` by ``_result``."""

    rank: int
    breakdown_bytes: dict[str, float]
    forward_backward_tensor_peak_bytes: float
    phase_tensor_bytes: dict[str, float]
    peak_phase: str
    peak_bytes: float


def predict_stages(plan: Plan) -> list[StagePrediction]:
    """Every pp rank's predicted memory (cost_models/pipeline.py)."""
    from cost_models.pipeline import estimate_pipeline
    from cost_models.specs import ClusterSpec, resolve_gpu

    model, cfg = plan.model_spec(), plan.train_config()
    # Tensor bytes do not depend on the GPU; without hardware in the plan, price an H100.
    cluster = plan.cluster_spec() or ClusterSpec(resolve_gpu("h100"), plan.parallelism.world_size)
    estimate = estimate_pipeline(model, cluster, cfg, plan.executor_spec(), cfg.ac_policy(model.n_layers).layer_modes)
    return [StagePrediction(s.rank, dict(s.breakdown_bytes), s.forward_backward_tensor_bytes,
                            {**s.phase_tensor_bytes, "optimizer": s.optimizer_tensor_bytes}, s.tensor_peak_phase,
                            s.peak_bytes) for s in estimate.stages]


def check_plan(plan: Plan, memory_headroom: MemoryHeadroom | None = None, program: str = "auto",
               pp_rank: int | None = None) -> dict:
    """Predicted vs traced tensor bytes per component, and whether the plan fits in its
    usable memory: capacity less ``memory_headroom`` (default: the headroom the plan was
    made with, else the planner's default). ``program``: see the module docstring.

    pp > 1: one pp rank is traced (the CPU program; the CUDA program's trace runs whole
    models only), ``pp_rank`` or else the rank the model predicts the highest peak for,
    and compared with that rank's prediction."""
    from cost_models.memory import estimate_memory

    if program not in PROGRAMS:
        raise UsageError(f"--program {program!r}: use one of {', '.join(PROGRAMS)}")
    model = plan.model_spec()
    pp = plan.parallelism.pp
    if pp > 1:
        if pp_rank is not None and not 0 <= pp_rank < pp:
            raise UsageError(f"--pp-rank {pp_rank}: the plan has pp={pp} (ranks 0..{pp - 1})")
        if program == "cuda":
            raise UsageError(f"--program cuda with parallelism.pp={pp}: the CUDA program's trace runs one whole "
                             "model (pp = 1); use --program cpu")
        return _check_pipeline(plan, memory_headroom, pp_rank, program == "auto")
    if pp_rank is not None:
        raise UsageError("--pp-rank: the plan has no pipeline (parallelism.pp = 1)")
    fallback_note = ""
    if program in ("auto", "cuda"):
        backend = sdpa_backend(plan)
        cuda_trace, why = trace_cuda(plan, backend)
        if cuda_trace is not None:
            predicted = estimate_memory(model, plan.train_config(), plan.executor_spec())
            traced = TracedPeak(cuda_trace["peak_bytes"], cuda_trace["components"])
            return _result(plan, predicted, predicted, traced, memory_headroom, traced_cuda_program(plan, backend),
                           stand_in=False)
        if program == "cuda":
            raise UsageError(f"--program cuda: {why}")
        fallback_note = f"the CUDA program could not be traced here ({why}): traced the CPU program instead"
    from runtime.trace import trace_plan_memory

    stand_in = plan.cp_impl not in TRACEABLE_CP_IMPLS
    traced_plan = plan.model_copy(update={"cp_impl": "allgather-kv"}) if stand_in else plan
    # Compare like with like: the prediction for the program that was traced.
    predicted = estimate_memory(model, traced_plan.train_config(), plan.executor_spec())
    cpu_trace = trace_plan_memory(traced_plan)
    # The plan's own program, for the verdict when the trace could not run it.
    planned = estimate_memory(model, plan.train_config(), plan.executor_spec()) if stand_in else predicted
    result = _result(plan, predicted, planned, TracedPeak(cpu_trace.peak_bytes, cpu_trace.components), memory_headroom,
                     traced_program(plan), stand_in)
    result["note"] = fallback_note
    return result


def _check_pipeline(plan: Plan, memory_headroom: MemoryHeadroom | None, pp_rank: int | None, auto: bool) -> dict:
    from runtime.trace import trace_plan_memory

    stand_in = plan.cp_impl not in TRACEABLE_CP_IMPLS
    traced_plan = plan.model_copy(update={"cp_impl": "allgather-kv"}) if stand_in else plan
    stages = predict_stages(traced_plan)
    worst = max(stages, key=lambda s: s.forward_backward_tensor_peak_bytes)
    rank = worst.rank if pp_rank is None else pp_rank
    trace = trace_plan_memory(traced_plan, pp_rank=rank)
    planned = max(predict_stages(plan), key=lambda s: s.peak_bytes) if stand_in else stages[rank]
    program = (traced_program(plan).replace(f"rank 0 of {plan.parallelism.world_size}", trace.traced_rank)
               + f"; pp rank {rank} " + ("as asked" if pp_rank is not None else "(the highest predicted peak)")
               + f", its peak at {trace.peak_at}; FSDP2's tracker counts the grads accumulated between "
               "micro-batches (no-sync) as temporaries: traced activations include them")
    result = _result(plan, stages[rank], planned, TracedPeak(trace.peak_bytes, trace.components), memory_headroom,
                     program, stand_in)
    if auto:
        result["note"] = "the CUDA program's trace runs pp = 1 only: traced the CPU program"
    result["pp_rank"] = rank
    result["stage_peaks"] = [s.forward_backward_tensor_peak_bytes for s in stages]
    return result


@dataclass(frozen=True)
class TracedPeak:
    """What a trace reports, whichever program ran: the peak and its components."""

    peak_bytes: float
    components: dict[str, float]


def _result(plan: Plan, predicted, planned, traced: TracedPeak, memory_headroom: MemoryHeadroom | None,
            program: str, stand_in: bool) -> dict:
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
            "program": program, "cp_impl": plan.cp_impl, "note": "",
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
