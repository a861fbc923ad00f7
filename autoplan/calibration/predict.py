"""What the cost model predicts for a record, with some parameters overridden."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_models.specs import ClusterSpec
from cost_models.step import estimate_step

from .params import EXECUTOR_PARAMS, GPU_PARAMS
from .records import CalibrationRecord


def _with_values(record: CalibrationRecord, values: dict[str, float]):
    model, cluster, cfg, executor = record.specs()
    gpu = cluster.gpu.with_overrides(**{k: v for k, v in values.items() if k in GPU_PARAMS})
    executor_values = {k: v for k, v in values.items() if k in EXECUTOR_PARAMS}
    if "cuda_context_bytes" in executor_values:
        executor_values["cuda_context_bytes"] = int(round(executor_values["cuda_context_bytes"]))
    if executor_values:
        executor = executor.with_overrides(**executor_values)
    return model, ClusterSpec(gpu, cluster.num_gpus, cluster.gpus_per_node), cfg, executor


def predict(record: CalibrationRecord, values: dict[str, float] | None = None) -> tuple[float, float | None]:
    """(step time, peak memory of the record's kind) the cost model predicts with ``values``."""
    model, cluster, cfg, executor = _with_values(record, values or {})
    step = estimate_step(model, cluster, cfg, executor)
    if record.peak_memory_bytes is None:
        return step.step_time_s, None
    memory = step.memory
    assert memory is not None  # estimate_step always prices memory
    if record.peak_memory_kind == "allocated":
        return step.step_time_s, memory.tensor_peak_bytes
    if record.peak_memory_kind == "reserved":
        # The allocator model's reserved peak (block rounding, stranded loss blocks,
        # side-stream pools, the fragmentation remainder): what torchtitan logs.
        return step.step_time_s, memory.reserved_peak_bytes
    return step.step_time_s, memory.peak_bytes


def residuals(records: list[CalibrationRecord], values: dict[str, float]) -> list[float]:
    """log(predicted / measured) for every step time and every measured peak memory."""
    out = []
    for record in records:
        time_s, memory = predict(record, values)
        out.append(math.log(time_s / record.step_time_s))
        if memory is not None and record.peak_memory_bytes:
            out.append(math.log(memory / record.peak_memory_bytes))
    return out


@dataclass
class RecordError:
    """Relative errors (predicted / measured - 1) of one record before and after the fit."""

    label: str
    step_time_before: float
    step_time_after: float
    memory_before: float | None = None
    memory_after: float | None = None


def record_errors(records: list[CalibrationRecord], before: dict[str, float], after: dict[str, float]
                  ) -> list[RecordError]:
    out = []
    for record in records:
        t0, m0 = predict(record, before)
        t1, m1 = predict(record, after)
        measured_m = record.peak_memory_bytes
        out.append(RecordError(record.label, t0 / record.step_time_s - 1, t1 / record.step_time_s - 1,
                               None if m0 is None or not measured_m else m0 / measured_m - 1,
                               None if m1 is None or not measured_m else m1 / measured_m - 1))
    return out
