"""Hardware specifications: plain data, no torch.

A ``GPUSpec`` is one accelerator as its datasheet describes it plus the fraction of peak
that real kernels reach; a ``ClusterSpec`` is N of those GPUs grouped into nodes. Model
shapes live in ``models.py`` (re-exported here: ``ModelSpec``, presets, ``resolve_model``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import SpecError as SpecError
from .models import DEFAULT_MODEL as DEFAULT_MODEL
from .models import MODEL_ALIASES as MODEL_ALIASES
from .models import MODEL_PRESETS as MODEL_PRESETS
from .models import ModelSpec as ModelSpec
from .models import model_from_hf_config as model_from_hf_config
from .models import resolve_model as resolve_model

# ----------------------------------------------------------------------------- GPUs

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: datasheet peaks plus achievable fractions of them.

    ``memory_bytes`` is what the driver reports as total (nvidia-smi), not the marketing
    number. Bandwidths are per GPU, per direction. The efficiency fields are the fraction
    of peak that large kernels reach in practice; calibration refits them from runs.
    """

    name: str
    memory_bytes: int
    bf16_flops_per_s: float  # dense (no sparsity)
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float  # NVLink / Infinity Fabric / PCIe, per direction
    inter_node_bytes_per_s: float  # network per GPU, per direction
    gpus_per_node: int = 8
    matmul_efficiency: float = 0.70
    attention_efficiency: float = 0.50
    intra_node_bus_efficiency: float = 0.80
    inter_node_bus_efficiency: float = 0.80
    # Per ring step latency of NCCL's Simple protocol, the one large collectives use:
    # NCCL src/graph/tuning.cc hwLat[NVLINK][Ring][Simple] = 3.4 us, hwLat[NET][Ring][Simple]
    # = 14 us; a ring crossing nodes pays the network latency only on its inter-node steps.
    intra_node_latency_s: float = 3.4e-6
    inter_node_latency_s: float = 14e-6
    aliases: tuple[str, ...] = field(default=(), compare=False)
    # --- step time ---
    # Architecture family: picks the attention-kernel table in step.py (hopper, ampere, ...).
    arch: str = "hopper"
    # Streaming multiprocessors (CUs on AMD): the wave-quantization term of GEMM efficiency.
    sm_count: int = 132
    # Board power: datasheet TDP and the power limit the machine runs at (None = TDP).
    # Tensor-core throughput under a cap scales as the sustained clock. Dynamic power goes
    # as f V^2: where V tracks f on the DVFS curve P ~ f^3, so f ~ (P_cap / TDP)^(1/3);
    # where V sits at its floor P ~ f, so f ~ P_cap / TDP. ``clock_fraction_at_limit`` is
    # that clock relative to the one the datasheet's peak assumes (None: the cube law,
    # the upper end of the range); calibration fits it from runs on capped parts.
    tdp_w: float = 700.0
    power_limit_w: float | None = None
    clock_fraction_at_limit: float | None = None
    # NCCL's fixed per-collective cost (tuning.cc baseLat[Ring][Simple] = 8.4 us).
    collective_base_latency_s: float = 8.4e-6

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "bf16_flops_per_s", "hbm_bytes_per_s",
                     "intra_node_bytes_per_s", "inter_node_bytes_per_s", "gpus_per_node"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SpecError(f"GPU field {name}={value!r} must be a positive number")
        for name in ("matmul_efficiency", "attention_efficiency",
                     "intra_node_bus_efficiency", "inter_node_bus_efficiency", "clock_fraction_at_limit"):
            value = getattr(self, name)
            if value is None and name == "clock_fraction_at_limit":
                continue
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise SpecError(f"GPU field {name}={value!r} must be in (0, 1]")
        for name in ("intra_node_latency_s", "inter_node_latency_s", "collective_base_latency_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SpecError(f"GPU field {name}={value!r} must be a number of seconds >= 0")
        if not (isinstance(self.sm_count, int) and self.sm_count > 0):
            raise SpecError(f"GPU field sm_count={self.sm_count!r} must be a positive integer")
        if not (isinstance(self.tdp_w, (int, float)) and self.tdp_w > 0):
            raise SpecError(f"GPU field tdp_w={self.tdp_w!r} must be a positive number of watts")
        if self.power_limit_w is not None and not (isinstance(self.power_limit_w, (int, float))
                                                   and 0 < self.power_limit_w):
            raise SpecError(f"GPU field power_limit_w={self.power_limit_w!r} must be a positive number of watts")

    @property
    def clock_fraction(self) -> float:
        """Sustained tensor-core clock relative to the datasheet's, under the power limit."""
        if self.power_limit_w is None or self.power_limit_w >= self.tdp_w:
            return 1.0
        if self.clock_fraction_at_limit is not None:
            return self.clock_fraction_at_limit
        return (self.power_limit_w / self.tdp_w) ** (1.0 / 3.0)

    def with_overrides(self, **overrides: Any) -> "GPUSpec":
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("aliases")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPUSpec":
        known = {f for f in cls.__dataclass_fields__ if f != "aliases"}
        return cls(**{k: v for k, v in data.items() if k in known})


GB = 1e9
TFLOPS = 1e12

# Efficiency defaults, per generation, from public measurements (not fitted to any
# result this project is checked against):
# - matmul: large bf16 GEMMs reach ~70-75% of dense peak on H100 SXM and ~80% on A100
#   (NVIDIA's cuBLAS / Transformer Engine performance pages; the Llama 3 paper reports
#   38-43% *MFU* end to end, which includes everything else this model accounts for).
# - attention: both executors call PyTorch SDPA, whose flash backend is FlashAttention-2.
#   FA2 reaches 50-73% of peak forward and ~45-60% backward on A100 (Dao 2023,
#   arXiv:2307.08691, Fig. 4-5) but only ~35% of H100's peak (Shah et al. 2024,
#   arXiv:2407.08608, Fig. 5-6: FA2 ~330-370 TFLOP/s forward, less backward, hdim 128);
#   FA3's Hopper-specific kernels are not what SDPA runs. Non-NVIDIA / non-Hopper
#   parts get their generation's FA2-class number.
# - bus efficiency: nccl-tests all-reduce bus bandwidth reaches ~80% of the per-direction
#   NVLink / InfiniBand line rate at large message sizes.
# SM counts and board power (step-time fields): H100 SXM 132 SMs / 700 W and H100 PCIe
# 114 SMs / 350 W (NVIDIA H100 datasheet and Hopper architecture whitepaper); A100 108 SMs /
# 400 W SXM (A100 datasheet, Ampere whitepaper); B200 148 SMs / 1000 W (DGX B200
# datasheet: 14.3 kW for 8 GPUs + host; NVIDIA Blackwell whitepaper); L40S 142 SMs / 350 W
# (L40S datasheet); MI300X 304 CUs / 750 W (AMD MI300X datasheet).
GPU_PRESETS: dict[str, GPUSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s dense BF16, 3.35 TB/s
    # HBM3, NVLink 4 900 GB/s total (450 GB/s per direction); DGX H100: 8x ConnectX-7
    # 400 Gb/s (50 GB/s per GPU). nvidia-smi reports 81559 MiB.
    "h100-sxm-80gb": GPUSpec("h100-sxm-80gb", memory_bytes=81559 * MiB,
                             bf16_flops_per_s=989 * TFLOPS, hbm_bytes_per_s=3.35e12,
                             intra_node_bytes_per_s=450 * GB, inter_node_bytes_per_s=50 * GB,
                             matmul_efficiency=0.72, attention_efficiency=0.35,
                             aliases=("h100", "h100-sxm", "h100-80gb"),
                             arch="hopper", sm_count=132, tdp_w=700.0),
    # torchtitan's benchmark machines (torchtitan benchmarks/llama3_h100_202412_torchtitan.md
    # and arXiv:2410.06511 sec. 4): H100 SXM with 96 GB HBM2e at 2.4 TB/s ("95 GiB" in the
    # paper), power-limited to 500 W (not 700 W), 8 per host on NVSwitch, 400 Gb/s RDMA per
    # GPU. Same die as the 80 GB SXM part: 132 SMs, 989 TFLOP/s dense BF16 at full clock.
    "h100-96gb-500w": GPUSpec("h100-96gb-500w", memory_bytes=95 * GiB,
                              bf16_flops_per_s=989 * TFLOPS, hbm_bytes_per_s=2.4e12,
                              intra_node_bytes_per_s=450 * GB, inter_node_bytes_per_s=50 * GB,
                              matmul_efficiency=0.72, attention_efficiency=0.35,
                              aliases=("h100-96gb", "h100-500w", "grand-teton-h100"),
                              arch="hopper", sm_count=132, tdp_w=700.0, power_limit_w=500.0,
                              clock_fraction_at_limit=round((500.0 / 700.0) ** (1.0 / 3.0), 4)),
    # Same datasheet, PCIe form factor: 756 TFLOP/s dense BF16, 2.0 TB/s HBM2e, PCIe Gen5
    # x16 64 GB/s per direction between GPUs (NVLink bridges join only pairs).
    "h100-pcie-80gb": GPUSpec("h100-pcie-80gb", memory_bytes=81559 * MiB,
                              bf16_flops_per_s=756 * TFLOPS, hbm_bytes_per_s=2.0e12,
                              intra_node_bytes_per_s=64 * GB, inter_node_bytes_per_s=25 * GB,
                              matmul_efficiency=0.72, attention_efficiency=0.35,
                              aliases=("h100-pcie",), arch="hopper", sm_count=114, tdp_w=350.0),
    # NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s, same compute and NVLink as H100 SXM.
    # nvidia-smi reports 143771 MiB.
    "h200": GPUSpec("h200", memory_bytes=143771 * MiB, bf16_flops_per_s=989 * TFLOPS,
                    hbm_bytes_per_s=4.8e12, intra_node_bytes_per_s=450 * GB,
                    inter_node_bytes_per_s=50 * GB, matmul_efficiency=0.74,
                    attention_efficiency=0.37, aliases=("h200-sxm", "h200-141gb"),
                    arch="hopper", sm_count=132, tdp_w=700.0),
    # NVIDIA A100 datasheet: 312 TFLOP/s dense BF16, 80GB HBM2e 2.039 TB/s, NVLink 3
    # 600 GB/s total (300 per direction); DGX A100: 8x 200 Gb/s HDR (25 GB/s per GPU).
    "a100-sxm-80gb": GPUSpec("a100-sxm-80gb", memory_bytes=81920 * MiB,
                             bf16_flops_per_s=312 * TFLOPS, hbm_bytes_per_s=2.039e12,
                             intra_node_bytes_per_s=300 * GB, inter_node_bytes_per_s=25 * GB,
                             matmul_efficiency=0.80, attention_efficiency=0.55,
                             aliases=("a100", "a100-80gb", "a100-sxm"),
                             arch="ampere", sm_count=108, tdp_w=400.0),
    # A100 40GB SXM: 1.555 TB/s HBM2, otherwise as above.
    "a100-40gb": GPUSpec("a100-40gb", memory_bytes=40960 * MiB, bf16_flops_per_s=312 * TFLOPS,
                         hbm_bytes_per_s=1.555e12, intra_node_bytes_per_s=300 * GB,
                         inter_node_bytes_per_s=25 * GB, matmul_efficiency=0.80,
                         attention_efficiency=0.55, aliases=("a100-40g",),
                         arch="ampere", sm_count=108, tdp_w=400.0),
    # NVIDIA DGX B200 datasheet: 1,440 GB HBM3e over 8 GPUs (180 GB each), 72 PFLOP/s
    # FP8 training with sparsity -> 2.25 PFLOP/s dense BF16 per GPU; HBM3e 8 TB/s;
    # NVLink 5 1.8 TB/s total (900 GB/s per direction); 8x ConnectX-7 400 Gb/s.
    "b200": GPUSpec("b200", memory_bytes=180 * 10**9, bf16_flops_per_s=2250 * TFLOPS,
                    hbm_bytes_per_s=8.0e12, intra_node_bytes_per_s=900 * GB,
                    inter_node_bytes_per_s=50 * GB, matmul_efficiency=0.70,
                    attention_efficiency=0.35, arch="blackwell", sm_count=148, tdp_w=1000.0),
    # NVIDIA L40S datasheet: 362 TFLOP/s dense BF16 (733 with sparsity), 48 GB GDDR6 at
    # 864 GB/s, no NVLink: PCIe Gen4 x16 (32 GB/s per direction).
    "l40s": GPUSpec("l40s", memory_bytes=46068 * MiB, bf16_flops_per_s=362 * TFLOPS,
                    hbm_bytes_per_s=864 * GB, intra_node_bytes_per_s=32 * GB,
                    inter_node_bytes_per_s=25 * GB, matmul_efficiency=0.65,
                    attention_efficiency=0.45, arch="ada", sm_count=142, tdp_w=350.0),
    # AMD Instinct MI300X datasheet: 1307.4 TFLOP/s dense BF16, 192 GB HBM3 at 5.3 TB/s,
    # 7 Infinity Fabric links at 64 GB/s per direction each (448 GB/s per GPU).
    "mi300x": GPUSpec("mi300x", memory_bytes=192 * GiB, bf16_flops_per_s=1307.4 * TFLOPS,
                      hbm_bytes_per_s=5.3e12, intra_node_bytes_per_s=448 * GB,
                      inter_node_bytes_per_s=50 * GB, matmul_efficiency=0.55,
                      attention_efficiency=0.35, aliases=("mi300",), arch="cdna3", sm_count=304,
                      tdp_w=750.0),
}
DEFAULT_GPU = "h100-sxm-80gb"


def _gpu_preset(name: str | None) -> GPUSpec | None:
    key = (name or DEFAULT_GPU).strip().lower().replace("_", "-").replace(" ", "-")
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    for spec in GPU_PRESETS.values():
        if key in spec.aliases:
            return spec
    return None


def gpu_from_file(path: str | Path) -> GPUSpec:
    """A GPU from a YAML or JSON file: ``base`` (a preset name, default the default GPU)
    plus any ``GPUSpec`` fields to override, e.g. ``{base: h100, power_limit_w: 500,
    hbm_bytes_per_s: 2.4e12, name: my-h100}``. Bad input is a one-line ``SpecError``."""
    path = Path(path)
    where = f"--gpu {path}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{where}: file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise SpecError(f"{where}: cannot read ({type(error).__name__})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"{where}: not valid JSON ({error.msg} at line {error.lineno})") from None
    else:
        import yaml  # only on this path: planning with presets never needs it

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise SpecError(f"{where}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of GPU fields (base: PRESET, field: value, ...)")
    data = dict(data)
    base_name = data.pop("base", None)
    if base_name is not None and not isinstance(base_name, str):
        raise SpecError(f"{where}: base={base_name!r} must be a GPU preset name")
    base = _gpu_preset(base_name)
    if base is None:
        raise SpecError(f"{where}: base={base_name!r} is no GPU preset; use one of {', '.join(GPU_PRESETS)}")
    known = [f for f in GPUSpec.__dataclass_fields__ if f != "aliases"]
    for key, value in list(data.items()):
        if key not in known:
            raise SpecError(f"{where}: unknown GPU field {key!r} (known: {', '.join(known)})")
        if key in ("name", "arch") or (key in ("power_limit_w", "clock_fraction_at_limit") and value is None):
            continue
        if isinstance(value, str):  # YAML 1.1 reads 2.4e12 (no dot before e, no sign) as text
            try:
                value = data[key] = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: field {key}={value!r} must be a number")
    for key in ("memory_bytes", "gpus_per_node", "sm_count"):
        if isinstance(data.get(key), float) and data[key].is_integer():
            data[key] = int(data[key])
    data.setdefault("name", path.stem)
    if ("power_limit_w" in data or "tdp_w" in data) and "clock_fraction_at_limit" not in data:
        data["clock_fraction_at_limit"] = None  # a new limit: derive the clock again
    try:
        spec = replace(base, aliases=(), **data)
    except SpecError as error:
        raise SpecError(f"{where}: {error}") from None
    except TypeError as error:
        raise SpecError(f"{where}: {error}") from None
    return spec


