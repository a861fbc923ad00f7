"""What a training step is asked to do: layout, sequence, batch, checkpointing, precision.

These are the inputs of every cost model. They validate themselves so a bad value is a
one-line error naming the field, never a NaN three functions later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .rules import schedule_violation, seq_len_divisor, seq_len_violation
from .specs import SpecError

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")  # the dims of the device mesh
DEGREES = MESH_DIMS + ("pp",)  # every parallel degree of a plan
DEFAULT_MESH_ORDER = ("dp_replicate", "dp_shard", "cp", "tp")  # outermost -> innermost
AC_MODES = ("none", "selective", "full")
CP_IMPLS = ("none", "allgather-kv", "ring-allgather", "ring-alltoall")


@dataclass(frozen=True)
class Parallelism:
    """Degrees of each mesh dimension; their product is the GPU count."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in DEGREES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"parallelism {name}={value!r} must be an integer >= 1")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def fsdp_degree(self) -> int:
        """FSDP shards parameters over the flattened dp_shard x cp mesh (as torchtitan)."""
        return self.dp_shard * self.cp

    @property
    def dp_degree(self) -> int:
        """Ranks that see different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def seq_len_divisor(self) -> int:
        """Sequence lengths this layout can split evenly (head-tail CP balancing)."""
        return seq_len_divisor(self.cp)

    def degree(self, dim: str) -> int:
        return getattr(self, dim)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in DEGREES}


@dataclass(frozen=True)
class ACPolicy:
    """Activation checkpointing per layer: each layer is 'none', 'selective' or 'full'.

    'full' saves only the block input and recomputes the block in backward;
    'selective' saves matmul and attention outputs and recomputes the cheap element-wise
    ops (norms, SiLU, RoPE); 'none' saves everything autograd needs.
    """

    layer_modes: tuple[str, ...]

    def __post_init__(self) -> None:
        for mode in self.layer_modes:
            if mode not in AC_MODES:
                raise SpecError(f"activation_checkpoint mode {mode!r}: use one of {', '.join(AC_MODES)}")

    @classmethod
    def uniform(cls, mode: str, n_layers: int) -> "ACPolicy":
        return cls(tuple([mode] * n_layers))

    @classmethod
    def mix(cls, n_layers: int, n_full: int = 0, n_selective: int = 0) -> "ACPolicy":
        """The first ``n_full`` layers full, the next ``n_selective`` selective, the rest none."""
        if n_full < 0 or n_selective < 0 or n_full + n_selective > n_layers:
            raise SpecError(
                f"activation_checkpoint: full={n_full} + selective={n_selective} exceeds {n_layers} layers"
            )
        return cls(tuple(["full"] * n_full + ["selective"] * n_selective
                         + ["none"] * (n_layers - n_full - n_selective)))

    def count(self, mode: str) -> int:
        return sum(1 for m in self.layer_modes if m == mode)


@dataclass(frozen=True)
class Precision:
    """Mixed precision as FSDP2's MixedPrecisionPolicy + an fp32 AdamW."""

    param_bytes: int = 2  # bf16 compute copy gathered by FSDP
    master_bytes: int = 4  # fp32 sharded parameters
    grad_reduce_bytes: int = 4  # fp32 reduce-scatter
    optimizer_state_bytes: int = 8  # AdamW exp_avg + exp_avg_sq in fp32
    activation_bytes: int = 2

    @classmethod
    def fp32(cls) -> "Precision":
        """What CPU tests run: everything in fp32."""
        return cls(param_bytes=4, master_bytes=4, grad_reduce_bytes=4,
                   optimizer_state_bytes=8, activation_bytes=4)


@dataclass(frozen=True)
class TrainConfig:
    """One step of training for one layout."""

    parallelism: Parallelism
    seq_len: int
    local_batch_size: int = 1
    grad_accum_steps: int = 1
    ac: ACPolicy | None = None
    cp_impl: str = "allgather-kv"
    mesh_order: tuple[str, ...] = DEFAULT_MESH_ORDER
    precision: Precision = field(default_factory=Precision)
    # Pipeline parallelism (read when parallelism.pp > 1; cost_models/pipeline.py):
    # PyTorch's schedule, micro-batches per local batch, model chunks per pp rank.
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 1
    pp_virtual_stages: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise SpecError(f"seq_len={self.seq_len!r} must be a positive integer")
        if not isinstance(self.local_batch_size, int) or self.local_batch_size < 1:
            raise SpecError(f"local_batch_size={self.local_batch_size!r} must be a positive integer")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise SpecError(f"grad_accum_steps={self.grad_accum_steps!r} must be a positive integer")
        if self.cp_impl not in CP_IMPLS:
            raise SpecError(f"cp_impl={self.cp_impl!r}: use one of {', '.join(CP_IMPLS)}")
        if self.parallelism.cp == 1 and self.cp_impl != "none":
            object.__setattr__(self, "cp_impl", "none")
        if self.parallelism.cp > 1 and self.cp_impl == "none":
            raise SpecError("cp_impl='none' with cp > 1: pick allgather-kv, ring-allgather or ring-alltoall")
        check_mesh_order(self.mesh_order)
        violation = seq_len_violation(self.seq_len, self.parallelism.cp)
        if violation:
            raise SpecError(violation)
        violation = schedule_violation(self.parallelism.pp, self.pp_schedule, self.pp_microbatches,
                                       self.pp_virtual_stages, self.local_batch_size)
        if violation:
            raise SpecError(violation)

    @property
    def tokens_per_gpu(self) -> int:
        """Tokens one GPU holds in one micro-batch (after CP splits the sequence)."""
        return self.local_batch_size * self.seq_len // self.parallelism.cp

    @property
    def global_batch_tokens(self) -> int:
        return self.seq_len * self.local_batch_size * self.grad_accum_steps * self.parallelism.dp_degree

    def ac_policy(self, n_layers: int) -> ACPolicy:
        return self.ac if self.ac is not None else ACPolicy.uniform("none", n_layers)


def check_mesh_order(order: Iterable[str]) -> tuple[str, ...]:
    order = tuple(order)
    if sorted(order) != sorted(MESH_DIMS):
        raise SpecError(
            f"mesh_order={list(order)}: must name each of {', '.join(MESH_DIMS)} exactly once"
        )
    return order
