"""Per-step metrics (JSONL, rank 0), the run summary and the measured-vs-predicted table."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

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


def trim_metrics(path: str | Path, last_step: int) -> None:
    """Drop the lines of steps after ``last_step`` (a resumed run appends them again)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash
    path.write_text("".join(line + "\n" for line in kept))


class StepMetrics:
    """Turns one step's raw numbers into the JSONL record; rank 0 writes it, and prints a
    progress line every ``log_every`` steps (and at ``last_step``)."""

    def __init__(self, plan: Plan, device: torch.device, world_size: int, path: str | None, write: bool,
                 start_step: int = 0, log_every: int = 0, last_step: int | None = None):
        if path and write:
            trim_metrics(path, start_step)
        self.log_every = log_every if write else 0
        self.last_step = last_step
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
        if self.log_every and (step % self.log_every == 0 or step == self.last_step):
            print(progress_line(metrics, self.last_step), flush=True)
        return metrics

    def close(self) -> None:
        if self.file:
            self.file.close()


def progress_line(metrics: dict, last_step: int | None = None) -> str:
    """'step 10/100  loss 4.8123  tokens/s/GPU 1,234  memory 1.20 GiB (allocated)'."""
    if metrics.get("peak_memory_bytes") is not None:
        memory = f"{metrics['peak_memory_bytes'] / 2**30:.2f} GiB (allocated)"
    else:  # CPU: the process's peak resident set (ru_maxrss is KiB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        memory = f"{rss / 2**30:.2f} GiB (process RSS)"
    total = f"/{last_step}" if last_step else ""
    return (f"step {metrics['step']}{total}  loss {metrics['loss']:.4f}  "
            f"tokens/s/GPU {metrics['tokens_per_second_per_gpu']:,.0f}  memory {memory}")


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


def run_device_name(device: torch.device) -> str:
    """The GPU preset this run is on ('h100-sxm-80gb'), the CUDA name when unknown, or 'cpu'."""
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    try:
        from autoplan.probe import spec_for_nvml_name

        return spec_for_nvml_name(props.name, props.total_memory)[0].name
    except Exception:
        return props.name


def format_summary(plan: Plan, summary: dict, run_device: str) -> str:
    """The measured-vs-predicted table. Predictions are for the plan's GPU; the columns are
    compared only when ``run_device`` (a preset name, or 'cpu') is that GPU."""
    planned_for = (plan.hardware.get("gpu") or {}).get("name")
    comparable = planned_for is not None and planned_for == run_device and plan.predicted is not None
    predicted = plan.predicted.model_dump() if comparable else {}
    rows = (("peak memory (GiB)", "peak_memory_bytes", lambda v: f"{v / 2**30:.3f}"),
            ("step time (s)", "step_time_s", lambda v: f"{v:.4f}"),
            ("tokens/s/GPU", "tokens_per_second_per_gpu", lambda v: f"{v:,.0f}"),
            ("MFU", "mfu", lambda v: f"{100 * v:.1f}%"))
    header = f"{'':<20}{'measured':>14}" + (f"{'predicted':>14}{'ratio':>8}" if comparable else "")
    lines = [header]
    for label, key, fmt in rows:
        measured, expected = summary.get(key), predicted.get(key)
        line = f"{label:<20}{'n/a' if measured is None else fmt(measured):>14}"
        if comparable:
            ratio = f"{measured / expected:.2f}" if measured is not None and expected else ""
            line += f"{'n/a' if expected is None else fmt(expected):>14}{ratio:>8}"
        lines.append(line)
    if not comparable:
        lines.append(f"predicted: nothing to compare (the plan predicts {planned_for or 'no GPU'}"
                     f"{'' if plan.predicted is not None else ', without predictions'}; this run is on {run_device})")
    return "\n".join(lines)
