"""The plan document: what the planner writes and what the runtime and emitters read.

Field names are an interface that scripts, the runtime and the emitters read: add fields,
rename none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cost_models.config import (
    DEFAULT_MESH_ORDER,
    ACPolicy,
    Parallelism,
    Precision,
    TrainConfig,
    check_mesh_order,
)
from cost_models.executors import EXECUTOR_PROFILES, ExecutorProfile
from cost_models.specs import ClusterSpec, GPUSpec, ModelSpec, SpecError

from .report.describe import describe_ac, describe_layout, describe_schedule


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the field."""


class ParallelismDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dp_replicate: int = Field(1, ge=1)
    dp_shard: int = Field(1, ge=1)
    cp: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    # Pipeline stages (outermost mesh dim): priced by cost_models/pipeline.py.
    pp: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    def to_spec(self) -> Parallelism:
        return Parallelism(**self.model_dump())


class ActivationCheckpointDoc(BaseModel):
    """``mode`` is the summary; ``layers`` (one mode per layer) is what the runtime applies."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["none", "selective", "full", "mixed"] = "none"
    layers: list[Literal["none", "selective", "full"]] | None = None
    # What 'selective' saves (the rest of the block is recomputed in backward).
    selective_saves: list[str] = Field(default_factory=lambda: ["matmul", "attention"])

    def layer_modes(self, n_layers: int) -> tuple[str, ...]:
        if self.layers is not None:
            if len(self.layers) != n_layers:
                raise PlanError(
                    f"activation_checkpoint.layers has {len(self.layers)} entries for a model of {n_layers} layers"
                )
            return tuple(self.layers)
        if self.mode == "mixed":
            raise PlanError("activation_checkpoint.mode 'mixed' needs a 'layers' list")
        return tuple([self.mode] * n_layers)

    @classmethod
    def from_policy(cls, policy: ACPolicy) -> "ActivationCheckpointDoc":
        modes = set(policy.layer_modes)
        if len(modes) == 1:
            return cls(mode=next(iter(modes)))
        return cls(mode="mixed", layers=list(policy.layer_modes))


class PrecisionDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"

    def to_spec(self) -> Precision:
        if self.param_dtype == "float32":
            return Precision.fp32()
        return Precision(grad_reduce_bytes=2 if self.reduce_dtype == "bfloat16" else 4)


class OptimizerDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    max_norm: float = Field(1.0, gt=0)
    total_steps: int | None = Field(None, ge=1)


class PredictedDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    peak_memory_bytes: float
    memory_breakdown_bytes: dict[str, float]
    memory_capacity_bytes: float
    # Capacity less the headroom the plan keeps free (--memory-headroom); plans fit within it.
    memory_usable_bytes: float | None = None
    memory_headroom_bytes: float | None = None
    step_time_s: float
    tokens_per_second_per_gpu: float
    mfu: float
    flops_per_token: float
    time_breakdown_s: dict[str, float]


class Plan(BaseModel):
    model_config = ConfigDict(extra="allow")
    version: int = 1
    parallelism: ParallelismDoc = Field(default_factory=ParallelismDoc)
    mesh_order: list[str] = Field(default_factory=lambda: list(DEFAULT_MESH_ORDER))
    seq_len: int = Field(..., ge=1)
    local_batch_size: int = Field(1, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    global_batch_tokens: int | None = None
    activation_checkpoint: ActivationCheckpointDoc = Field(default_factory=ActivationCheckpointDoc)
    cp_impl: Literal["none", "allgather-kv", "ring-allgather", "ring-alltoall"] = "none"
    precision: PrecisionDoc = Field(default_factory=PrecisionDoc)
    optimizer: OptimizerDoc = Field(default_factory=OptimizerDoc)
    model: dict[str, Any]
    hardware: dict[str, Any] = Field(default_factory=dict)
    executor: str = "autoplan"
    # The executor profile the plan was priced with (calibrated values included), so
    # check, emit and run price what the planner priced. Absent: the named preset.
    executor_profile: dict[str, Any] | None = None
    calibration: str | None = None  # the calibration file the plan was priced with, if any
    # Tokens per loss chunk in the runtime's chunked cross-entropy (None: one chunk).
    loss_chunk_tokens: int | None = Field(None, ge=1)
    # Pipeline parallelism (read when parallelism.pp > 1): PyTorch's schedule, the
    # micro-batches each local batch is split into (None: one sequence each), and the
    # model chunks per pp rank (> 1 only for the interleaved schedule).
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b"] = "1f1b"
    pp_microbatches: int | None = Field(None, ge=1)
    pp_virtual_stages: int = Field(1, ge=1)
    predicted: PredictedDoc | None = None
    alternatives: list[dict[str, Any]] = Field(default_factory=list)
    explanation: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        try:
            check_mesh_order(self.mesh_order)
        except SpecError as error:
            raise ValueError(str(error)) from None
        dp = self.parallelism.dp_replicate * self.parallelism.dp_shard
        expected = self.seq_len * self.local_batch_size * self.grad_accum_steps * dp
        if self.global_batch_tokens is None:
            self.global_batch_tokens = expected
        elif self.global_batch_tokens != expected:
            raise ValueError(
                f"global_batch_tokens={self.global_batch_tokens} but seq_len x local_batch_size x "
                f"grad_accum_steps x dp = {expected}"
            )
        if self.parallelism.cp > 1 and self.cp_impl == "none":
            self.cp_impl = "allgather-kv"
        self._check_pipeline()
        if self.executor not in EXECUTOR_PROFILES:
            raise ValueError(f"executor {self.executor!r}: use one of {', '.join(EXECUTOR_PROFILES)}")
        return self

    def _check_pipeline(self) -> None:
        interleaved = self.pp_schedule == "interleaved-1f1b"
        if interleaved != (self.pp_virtual_stages > 1):
            raise ValueError(f"pp_virtual_stages={self.pp_virtual_stages} with pp_schedule {self.pp_schedule!r}: "
                             "use pp_virtual_stages >= 2 with 'interleaved-1f1b' and 1 otherwise")
        pp, micro = self.parallelism.pp, self.microbatches
        if pp > 1 and (micro < pp or self.local_batch_size % micro):
            raise ValueError(f"pp_microbatches={micro} with pp={pp} and local_batch_size={self.local_batch_size}: "
                             f"use a divisor of local_batch_size that is >= pp (raise local_batch_size if none is)")

    @property
    def microbatches(self) -> int:
        """Pipeline micro-batches per local batch (default: one sequence each)."""
        return self.pp_microbatches or self.local_batch_size

    # Conversions to the cost-model inputs --------------------------------------------
    def model_spec(self) -> ModelSpec:
        try:
            return ModelSpec.from_dict(self.model)
        except (SpecError, TypeError) as error:
            raise PlanError(f"plan.model: {error}") from None

    def executor_spec(self) -> ExecutorProfile:
        """The profile the plan was priced with (its recorded values), else the named preset."""
        if self.executor_profile is None:
            return EXECUTOR_PROFILES[self.executor]
        try:
            return ExecutorProfile.from_dict(self.executor_profile)
        except SpecError as error:
            raise PlanError(f"plan.{error}") from None

    def describe_layout(self) -> str:
        text = describe_layout(self.parallelism.to_spec(), self.cp_impl, self.local_batch_size)
        if self.parallelism.pp > 1:
            text += " " + describe_schedule(self.pp_schedule, self.parallelism.pp, self.microbatches,
                                            self.pp_virtual_stages)
        return text

    def describe_ac(self) -> str:
        return describe_ac(self.activation_checkpoint.layer_modes(self.model_spec().n_layers))

    def gpu_spec(self) -> GPUSpec | None:
        if not self.hardware.get("gpu"):
            return None
        return GPUSpec.from_dict(self.hardware["gpu"])

    def cluster_spec(self) -> ClusterSpec | None:
        gpu = self.gpu_spec()
        if gpu is None:
            return None
        return ClusterSpec(gpu, self.parallelism.world_size,
                           self.hardware.get("gpus_per_node") or gpu.gpus_per_node)

    def train_config(self) -> TrainConfig:
        spec = self.model_spec()
        pipelined = self.parallelism.pp > 1
        try:
            return TrainConfig(
                parallelism=self.parallelism.to_spec(),
                seq_len=self.seq_len,
                local_batch_size=self.local_batch_size,
                grad_accum_steps=self.grad_accum_steps,
                ac=ACPolicy(self.activation_checkpoint.layer_modes(spec.n_layers)),
                cp_impl=self.cp_impl,
                mesh_order=tuple(self.mesh_order),
                precision=self.precision.to_spec(),
                pp_schedule=self.pp_schedule if pipelined else "1f1b",
                pp_microbatches=self.microbatches if pipelined else 1,
                pp_virtual_stages=self.pp_virtual_stages if pipelined else 1,
            )
        except SpecError as error:
            raise PlanError(f"plan: {error}") from None

    @property
    def prediction(self) -> PredictedDoc:
        """The predicted section (plans the planner writes always carry one)."""
        if self.predicted is None:
            raise PlanError("plan has no 'predicted' section: make it with `autoplan plan`")
        return self.predicted

    # Files ------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.model_dump_json(indent=2) if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())  # JSON is YAML
        except FileNotFoundError:
            raise PlanError(f"plan {path}: file not found") from None
        except yaml.YAMLError as error:
            raise PlanError(f"plan {path}: not valid YAML/JSON ({error})") from None
        if not isinstance(data, dict):
            raise PlanError(f"plan {path}: expected a mapping at the top level")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> "Plan":
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise PlanError(f"{source}: field {where}: {first['msg']}") from None

