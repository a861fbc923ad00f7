"""Calibration: fit the hardware efficiencies and the memory reserve to measured runs.

A record is one measured run (``runtime.train --record FILE`` writes them): the plan
that ran and its steady-state step time and peak memory. ``fit_calibration`` solves a
bounded nonlinear least-squares problem on relative errors (log predicted / measured)
with Levenberg-Marquardt and numerical derivatives through the cost model itself.
Parameters the records cannot move (e.g. the network efficiency when every record ran
inside one node) keep their prior values and are reported as not identifiable.
Pure Python: the problem has at most a handful of parameters.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import ExecutorProfile, resolve_executor
from cost_models.memory import estimate_memory
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec, SpecError
from cost_models.step import estimate_step

TIME_PARAMS = ("matmul_efficiency", "attention_efficiency", "intra_node_bus_efficiency", "inter_node_bus_efficiency")
MEMORY_PARAMS = ("allocator_fragmentation",)
ALL_PARAMS = TIME_PARAMS + MEMORY_PARAMS


@dataclass
class CalibrationRecord:
    model: dict[str, Any]
    gpu: dict[str, Any]
    num_gpus: int
    gpus_per_node: int
    parallelism: dict[str, int]
    mesh_order: list[str]
    seq_len: int
    local_batch_size: int
    grad_accum_steps: int
    layer_modes: list[str]
    cp_impl: str
    executor: str
    step_time_s: float
    peak_memory_bytes: float | None = None
    source: str = ""

    def config(self) -> tuple[ModelSpec, ClusterSpec, TrainConfig]:
        model = ModelSpec.from_dict(self.model)
        gpu = GPUSpec.from_dict(self.gpu)
        par = Parallelism(**{k: v for k, v in self.parallelism.items() if k != "pp"})
        cfg = TrainConfig(par, self.seq_len, self.local_batch_size, self.grad_accum_steps,
                          ACPolicy(tuple(self.layer_modes)), self.cp_impl, tuple(self.mesh_order))
        return model, ClusterSpec(gpu, self.num_gpus, self.gpus_per_node), cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "record") -> "CalibrationRecord":
        if "plan" in data and "measured" in data:  # what runtime.train --record writes
            return record_from_plan_and_measurement(data["plan"], data["measured"], source=data.get("device_name", ""))
        missing = [f for f in ("model", "gpu", "parallelism", "seq_len", "step_time_s") if f not in data]
        if missing:
            raise SpecError(f"{where}: missing field {missing[0]!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def record_from_plan_and_measurement(plan: Any, measured: dict[str, Any], source: str = "") -> CalibrationRecord:
    """A record from a plan (Plan or its dict) and a run summary (runtime.train.summarize_run)."""
    from .plan import Plan

    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    if plan.cluster_spec() is None:
        raise SpecError("record: the plan has no hardware.gpu (plan it with autoplan first)")
    model = plan.model_spec()
    if not measured.get("step_time_s"):
        raise SpecError("record: the measurement has no step_time_s")
    return CalibrationRecord(
        model=model.to_dict(), gpu=plan.hardware["gpu"], num_gpus=plan.parallelism.world_size,
        gpus_per_node=plan.cluster_spec().gpus_per_node, parallelism=plan.parallelism.model_dump(),
        mesh_order=list(plan.mesh_order), seq_len=plan.seq_len, local_batch_size=plan.local_batch_size,
        grad_accum_steps=plan.grad_accum_steps, layer_modes=list(plan.activation_checkpoint.layer_modes(model.n_layers)),
        cp_impl=plan.cp_impl, executor=plan.executor, step_time_s=float(measured["step_time_s"]),
        peak_memory_bytes=measured.get("peak_memory_bytes"), source=source)


def load_records(paths: list[str]) -> list[CalibrationRecord]:
    records = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise SpecError(f"calibrate: {path}: file not found") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(CalibrationRecord.from_dict(json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as error:
                raise SpecError(f"calibrate: {path}:{number}: not JSON ({error.msg})") from None
    if not records:
        raise SpecError("calibrate: no records found")
    return records


# ------------------------------------------------------------------------ the fit


def _apply(record: CalibrationRecord, values: dict[str, float]) -> tuple[ModelSpec, ClusterSpec, TrainConfig, ExecutorProfile]:
    model, cluster, cfg = record.config()
    gpu = cluster.gpu.with_overrides(**{k: v for k, v in values.items() if k in TIME_PARAMS})
    executor = resolve_executor(record.executor)
    if "allocator_fragmentation" in values:
        executor = executor.with_overrides(allocator_fragmentation=values["allocator_fragmentation"])
    return model, ClusterSpec(gpu, cluster.num_gpus, cluster.gpus_per_node), cfg, executor


def residuals(records: list[CalibrationRecord], values: dict[str, float]) -> list[float]:
    """log(predicted / measured) for every step time and every measured peak memory."""
    out = []
    for record in records:
        model, cluster, cfg, executor = _apply(record, values)
        out.append(math.log(estimate_step(model, cluster, cfg, executor).step_time_s / record.step_time_s))
        if record.peak_memory_bytes:
            out.append(math.log(estimate_memory(model, cfg, executor).peak_bytes / record.peak_memory_bytes))
    return out


def _to_unbounded(value: float, name: str) -> float:
    if name == "allocator_fragmentation":
        return math.log(max(value, 1e-6))
    value = min(max(value, 1e-6), 1 - 1e-6)
    return math.log(value / (1 - value))  # logit: efficiencies live in (0, 1)


def _from_unbounded(z: float, name: str) -> float:
    return math.exp(z) if name == "allocator_fragmentation" else 1 / (1 + math.exp(-z))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (tiny dense systems)."""
    n = len(rhs)
    a = [row[:] + [rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if abs(a[col][col]) < 1e-300:
            raise ZeroDivisionError
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


@dataclass
class Calibration:
    gpu: str
    prior: dict[str, float]
    fitted: dict[str, float]
    not_identifiable: list[str]
    rms_before: float
    rms_after: float
    records: int
    per_record: list[dict[str, float]] = field(default_factory=list)

    def to_yaml(self) -> str:
        data = {"gpu": self.gpu, "fitted": self.fitted, "prior": self.prior, "not_identifiable": self.not_identifiable,
                "records": self.records, "rms_error_before": self.rms_before, "rms_error_after": self.rms_after,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return yaml.safe_dump(data, sort_keys=False)


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def fit_calibration(records: list[CalibrationRecord], params: tuple[str, ...] = ALL_PARAMS,
                    iterations: int = 40) -> Calibration:
    if not records:
        raise SpecError("calibrate: no records")
    gpus = {r.gpu.get("name") for r in records}
    if len(gpus) != 1:
        raise SpecError(f"calibrate: records mix GPUs {sorted(gpus)}; fit one GPU kind at a time")
    gpu = GPUSpec.from_dict(records[0].gpu)
    executor = resolve_executor(records[0].executor)
    prior = {name: (getattr(gpu, name) if name in TIME_PARAMS else executor.allocator_fragmentation) for name in params}
    if not any(r.peak_memory_bytes for r in records):
        params = tuple(p for p in params if p not in MEMORY_PARAMS)
    z = [_to_unbounded(prior[p], p) for p in params]

    def values_of(zs):
        return {p: _from_unbounded(v, p) for p, v in zip(params, zs)}

    def jacobian(zs, base):
        columns = []
        for i in range(len(zs)):
            step = 1e-4
            shifted = zs[:]
            shifted[i] += step
            columns.append([(a - b) / step for a, b in zip(residuals(records, values_of(shifted)), base)])
        return columns

    current = residuals(records, values_of(z))
    before = _rms(current)
    columns = jacobian(z, current)
    # A parameter whose column is ~0 does not affect any record: keep its prior.
    active = [i for i, col in enumerate(columns) if max(abs(c) for c in col) > 1e-6]
    damping = 1e-3
    for _ in range(iterations):
        columns = jacobian(z, current)
        jtj = [[sum(a * b for a, b in zip(columns[i], columns[j])) for j in active] for i in active]
        jtr = [sum(a * r for a, r in zip(columns[i], current)) for i in active]
        improved = False
        for _attempt in range(8):
            system = [[v + (damping * jtj[k][k] if k == m else 0.0) for m, v in enumerate(row)]
                      for k, row in enumerate(jtj)]
            try:
                delta = _solve(system, [-v for v in jtr])
            except ZeroDivisionError:
                damping *= 10
                continue
            trial = z[:]
            for k, i in enumerate(active):
                trial[i] += delta[k]
            trial_res = residuals(records, values_of(trial))
            if _rms(trial_res) < _rms(current):
                z, current, damping, improved = trial, trial_res, max(damping / 3, 1e-9), True
                break
            damping *= 10
        if not improved or max((abs(d) for d in delta), default=0.0) < 1e-7:
            break
    fitted = values_of(z)
    not_identifiable = [params[i] for i in range(len(params)) if i not in active]
    per_record = [{"step_time_error_before": b, "step_time_error_after": a}
                  for b, a in zip(_time_errors(records, prior), _time_errors(records, fitted))]
    return Calibration(gpu.name, prior, fitted, not_identifiable, before, _rms(current), len(records), per_record)


def _time_errors(records, values) -> list[float]:
    out = []
    for record in records:
        model, cluster, cfg, executor = _apply(record, values)
        out.append(estimate_step(model, cluster, cfg, executor).step_time_s / record.step_time_s - 1)
    return out


# ------------------------------------------------------------------------ files & CLI


def load_calibration(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"--calibration {path}: file not found") from None
    if not isinstance(data, dict) or not isinstance(data.get("fitted"), dict):
        raise SpecError(f"--calibration {path}: no 'fitted' mapping (write it with autoplan calibrate)")
    unknown = set(data["fitted"]) - set(ALL_PARAMS)
    if unknown:
        raise SpecError(f"--calibration {path}: unknown parameter {sorted(unknown)[0]!r}")
    return data


def apply_calibration(gpu: GPUSpec, executor: ExecutorProfile, calibration: dict[str, Any]
                      ) -> tuple[GPUSpec, ExecutorProfile]:
    fitted = calibration["fitted"]
    gpu = gpu.with_overrides(**{k: float(v) for k, v in fitted.items() if k in TIME_PARAMS})
    if "allocator_fragmentation" in fitted:
        executor = executor.with_overrides(allocator_fragmentation=float(fitted["allocator_fragmentation"]))
    return gpu, executor


def calibrated(gpu: GPUSpec, executor_name: str, path: str) -> tuple[GPUSpec, ExecutorProfile]:
    data = load_calibration(path)
    if data.get("gpu") and data["gpu"] != gpu.name:
        raise SpecError(f"--calibration {path}: fitted for {data['gpu']}, planning for {gpu.name}")
    return apply_calibration(gpu, resolve_executor(executor_name), data)


def handle(args) -> int:
    records = load_records(args.records)
    held_out: list[CalibrationRecord] = []
    if args.holdout:
        rng = random.Random(args.seed)
        shuffled = records[:]
        rng.shuffle(shuffled)
        count = max(1, int(round(len(records) * args.holdout)))
        held_out, records = shuffled[:count], shuffled[count:]
        if not records:
            raise SpecError("calibrate: --holdout leaves no records to fit")
    result = fit_calibration(records)
    print(f"fitted {result.records} records for {result.gpu}: rms log-error {result.rms_before:.3f} -> "
          f"{result.rms_after:.3f}")
    for name, value in result.fitted.items():
        print(f"  {name:<28}{result.prior[name]:8.3f} -> {value:8.3f}")
    for name in result.not_identifiable:
        print(f"  {name}: not identifiable from these records (kept at its prior)")
    if held_out:
        before = _time_errors(held_out, result.prior)
        after = _time_errors(held_out, result.fitted)
        print(f"held-out records ({len(held_out)}): step-time error before -> after")
        for b, a in zip(before, after):
            print(f"  {b * 100:+7.1f}% -> {a * 100:+7.1f}%")
        print(f"  mean |error| {sum(map(abs, before)) / len(before) * 100:.1f}% -> "
              f"{sum(map(abs, after)) / len(after) * 100:.1f}%")
    if args.out:
        Path(args.out).write_text(result.to_yaml())
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="fit efficiencies and memory reserve to measured records")
    parser.add_argument("records", nargs="+", metavar="RECORDS.jsonl")
    parser.add_argument("--out", default="calibration.yaml")
    parser.add_argument("--holdout", type=float, default=0.0, help="fraction of records held out for checking")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=handle)
