"""Calibration records: one measured run each - what ran and what was measured."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import ExecutorProfile, resolve_executor
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec, SpecError


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
        given = self.layer_modes
        modes: tuple[str, ...] = (given,) * model.n_layers if isinstance(given, str) else tuple(given)
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
            from .predict import predict

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
    from ..plan import Plan

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
