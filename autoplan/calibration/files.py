"""Calibration files: read what ``autoplan calibrate`` wrote and apply it to a GPU and an executor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

import cost_models
from cost_models.executors import ExecutorProfile
from cost_models.specs import GPU_PRESETS, GPUSpec, SpecError

from .fit import Calibration
from .params import EXECUTOR_PARAMS, GPU_PARAMS, KNOWN_PARAMS

# The fits on shared/published-runs shipped with the package, one file per GPU preset
# (written by benchmarks/published_runs.py --write-calibration).
SHIPPED_DIR = Path(cost_models.__file__).resolve().parent / "data" / "calibration"
# What ``--calibration`` accepts besides a file: the shipped fit for the GPU (the default) or none.
DEFAULT_CALIBRATION = "default"
NO_CALIBRATION = "none"


def shipped_calibration(gpu: GPUSpec) -> Path | None:
    """The shipped fit for ``gpu``, when the GPU is an unmodified preset that has one.

    A GPU read from a file (``--gpu my.yaml``) or otherwise changed keeps its own values:
    efficiencies fitted for the preset say nothing about a part someone described anew.
    """
    preset = GPU_PRESETS.get(gpu.name)
    path = SHIPPED_DIR / f"{gpu.name}.yaml"
    if preset is None or preset.to_dict() != gpu.to_dict() or not path.is_file():
        return None
    return path


def resolve_calibration(gpu: GPUSpec, executor: ExecutorProfile, choice: str | None
                        ) -> tuple[GPUSpec, ExecutorProfile, str | None]:
    """(GPU, executor, source) for ``--calibration CHOICE``: ``default`` (also None) applies
    the shipped fit for the GPU when there is one, ``none`` the presets' priors, anything
    else is a calibration file. ``source`` is what the plan records (None: priors)."""
    choice = choice or DEFAULT_CALIBRATION
    if choice == NO_CALIBRATION:
        return gpu, executor, None
    if choice == DEFAULT_CALIBRATION:
        path = shipped_calibration(gpu)
        if path is None:
            return gpu, executor, None
        gpu, executor = apply_calibration(gpu, executor, load_calibration(path))
        return gpu, executor, f"{DEFAULT_CALIBRATION} (published runs: {path.name})"
    gpu, executor = calibrated(gpu, executor, choice)
    return gpu, executor, str(choice)


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by ``autoplan calibrate``."""
    where = f"--calibration {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"{where}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError, IsADirectoryError):
        raise SpecError(f"{where}: not a YAML file") from None
    if not isinstance(data, dict) or not isinstance(data.get("fitted"), dict):
        raise SpecError(f"{where}: no 'fitted' mapping (write the file with `autoplan calibrate`)")
    executor_section = data.get("executor") or {}
    if not isinstance(executor_section, dict):
        raise SpecError(f"{where}: 'executor' must be a mapping of executor parameters")
    executor_name = executor_section.get("name") or data.get("executor_name") or "autoplan"
    fitted: dict[str, float] = {}
    for section, entries in (("fitted", data["fitted"]),
                             ("executor", {k: v for k, v in executor_section.items() if k != "name"})):
        for name, value in entries.items():
            if name not in KNOWN_PARAMS:
                raise SpecError(f"{where}: {section}.{name}: unknown parameter (known: {', '.join(KNOWN_PARAMS)})")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise SpecError(f"{where}: {section}.{name}={value!r} must be a number")
            if name == "cuda_context_bytes" and value < 0:
                raise SpecError(f"{where}: {section}.{name}={value!r} must be >= 0")
            if name != "cuda_context_bytes" and not 0 < value <= 1:
                raise SpecError(f"{where}: {section}.{name}={value!r} must be in (0, 1]")
            fitted[name] = float(value)
    gpu = data.get("gpu")
    if gpu is not None and not isinstance(gpu, str):
        raise SpecError(f"{where}: gpu must be a GPU name")
    return Calibration(gpu=gpu or "", executor=str(executor_name), prior=dict(data.get("prior") or {}),
                       fitted=fitted, not_identifiable=dict(data.get("not_identifiable") or {}),
                       std_errors=dict(data.get("std_errors") or {}),
                       rms_error_before=float(data.get("rms_error_before") or 0.0),
                       rms_error_after=float(data.get("rms_error_after") or 0.0),
                       records=int(data.get("records") or 0), created=str(data.get("created") or ""))


def apply_calibration(gpu: GPUSpec, executor: ExecutorProfile, calibration: Calibration | dict[str, Any]
                      ) -> tuple[GPUSpec, ExecutorProfile]:
    """The GPU with fitted efficiencies; the executor with fitted memory terms.

    Memory terms are applied only to the executor they were fitted for.
    """
    if isinstance(calibration, dict):  # the file's mapping, or a bare {param: value}
        fitted = {**(calibration.get("fitted") or {}),
                  **{k: v for k, v in (calibration.get("executor") or {}).items() if k != "name"}} \
            if "fitted" in calibration else dict(calibration)
        executor_name = (calibration.get("executor") or {}).get("name", executor.name) \
            if isinstance(calibration.get("executor"), dict) else executor.name
    else:
        fitted, executor_name = calibration.fitted, calibration.executor or executor.name
    gpu = gpu.with_overrides(**{k: float(v) for k, v in fitted.items() if k in GPU_PARAMS})
    if executor_name == executor.name:
        overrides = {k: v for k, v in fitted.items() if k in EXECUTOR_PARAMS}
        if "cuda_context_bytes" in overrides:
            overrides["cuda_context_bytes"] = int(round(overrides["cuda_context_bytes"]))
        if overrides:
            executor = executor.with_overrides(**overrides)
    return gpu, executor


def calibrated(gpu: GPUSpec, executor: ExecutorProfile, path: str | Path) -> tuple[GPUSpec, ExecutorProfile]:
    """What ``autoplan --calibration FILE`` plans with."""
    calibration = load_calibration(path)
    if calibration.gpu and calibration.gpu != gpu.name:
        raise SpecError(f"--calibration {path}: fitted for {calibration.gpu}, planning for {gpu.name} "
                        f"(pass --gpu {calibration.gpu} or calibrate {gpu.name})")
    return apply_calibration(gpu, executor, calibration)

