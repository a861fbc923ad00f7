"""What hardware is here: GPUs through NVML (nvidia-ml-py), host through psutil.

Without NVML or a GPU the planner falls back to the default preset and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cost_models.specs import DEFAULT_GPU, GPU_PRESETS, GPUSpec, MiB, resolve_gpu

# NVML product names -> presets; first match wins, so longer / more specific first.
_NAME_RULES = (
    ("h100 pcie", "h100-pcie-80gb"), ("h100 nvl", "h100-pcie-80gb"), ("h100", "h100-sxm-80gb"),
    ("h200", "h200"), ("gh200", "h200"), ("a100-sxm4-40gb", "a100-40gb"), ("a100-pcie-40gb", "a100-40gb"),
    ("a100", "a100-sxm-80gb"), ("b200", "b200"), ("l40s", "l40s"), ("mi300x", "mi300x"),
)


@dataclass
class ProbeResult:
    gpu: GPUSpec
    gpu_count: int
    gpus_per_node: int
    source: str  # "nvml" | "default" | "named"
    note: str = ""
    gpu_name_reported: str | None = None
    host_memory_bytes: int | None = None
    cpu_count: int | None = None
    nvlink_links: list[int] = field(default_factory=list)
    driver: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu"] = self.gpu.to_dict()
        return data


def preset_for_nvml_name(name: str, memory_bytes: int | None = None) -> tuple[GPUSpec, str]:
    """Map an NVML product name to a preset; an unknown GPU keeps its measured memory."""
    lowered = name.lower()
    for needle, preset in _NAME_RULES:
        if needle in lowered:
            return GPU_PRESETS[preset], ""
    base = GPU_PRESETS[DEFAULT_GPU]
    if memory_bytes:
        spec = base.with_overrides(name=name.strip().lower().replace(" ", "-"), memory_bytes=int(memory_bytes))
        return spec, (f"unknown GPU {name!r}: using its measured memory with {DEFAULT_GPU} compute and "
                      "bandwidth numbers; pass --gpu NAME for a known preset")
    return base, f"unknown GPU {name!r}: using {DEFAULT_GPU}; pass --gpu NAME"


def _host() -> tuple[int | None, int | None]:
    try:
        import psutil
        return int(psutil.virtual_memory().total), psutil.cpu_count(logical=True)
    except Exception:  # psutil missing or unsupported platform: the plan does not need it
        return None, None


def _nvml() -> dict[str, Any] | None:
    """Read GPUs through NVML, or None when there is no driver / no GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        links = []
        for index in range(count):
            device = pynvml.nvmlDeviceGetHandleByIndex(index)
            active = 0
            for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    active += int(pynvml.nvmlDeviceGetNvLinkState(device, link) == 1)
                except Exception:
                    break
            links.append(active)
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:
            driver = None
        return {"count": count, "name": name, "memory": memory, "links": links, "driver": driver}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def resolve_hardware(gpu_arg: str | None = "auto", gpus_per_node: int | None = None) -> ProbeResult:
    """``--gpu auto`` probes NVML (falling back to the default preset); a name is used as is."""
    host_memory, cpus = _host()
    if gpu_arg and gpu_arg.lower() != "auto":
        spec = resolve_gpu(gpu_arg)
        per_node = gpus_per_node or spec.gpus_per_node
        return ProbeResult(spec, per_node, per_node, "named", "", None, host_memory, cpus)
    found = _nvml()
    if found is None:
        spec = GPU_PRESETS[DEFAULT_GPU]
        per_node = gpus_per_node or spec.gpus_per_node
        return ProbeResult(spec, per_node, per_node, "default",
                           f"no NVIDIA GPU found through NVML: using the default {DEFAULT_GPU} preset "
                           "(pass --gpu NAME to choose)", None, host_memory, cpus)
    spec, note = preset_for_nvml_name(found["name"], found["memory"])
    per_node = gpus_per_node or found["count"]
    return ProbeResult(spec, found["count"], per_node, "nvml", note, found["name"], host_memory, cpus,
                       found["links"], found["driver"])


__all__ = ["ProbeResult", "resolve_hardware", "preset_for_nvml_name", "MiB"]
