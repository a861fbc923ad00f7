"""Per-step metrics (JSONL, rank 0), the run summary and the measured-vs-predicted table."""

from __future__ import annotations

import json

import torch

from autoplan.plan import Plan
from cost_models.flops import model_flops_per_token


def peak_flops_per_s(plan: Plan, device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU: the plan's hardware spec, else the preset matching the
    CUDA device name (cost_models.specs via autoplan.probe); None on CPU."""
    if device.type != "cuda":
        return None
    gpu = plan.hardware.get("gpu")
    if gpu and gpu.get("bf16_flops_per_s"):
        return float(gpu["bf16_flops_per_s"])
    try:
        from autoplan.probe import spec_for_nvml_name

        props = torch.cuda.get_device_properties(device)
        return float(spec_for_nvml_name(props.name, props.total_memory)[0].bf16_flops_per_s)
    except Exception:  # an unknown GPU: MFU is reported as null rather than guessed
        return None


class StepMetrics:
    """Turns one step's raw numbers into the JSONL record; rank 0 writes it."""

    def __init__(self, plan: Plan, device: torch.device, world_size: int, path: str | None, write: bool):
        self.plan = plan
        self.device = device
        self.world_size = world_size
        self.flops_per_token = model_flops_per_token(plan.model_spec(), plan.seq_len)
        self.peak = peak_flops_per_s(plan, device)
        self.file = open(path, "a") if (path and write) else None
        self.records: list[dict] = []

    def record(self, step: int, raw: dict, step_time_s: float) -> dict:
        tokens_per_gpu = self.plan.global_batch_tokens / self.world_size / step_time_s
        cuda = self.device.type == "cuda"
        metrics = {
            "step": step,
            "loss": float(raw["loss"]),
            "lr": float(raw["lr"]),
            "grad_norm": float(raw["grad_norm"]),
            "tokens_per_second_per_gpu": tokens_per_gpu,
            "mfu": self.flops_per_token * tokens_per_gpu / self.peak if self.peak else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else None,
            "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(self.device) if cuda else None,
            "step_time_s": step_time_s,
        }
        self.records.append(metrics)
        if self.file:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
        return metrics

    def close(self) -> None:
        if self.file:
            self.file.close()


def summarize_run(plan: Plan, records: list[dict]) -> dict:
    """Steady-state measurement: the first step (warm-up, lazy optimizer state) is dropped.

    Keys: steps, final_loss, step_time_s, tokens_per_second_per_gpu, mfu,
    peak_memory_bytes (max allocated; None off GPU), peak_memory_kind,
    peak_memory_reserved_bytes (max reserved; None off GPU).
    """
    steady = records[1:] or records
    if not steady:
        return {"steps": 0}

    def mean(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    peaks = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes") is not None]
    reserved = [r["peak_memory_reserved_bytes"] for r in records if r.get("peak_memory_reserved_bytes") is not None]
    return {"steps": len(records), "final_loss": records[-1]["loss"], "step_time_s": mean("step_time_s"),
            "tokens_per_second_per_gpu": mean("tokens_per_second_per_gpu"), "mfu": mean("mfu"),
            "peak_memory_bytes": max(peaks) if peaks else None, "peak_memory_kind": "allocated",
            # the caching allocator's reserve: what calibration fits fragmentation from
            "peak_memory_reserved_bytes": max(reserved) if reserved else None}


def format_summary(plan: Plan, summary: dict) -> str:
    """The measured-vs-predicted table (predicted column n/a when the plan has none)."""
    predicted = plan.predicted.model_dump() if plan.predicted else {}
    rows = (("peak memory (GiB)", "peak_memory_bytes", lambda v: f"{v / 2**30:.3f}"),
            ("step time (s)", "step_time_s", lambda v: f"{v:.4f}"),
            ("tokens/s/GPU", "tokens_per_second_per_gpu", lambda v: f"{v:,.0f}"),
            ("MFU", "mfu", lambda v: f"{100 * v:.1f}%"))
    lines = [f"{'':<20}{'measured':>14}{'predicted':>14}{'ratio':>8}"]
    for label, key, fmt in rows:
        measured, expected = summary.get(key), predicted.get(key)
        ratio = f"{measured / expected:.2f}" if measured is not None and expected else ""
        lines.append(f"{label:<20}{'n/a' if measured is None else fmt(measured):>14}"
                     f"{'n/a' if expected is None else fmt(expected):>14}{ratio:>8}")
    return "\n".join(lines)