def resolve_gpu(name: str | None) -> GPUSpec:
    """A preset name or alias (case-insensitive; spaces and underscores like dashes), or a
    path to a YAML/JSON file holding a base preset plus overrides (``gpu_from_file``)."""
    spec = _gpu_preset(name)
    if spec is not None:
        return spec
    key = (name or "").strip()
    if key.lower().endswith((".yaml", ".yml", ".json")) or (key and Path(key).is_file()):
        return gpu_from_file(key)
    raise SpecError(f"--gpu {name!r}: unknown GPU; use one of {', '.join(GPU_PRESETS)} "
                    "or a path to a YAML/JSON file (base: PRESET + fields)")


@dataclass(frozen=True)
class ClusterSpec:
    """``num_gpus`` GPUs of one kind, ``gpus_per_node`` to a node (the NVLink domain)."""

    gpu: GPUSpec
    num_gpus: int
    gpus_per_node: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_gpus, int) or self.num_gpus <= 0:
            raise SpecError(f"--gpus {self.num_gpus!r}: must be a positive integer")
        if self.gpus_per_node is None:
            object.__setattr__(self, "gpus_per_node", min(self.gpu.gpus_per_node, self.num_gpus))
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node <= 0:
            raise SpecError(f"--gpus-per-node {self.gpus_per_node!r}: must be a positive integer")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise SpecError(
                f"--gpus {self.num_gpus}: not a whole number of nodes of "
                f"{self.gpus_per_node} GPUs (set --gpus-per-node)"
            )

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.ranks_per_node)

    @property
    def ranks_per_node(self) -> int:
        """``gpus_per_node`` as an ``int`` (``__post_init__`` resolves None to the GPU's node size)."""
        assert self.gpus_per_node is not None
        return self.gpus_per_node
