"""Calibration: fit the cost model's efficiencies and memory reserve to measured runs.

A *record* is one measured run: the layout that ran (model, GPU, degrees, mesh order,
sequence, batch, per-layer activation checkpointing, CP implementation, executor) and
what was measured (steady-state step time, peak memory and what kind of peak it is,
tokens/s per GPU, MFU). ``runtime.train --record FILE`` appends them; a file is JSON
lines or one JSON list.

``fit_calibration`` solves a bounded nonlinear least-squares problem on relative errors,
``log(predicted / measured)``, of every step time and every measured peak memory, with
Levenberg-Marquardt and forward-difference derivatives through ``estimate_step``.
Efficiencies and the fragmentation fraction are fitted in logit space (so they stay in
(0, 1)), the optional reserve bytes in log space (so it stays positive). The problem has
at most six parameters, so the normal equations are solved in pure Python.

A parameter the records cannot pin down keeps its prior and is reported as "not
identifiable from these records": either no record's prediction depends on it (every
record ran inside one node, so the network efficiency never enters), or its standard
error - from the Jacobian at the fit and the residual scatter, with a 1% floor for
timing noise - exceeds ``MAX_RELATIVE_STD_ERROR`` of its value (it is confounded with
another parameter, or seen only through a term too small to measure).

Peak memory means different things depending on who measured it, and only some kinds
see the allocator's fragmentation (``peak_memory_kind``):

- ``allocated``: ``torch.cuda.max_memory_allocated`` - live tensors only; compared with
  the model's tensor peak. Says nothing about fragmentation or reserve.
- ``reserved``: ``torch.cuda.max_memory_reserved`` - tensors x (1 + fragmentation).
- ``device``: the whole process on the device (nvidia-smi / NVML) - reserved + the CUDA
  context + NCCL buffers, i.e. the model's ``peak_memory_bytes``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import ExecutorProfile, resolve_executor
from cost_models.specs import GPU_PRESETS, ClusterSpec, GPUSpec, ModelSpec, SpecError
from cost_models.step import estimate_step

GPU_PARAMS = ("matmul_efficiency", "attention_efficiency", "intra_node_bus_efficiency", "inter_node_bus_efficiency",
              "clock_fraction_at_limit")
EXECUTOR_PARAMS = ("allocator_fragmentation", "cuda_context_bytes")
DEFAULT_PARAMS = GPU_PARAMS[:4] + ("allocator_fragmentation",)
KNOWN_PARAMS = GPU_PARAMS + EXECUTOR_PARAMS
TIME_PARAMS = GPU_PARAMS  # kept for callers of the first version
ALL_PARAMS = DEFAULT_PARAMS

# A fitted parameter whose standard error exceeds this fraction of its value is not
# identified by the records: it is reported as such and kept at its prior.
MAX_RELATIVE_STD_ERROR = 0.25
# Step times repeat to about 1% between runs of the same plan; the standard errors use
# at least this much scatter, so a fit through a handful of points is not over-trusted.
NOISE_FLOOR = 0.01
PEAK_MEMORY_KINDS = ("allocated", "reserved", "device")

_NOT_SEEN_HINT = {
    "inter_node_bus_efficiency": "no record sends traffic across nodes where it is not hidden behind compute",
    "intra_node_bus_efficiency": "no record's intra-node communication is exposed (it is hidden behind compute)",
    "attention_efficiency": "no record spends measurable time in attention",
    "matmul_efficiency": "no record spends measurable time in matmuls",
    "allocator_fragmentation": "no record measured reserved or device memory (peak_memory_kind allocated only sees tensors)",
    "cuda_context_bytes": "no record measured device memory (peak_memory_kind device)",
}


# ------------------------------------------------------------------------ records


class CalibrationRecord(BaseModel):
    """One measured run: what ran and what was measured."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    # What ran
    model: dict[str, Any]
    gpu: dict[str, Any]  # the resolved GPUSpec dict the plan was made for (its efficiencies are priors)
    num_gpus: int = Field(..., ge=1)
    gpus_per_node: int = Field(..., ge=1)
    parallelism: dict[str, int]
    mesh_order: list[str] = Field(default_factory=lambda: ["dp_replicate", "dp_shard", "cp", "tp"])
    seq_len: int = Field(..., ge=1)
    local_batch_size: int = Field(1, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    layer_modes: list[Literal["none", "selective", "full"]] | Literal["none", "selective", "full"]
    cp_impl: Literal["none", "allgather-kv", "ring-allgather", "ring-alltoall"] = "none"
    executor: Literal["autoplan", "torchtitan"] = "autoplan"
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    loss_chunk_tokens: int | None = Field(None, ge=1)  # None: the executor profile's
    # What was measured
    step_time_s: float = Field(..., gt=0)
    peak_memory_bytes: float | None = Field(None, gt=0)
    peak_memory_kind: Literal["allocated", "reserved", "device"] | None = None
    tokens_per_second_per_gpu: float | None = None
    mfu: float | None = None
    device_name: str | None = None  # what actually ran (e.g. torch.cuda.get_device_name)
    source: str = ""  # who/what produced the record ("runtime.train", "synthetic: ...")
    notes: str = ""

    @field_validator("model", mode="before")
    @classmethod
    def _model_preset(cls, value: Any) -> Any:
        from cost_models.specs import resolve_model

        return resolve_model(value).to_dict() if isinstance(value, str) else value

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu_preset(cls, value: Any) -> Any:
        from cost_models.specs import resolve_gpu

        return resolve_gpu(value).to_dict() if isinstance(value, str) else value

    @field_validator("parallelism")
    @classmethod
    def _degrees(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - {"dp_replicate", "dp_shard", "cp", "tp", "pp"}
        if unknown:
            raise ValueError(f"unknown degree {sorted(unknown)[0]!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "CalibrationRecord":
        if self.peak_memory_bytes is not None and self.peak_memory_kind is None:
            raise ValueError("peak_memory_kind is required with peak_memory_bytes: allocated "
                             "(torch.cuda.max_memory_allocated), reserved (max_memory_reserved) or device (NVML)")
        if self.parallelism.get("cp", 1) > 1 and self.cp_impl == "none":
            self.cp_impl = "allgather-kv"  # as the plan document defaults it
        world = math.prod(self.parallelism.values())
        if world != self.num_gpus:
            raise ValueError(f"parallelism degrees multiply to {world}, num_gpus is {self.num_gpus}")
        return self

    # -- cost-model inputs
    def specs(self) -> tuple[ModelSpec, ClusterSpec, TrainConfig, ExecutorProfile]:
        from cost_models.config import Precision

        model = ModelSpec.from_dict(self.model)
        gpu = GPUSpec.from_dict(self.gpu)
        modes = self.layer_modes
        modes = tuple([modes] * model.n_layers) if isinstance(modes, str) else tuple(modes)
        if len(modes) != model.n_layers:
            raise SpecError(f"layer_modes has {len(modes)} entries for a model of {model.n_layers} layers")
        precision = (Precision.fp32() if self.param_dtype == "float32"
                     else Precision(grad_reduce_bytes=2 if self.reduce_dtype == "bfloat16" else 4))
        cfg = TrainConfig(Parallelism(**self.parallelism), self.seq_len, self.local_batch_size,
                          self.grad_accum_steps, ACPolicy(modes), self.cp_impl, tuple(self.mesh_order), precision)
        executor = resolve_executor(self.executor)
        if self.loss_chunk_tokens is not None and self.executor == "autoplan":
            executor = executor.with_overrides(loss_chunk_tokens=self.loss_chunk_tokens)
        return model, ClusterSpec(gpu, self.num_gpus, self.gpus_per_node), cfg, executor

    @property
    def label(self) -> str:
        degrees = ",".join(f"{k}={v}" for k, v in self.parallelism.items() if v > 1 and k != "pp") or "single"
        modes = self.layer_modes if isinstance(self.layer_modes, str) else (
            self.layer_modes[0] if len(set(self.layer_modes)) == 1 else "mixed")
        seq = f"{self.seq_len // 1024}k" if self.seq_len % 1024 == 0 else str(self.seq_len)
        return f"{self.num_gpus}x {degrees} seq={seq} ac={modes}"

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> "CalibrationRecord":
        """A record dict, or what ``runtime.train --record`` writes ({plan, measured, ...})."""
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "plan" in data and "measured" in data:
            try:
                return record_from_plan_and_measurement(
                    data["plan"], data["measured"], source=data.get("source") or "runtime.train",
                    device_name=data.get("device_name"))
            except (SpecError, ValueError) as error:
                raise SpecError(f"{where}: {error}") from None
        try:
            record = cls.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise SpecError(f"{where}: {'field ' + loc + ': ' if loc else ''}{first['msg'].removeprefix('Value error, ')}") from None
        try:
            predict(record)  # the cost model can price it (specs valid, layout runnable)
        except (SpecError, TypeError, ValueError) as error:
            raise SpecError(f"{where}: {str(error).splitlines()[0]}") from None
        return record


def record_from_plan_and_measurement(plan: Any, measured: dict[str, Any], source: str = "runtime.train",
                                     device_name: str | None = None, notes: str = "") -> CalibrationRecord:
    """A record from the plan that ran (Plan or its dict) and the run's summary.

    ``measured`` has ``step_time_s``, ``peak_memory_bytes`` (may be None),
    ``tokens_per_second_per_gpu`` and ``mfu``. ``peak_memory_kind`` says what the peak
    is; it defaults to ``allocated`` (the runtime reports torch.cuda.max_memory_allocated).
    A ``peak_memory_reserved_bytes`` entry, when present, is used instead, as ``reserved``.
    """
    from .plan import Plan

    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    cluster = plan.cluster_spec()
    if cluster is None:
        raise SpecError("record: the plan has no hardware.gpu (make it with `autoplan plan` first)")
    if not isinstance(measured, dict):
        raise SpecError("record: the measurement must be a mapping with step_time_s")
    step = measured.get("step_time_s")
    if not isinstance(step, (int, float)) or not step > 0:
        raise SpecError(f"record: measured step_time_s={step!r} must be a positive number")
    model = plan.model_spec()
    peak, kind = measured.get("peak_memory_bytes"), measured.get("peak_memory_kind", "allocated")
    if measured.get("peak_memory_reserved_bytes"):
        peak, kind = measured["peak_memory_reserved_bytes"], "reserved"
    modes = list(plan.activation_checkpoint.layer_modes(model.n_layers))
    return CalibrationRecord(
        model=model.to_dict(), gpu=cluster.gpu.to_dict(), num_gpus=plan.parallelism.world_size,
        gpus_per_node=cluster.gpus_per_node, parallelism=plan.parallelism.model_dump(),
        mesh_order=list(plan.mesh_order), seq_len=plan.seq_len, local_batch_size=plan.local_batch_size,
        grad_accum_steps=plan.grad_accum_steps,
        layer_modes=modes[0] if len(set(modes)) == 1 else modes,
        cp_impl=plan.cp_impl, executor=plan.executor, param_dtype=plan.precision.param_dtype,
        reduce_dtype=plan.precision.reduce_dtype, loss_chunk_tokens=plan.loss_chunk_tokens,
        step_time_s=float(step), peak_memory_bytes=float(peak) if peak else None,
        peak_memory_kind=kind if peak else None,
        tokens_per_second_per_gpu=measured.get("tokens_per_second_per_gpu"), mfu=measured.get("mfu"),
        device_name=device_name, source=source, notes=notes)


def load_records(paths: Iterable[str | Path]) -> list[CalibrationRecord]:
    """Records from JSON-lines files or files holding one JSON list."""
    records: list[CalibrationRecord] = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise SpecError(f"calibrate: {path}: file not found") from None
        except (IsADirectoryError, UnicodeDecodeError) as error:
            raise SpecError(f"calibrate: {path}: cannot read records ({type(error).__name__})") from None
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as error:
                raise SpecError(f"calibrate: {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
            records += [CalibrationRecord.from_dict(item, f"{path}: record {i}") for i, item in enumerate(items, 1)]
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise SpecError(f"calibrate: {path}:{number}: not JSON ({error.msg})") from None
            records.append(CalibrationRecord.from_dict(data, f"{path}:{number}"))
    if not records:
        raise SpecError("calibrate: no records found in " + ", ".join(map(str, paths)))
    return records


def write_records(records: Iterable[CalibrationRecord], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(r.model_dump_json(exclude_defaults=False) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------ the model


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
    if record.peak_memory_kind == "allocated":
        return step.step_time_s, memory.tensor_peak_bytes
    if record.peak_memory_kind == "reserved":
        return step.step_time_s, memory.tensor_peak_bytes * (1 + executor.allocator_fragmentation)
    return step.step_time_s, memory.peak_bytes


def residuals(records: list[CalibrationRecord], values: dict[str, float]) -> list[float]:
    """log(predicted / measured) for every step time and every measured peak memory."""
    out = []
    for record in records:
        time_s, memory = predict(record, values)
        out.append(math.log(time_s / record.step_time_s))
        if memory is not None:
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
                               None if m0 is None else m0 / measured_m - 1,
                               None if m1 is None else m1 / measured_m - 1))
    return out


# ------------------------------------------------------------------------ the fit


def _to_z(value: float, name: str) -> float:
    if name == "cuda_context_bytes":
        return math.log(max(value, 1.0))
    value = min(max(value, 1e-6), 1 - 1e-6)
    return math.log(value / (1 - value))  # logit: efficiencies and fragmentation live in (0, 1)


def _from_z(z: float, name: str) -> float:
    if name == "cuda_context_bytes":
        return math.exp(min(z, 60.0))
    return 1 / (1 + math.exp(-max(min(z, 40.0), -40.0)))


def _dvalue_dz(value: float, name: str) -> float:
    return value if name == "cuda_context_bytes" else value * (1 - value)


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (systems of at most six unknowns)."""
    n = len(rhs)
    a = [row[:] + [rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if abs(a[col][col]) < 1e-300:
            raise ZeroDivisionError("singular normal equations")
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def _inverse_diagonal(jtj: list[list[float]]) -> list[float]:
    """Diagonal of (J^T J)^-1, computed on the unit-diagonal scaling (with a tiny ridge).

    A zero column (a parameter nothing depends on) has an infinite variance.
    """
    n = len(jtj)
    live = [i for i in range(n) if jtj[i][i] > 0]
    scale = {i: math.sqrt(jtj[i][i]) for i in live}
    corr = [[jtj[i][j] / (scale[i] * scale[j]) + (1e-12 if i == j else 0.0) for j in live] for i in live]
    out = [math.inf] * n
    for k, i in enumerate(live):
        unit = [1.0 if m == k else 0.0 for m in range(len(live))]
        try:
            out[i] = _solve(corr, unit)[k] / jtj[i][i]
        except ZeroDivisionError:
            pass
    return out


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def _jacobian(fun, z: list[float], base: list[float], indices: list[int], step: float = 1e-4) -> list[list[float]]:
    """Forward-difference columns d residual / d z_i for the given indices."""
    columns = []
    for i in indices:
        shifted = z[:]
        shifted[i] += step
        columns.append([(a - b) / step for a, b in zip(fun(shifted), base)])
    return columns


def _levenberg_marquardt(fun, z: list[float], active: list[int], max_iterations: int = 60
                         ) -> tuple[list[float], list[float], int]:
    current = fun(z)
    cost = sum(r * r for r in current)
    damping = 1e-3
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        columns = _jacobian(fun, z, current, active)
        jtj = [[sum(a * b for a, b in zip(ci, cj)) for cj in columns] for ci in columns]
        jtr = [sum(a * r for a, r in zip(ci, current)) for ci in columns]
        improved = False
        for _ in range(12):
            system = [[v + (damping * (jtj[k][k] + 1e-12) if k == m else 0.0) for m, v in enumerate(row)]
                      for k, row in enumerate(jtj)]
            try:
                delta = _solve(system, [-v for v in jtr])
            except ZeroDivisionError:
                damping *= 10
                continue
            trial = z[:]
            for k, i in enumerate(active):
                trial[i] += max(min(delta[k], 3.0), -3.0)  # a trust region in logit units
            trial_residuals = fun(trial)
            trial_cost = sum(r * r for r in trial_residuals)
            if trial_cost < cost:
                gain = cost - trial_cost
                z, current, cost = trial, trial_residuals, trial_cost
                damping = max(damping / 3, 1e-9)
                improved = True
                break
            damping *= 10
        if not improved or gain <= 1e-12 * max(cost, 1e-30) or max(abs(d) for d in delta) < 1e-8:
            break
    return z, current, iterations


@dataclass
class Calibration:
    """Fitted parameters for one GPU kind (and one executor's memory terms)."""

    gpu: str
    executor: str
    prior: dict[str, float]
    fitted: dict[str, float]  # only the parameters the records identified
    not_identifiable: dict[str, str]  # parameter -> why it kept its prior
    std_errors: dict[str, float] = field(default_factory=dict)  # of the fitted values
    rms_error_before: float = 0.0  # RMS of log(predicted / measured), all residuals
    rms_error_after: float = 0.0
    records: int = 0
    per_record: list[RecordError] = field(default_factory=list)
    iterations: int = 0
    created: str = ""

    @property
    def values(self) -> dict[str, float]:
        """Every parameter: fitted where identified, else its prior."""
        return {**self.prior, **self.fitted}

    # Back-compat names
    @property
    def rms_before(self) -> float:
        return self.rms_error_before

    @property
    def rms_after(self) -> float:
        return self.rms_error_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "fitted": {k: float(v) for k, v in self.fitted.items() if k in GPU_PARAMS},
            "executor": {"name": self.executor,
                         **{k: float(v) for k, v in self.fitted.items() if k in EXECUTOR_PARAMS}},
            "prior": {k: float(v) for k, v in self.prior.items()},
            "std_errors": {k: float(v) for k, v in self.std_errors.items()},
            "not_identifiable": dict(self.not_identifiable),
            "records": self.records,
            "rms_error_before": float(self.rms_error_before),
            "rms_error_after": float(self.rms_error_after),
            "created": self.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


def _prior_values(gpu: GPUSpec, executor: ExecutorProfile, params: tuple[str, ...]) -> dict[str, float]:
    preset = GPU_PRESETS.get(gpu.name, gpu)
    return {p: float(getattr(preset if p in GPU_PARAMS else executor, p)) for p in params}


def fit_calibration(records: list[CalibrationRecord], params: Iterable[str] = DEFAULT_PARAMS,
                    prior: dict[str, float] | None = None, max_iterations: int = 60) -> Calibration:
    """Least-squares fit of ``params`` to the records, starting from the priors.

    Priors: ``prior`` where given, else the GPU preset of that name (the records' own
    GPU dict for a GPU that is no preset) and the records' executor profile.
    """
    params = tuple(dict.fromkeys(params))
    unknown = [p for p in params if p not in KNOWN_PARAMS]
    if unknown:
        raise SpecError(f"calibrate: unknown parameter {unknown[0]!r}; fit any of {', '.join(KNOWN_PARAMS)}")
    if not records:
        raise SpecError("calibrate: no records to fit")
    gpus = sorted({str(r.gpu.get("name")) for r in records})
    if len(gpus) != 1:
        raise SpecError(f"calibrate: records mix GPUs {gpus}; fit one GPU kind at a time")
    executors = sorted({r.executor for r in records})
    if len(executors) != 1 and any(p in EXECUTOR_PARAMS for p in params):
        raise SpecError(f"calibrate: records mix executors {executors}; memory terms belong to one executor "
                        "(fit them separately)")
    gpu = GPUSpec.from_dict(records[0].gpu)
    executor = resolve_executor(records[0].executor)
    priors = _prior_values(gpu, executor, params)
    for name, value in (prior or {}).items():
        if name in priors:
            priors[name] = float(value)

    z0 = [_to_z(priors[p], p) for p in params]

    def values_of(zs: list[float]) -> dict[str, float]:
        return {p: _from_z(v, p) for p, v in zip(params, zs)}

    def fun(zs: list[float]) -> list[float]:
        return residuals(records, values_of(zs))

    base = fun(z0)
    rms_before = _rms(base)
    not_identifiable: dict[str, str] = {}
    initial_columns = _jacobian(fun, z0, base, list(range(len(params))))
    for i, column in enumerate(initial_columns):
        if max((abs(c) for c in column), default=0.0) < 1e-7:
            not_identifiable[params[i]] = "no record's prediction depends on it: " + _NOT_SEEN_HINT[params[i]]
    active = [i for i in range(len(params)) if params[i] not in not_identifiable]

    # Fit; drop the worst-determined parameter while any is determined worse than
    # MAX_RELATIVE_STD_ERROR, and refit the rest from the priors.
    z, current, iterations, std_errors = z0[:], base, 0, {}
    while active:
        z, current, iterations = _levenberg_marquardt(fun, z0[:], active, max_iterations)
        columns = _jacobian(fun, z, current, active)
        jtj = [[sum(a * b for a, b in zip(ci, cj)) for cj in columns] for ci in columns]
        dof = len(current) - len(active)
        scatter = max(math.sqrt(sum(r * r for r in current) / dof) if dof > 0 else 0.0, NOISE_FLOOR)
        inverse = _inverse_diagonal(jtj)
        values = values_of(z)
        relative = {}
        for k, i in enumerate(active):
            name = params[i]
            se = scatter * math.sqrt(max(inverse[k], 0.0)) * _dvalue_dz(values[name], name)
            se = math.inf if math.isnan(se) else se  # a parameter pinned at its bound (inf x 0)
            std_errors[name] = se
            relative[i] = se / values[name] if values[name] > 0 else math.inf
        worst = max(active, key=lambda i: (relative[i], i))
        if relative[worst] <= MAX_RELATIVE_STD_ERROR:
            break
        name = params[worst]
        partner = _most_collinear(columns, active, worst)
        detail = f"; confounded with {params[partner]}" if partner is not None else ""
        if name != "cuda_context_bytes" and not 1e-3 < values[name] < 1 - 1e-3:
            reason = f"ran to its bound ({values[name]:.2g}): the records and the model disagree about it"
        elif relative[worst] > 10:
            reason = "these records do not determine it"
        else:
            reason = f"determined only to +-{relative[worst] * 100:.0f}% by these records"
        not_identifiable[name] = reason + detail
        std_errors.pop(params[worst], None)
        active.remove(worst)
    if not active:
        z, current = z0[:], base
    values = values_of(z)
    fitted = {params[i]: values[params[i]] for i in active}
    per_record = record_errors(records, priors, {**priors, **fitted})
    return Calibration(gpu=gpu.name, executor=executor.name, prior=priors, fitted=fitted,
                       not_identifiable={p: not_identifiable[p] for p in params if p in not_identifiable},
                       std_errors={p: std_errors[p] for p in fitted}, rms_error_before=rms_before,
                       rms_error_after=_rms(current), records=len(records), per_record=per_record,
                       iterations=iterations, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _most_collinear(columns: list[list[float]], active: list[int], target: int) -> int | None:
    k = active.index(target)
    norm = lambda c: math.sqrt(sum(x * x for x in c)) or 1e-300
    best, best_cos = None, 0.5
    for m, i in enumerate(active):
        if i == target:
            continue
        cos = abs(sum(a * b for a, b in zip(columns[k], columns[m]))) / (norm(columns[k]) * norm(columns[m]))
        if cos > best_cos:
            best, best_cos = i, cos
    return best


# ------------------------------------------------------------------------ files


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


def calibrated(gpu: GPUSpec, executor_name: str | None, path: str | Path) -> tuple[GPUSpec, ExecutorProfile]:
    """What ``autoplan --calibration FILE`` plans with."""
    calibration = load_calibration(path)
    if calibration.gpu and calibration.gpu != gpu.name:
        raise SpecError(f"--calibration {path}: fitted for {calibration.gpu}, planning for {gpu.name} "
                        f"(pass --gpu {calibration.gpu} or calibrate {gpu.name})")
    return apply_calibration(gpu, resolve_executor(executor_name), calibration)


# ------------------------------------------------------------------------ CLI


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def error_table(errors: list[RecordError]) -> str:
    width = max([len("record")] + [len(e.label) for e in errors])
    lines = [f"  {'record':<{width}}  {'time before':>11}  {'time after':>10}  {'mem before':>10}  {'mem after':>9}"]
    for e in errors:
        lines.append(f"  {e.label:<{width}}  {_pct(e.step_time_before):>11}  {_pct(e.step_time_after):>10}  "
                     f"{_pct(e.memory_before):>10}  {_pct(e.memory_after):>9}")
    mean = lambda xs: sum(abs(x) for x in xs) / len(xs) if xs else None
    mem_b = [e.memory_before for e in errors if e.memory_before is not None]
    mem_a = [e.memory_after for e in errors if e.memory_after is not None]
    lines.append(f"  {'mean |error|':<{width}}  {_pct(mean([e.step_time_before for e in errors])).lstrip('+'):>11}  "
                 f"{_pct(mean([e.step_time_after for e in errors])).lstrip('+'):>10}  "
                 f"{_pct(mean(mem_b)).lstrip('+'):>10}  {_pct(mean(mem_a)).lstrip('+'):>9}")
    return "\n".join(lines)


def _holdout_fraction(text: str) -> float:
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def split_holdout(records: list[CalibrationRecord], fraction: float, seed: int
                  ) -> tuple[list[CalibrationRecord], list[CalibrationRecord]]:
    """(fit, held out): a seeded shuffle, at least one record held out when fraction > 0."""
    if fraction <= 0:
        return records, []
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    count = max(1, int(round(len(records) * fraction)))
    if count >= len(records):
        raise SpecError(f"calibrate: --holdout {fraction} of {len(records)} records leaves none to fit")
    return shuffled[count:], shuffled[:count]


def handle(args) -> int:
    records = load_records(args.records)
    skipped = [r for r in records if (r.device_name or "").lower() == "cpu"]
    records = [r for r in records if r not in skipped]
    if skipped:
        print(f"note: skipped {len(skipped)} record(s) measured on cpu (timings do not calibrate a GPU)")
    if not records:
        raise SpecError("calibrate: no GPU-measured records left to fit")
    params = tuple(p.strip() for p in args.params.split(",") if p.strip()) if args.params else DEFAULT_PARAMS
    fit_records, held_out = split_holdout(records, args.holdout, args.seed)
    result = fit_calibration(fit_records, params)
    print(f"fitted {result.records} record(s) for {result.gpu} ({result.executor}): "
          f"rms log-error {result.rms_error_before:.3f} -> {result.rms_error_after:.3f}")
    for name in params:
        scale, unit = (2**20, " MiB") if name == "cuda_context_bytes" else (1, "")
        if name in result.fitted:
            print(f"  {name:<27}{result.prior[name] / scale:9.3f} -> {result.fitted[name] / scale:8.3f}"
                  f" +- {result.std_errors[name] / scale:.3f}{unit}")
        else:
            print(f"  {name:<27}{result.prior[name] / scale:9.3f}{unit}    kept: not identifiable from these "
                  f"records ({result.not_identifiable[name]})")
    if result.rms_error_after > 0.1:
        print(f"warning: after the fit the model still misses these records by {result.rms_error_after:.0%} (rms); "
              "check the records (right plan, steady-state steps, GPU) before trusting the calibration")
    if args.verbose:
        print("fit records (relative error, predicted / measured - 1):")
        print(error_table(result.per_record))
    if held_out:
        print(f"held-out records ({len(held_out)}, seed {args.seed}): relative error, predicted / measured - 1")
        print(error_table(record_errors(held_out, result.prior, result.values)))
    if args.out:
        result.save(args.out)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit GPU efficiencies and memory terms to measured run records",
        description="Fit the cost model's efficiencies (and allocator fragmentation) to measured runs. "
                    "RECORDS are JSON-lines files (or JSON lists) written by `autoplan run --record`.")
    parser.add_argument("records", nargs="+", metavar="RECORDS")
    parser.add_argument("--out", default="calibration.yaml", help="calibration file to write (default calibration.yaml)")
    parser.add_argument("--holdout", type=_holdout_fraction, default=0.0,
                        help="fraction of records held out of the fit and used to check it, e.g. 0.25")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--params", default=None,
                        help=f"comma-separated parameters to fit (default {','.join(DEFAULT_PARAMS)}; "
                             "also cuda_context_bytes)")
    parser.add_argument("--verbose", "-v", action="store_true", help="also print the per-record errors of the fit set")
    parser.set_defaults(func=handle)
