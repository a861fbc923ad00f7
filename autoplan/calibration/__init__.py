"""Calibration: fit the cost model's efficiencies and memory reserve to measured runs.

A *record* is one measured run: the layout that ran (model, GPU, degrees, mesh order,
sequence, batch, per-layer activation checkpointing, CP implementation, executor) and
what was measured (steady-state step time, peak memory and what kind of peak it is,
tokens/s per GPU, MFU). ``runtime.train --record FILE`` appends them; a file is JSON
lines or one JSON list.

``fit_calibration`` (``fit.py``) solves a bounded nonlinear least-squares problem on
relative errors with ``scipy.optimize.least_squares`` (the ``calibrate`` extra); a
parameter the records cannot pin down keeps its prior and says why.

Peak memory means different things depending on who measured it, and only some kinds
see the allocator's fragmentation (``peak_memory_kind``):

- ``allocated``: ``torch.cuda.max_memory_allocated`` - live tensors only; compared with
  the model's tensor peak. Says nothing about fragmentation or reserve.
- ``reserved``: ``torch.cuda.max_memory_reserved`` - tensors x (1 + fragmentation).
- ``device``: the whole process on the device (nvidia-smi / NVML) - reserved + the CUDA
  context + NCCL buffers, i.e. the model's ``peak_memory_bytes``.

from __future__ import annotations
Modules: ``records`` (what ran and what was measured), ``predict`` (the cost model with
some parameters overridden), ``fit`` (the least-squares fit), ``files`` (calibration
files and applying them), ``params`` (what may be fitted).
"""

from .files import apply_calibration, calibrated, load_calibration, resolve_calibration, shipped_calibration
from .fit import Calibration, fit_calibration
from .params import DEFAULT_PARAMS, EXECUTOR_PARAMS, GPU_PARAMS, KNOWN_PARAMS, PEAK_MEMORY_KINDS
from .predict import RecordError, predict, record_errors, residuals
from .records import CalibrationRecord, load_records, record_from_plan_and_measurement, split_holdout, write_records

__all__ = ["Calibration", "CalibrationRecord", "DEFAULT_PARAMS", "EXECUTOR_PARAMS", "GPU_PARAMS", "KNOWN_PARAMS",
           "PEAK_MEMORY_KINDS", "RecordError", "apply_calibration", "calibrated", "fit_calibration",
           "load_calibration", "load_records", "resolve_calibration", "shipped_calibration", "predict", "record_errors", "record_from_plan_and_measurement",
           "residuals", "split_holdout", "write_records"]
