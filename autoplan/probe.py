"""What hardware is here: GPUs through NVML (nvidia-ml-py), the host through psutil.

``resolve_hardware('auto')`` reads NVML and maps the product name to a GPU preset;
a GPU without a preset gets its measured memory and the closest preset's other numbers.
Without NVML, a driver or a GPU, the planner falls back to the default preset and says
so in a one-line note. A named GPU (``--gpu h100``) skips the probe.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from cost_models.specs import DEFAULT_GPU, GB, GPU_PRESETS, GiB, GPUSpec, resolve_gpu

from .errors import UsageError

# NVML product names (nvidia-smi's "Name") -> presets. The name is lower-cased with '-'
# and '_' read as spaces; a rule matches when all its words occur. First match wins, so
# the specific rules come first. Examples of names: "NVIDIA H100 80GB HBM3",
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB",
# "NVIDIA A100 80GB PCIe", "NVIDIA B200", "NVIDIA L40S".
NAME_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gh200",), "h200"),
    (("h200",), "h200"),
    (("h100", "pcie"), "h100-pcie-80gb"),
    (("h100", "nvl"), "h100-pcie-80gb"),
    (("h100",), "h100-sxm-80gb"),
    (("a100", "40gb"), "a100-40gb"),
    (("a100",), "a100-sxm-80gb"),
    (("b200",), "b200"),
    (("l40s",), "l40s"),
    (("mi300x",), "mi300x"),
)

# A100 PCIe cards have no NVSwitch: GPU to GPU goes over PCIe Gen4 x16, 64 GB/s both
# directions (NVIDIA A100 PCIe datasheet), 32 GB/s per direction.
PCIE_GEN4_BYTES_PER_S = 32 * GB
# Measured memory within this fraction of the preset's counts as the preset's.
MEMORY_TOLERANCE = 0.02


@dataclass
class ProbeResult:
    """The GPU spec to plan with, how many there are, and where the answer came from."""

    gpu: GPUSpec
    gpu_count: int
    gpus_per_node: int
    source: str  # "nvml" | "default" | "named"
    note: str = ""  # one line; empty when nothing needs saying
    host_memory_bytes: int | None = None
    cpu_count: int | None = None
    nvlink_links: list[int] = field(default_factory=list)  # active NVLink links, per GPU
    driver: str | None = None
    gpu_name_reported: str | None = None  # NVML's product name, as reported

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu"] = self.gpu.to_dict()
        return data


def _normalize(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.lower()).strip()


def _one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def preset_for_name(name: str) -> str | None:
    """The preset an NVML product name maps to, or None for an unknown GPU."""
    words = _normalize(name)
    for needles, preset in NAME_RULES:
        if all(needle in words for needle in needles):
            return preset
    return None


def closest_preset(memory_bytes: int, name: str = "") -> str:
    """The preset nearest in memory size (same vendor; ties go to the earlier preset)."""
    amd = any(word in name.lower() for word in ("amd", "instinct", "radeon"))
    candidates = [key for key in GPU_PRESETS if key.startswith("mi") == amd] or list(GPU_PRESETS)
    return min(candidates, key=lambda key: abs(GPU_PRESETS[key].memory_bytes - memory_bytes))


def spec_for_nvml_name(name: str, memory_bytes: int | None = None) -> tuple[GPUSpec, str]:
    """Map an NVML product name (and its measured memory) to a spec, with a note.

    Known names get their preset; where the measured memory differs from the preset's
    (H100 NVL 94 GB, GH200 96 GB) the measured number is used, and a PCIe card mapped to
    an NVLink preset gets PCIe bandwidth between GPUs. Unknown names get the measured
    memory and the closest preset's other numbers.
    """
    notes = []
    preset = preset_for_name(name)
    if preset is None:
        if not memory_bytes:
            return GPU_PRESETS[DEFAULT_GPU], (f"unknown GPU {_one_line(name)!r}: using the {DEFAULT_GPU} preset; "
                                              "pass --gpu NAME to choose")
        preset = closest_preset(memory_bytes, name)
        slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "unknown-gpu"
        spec = GPU_PRESETS[preset].with_overrides(name=slug, memory_bytes=int(memory_bytes))
        return spec, (f"unknown GPU {_one_line(name)!r} ({memory_bytes / GiB:.1f} GiB): using its measured memory "
                      f"with the compute and bandwidth numbers of {preset} (closest preset by memory); "
                      "pass --gpu NAME to choose a preset")
    spec = GPU_PRESETS[preset]
    if memory_bytes and abs(memory_bytes - spec.memory_bytes) > MEMORY_TOLERANCE * spec.memory_bytes:
        notes.append(f"{_one_line(name)} reports {memory_bytes / GiB:.1f} GiB, the {preset} preset has "
                     f"{spec.memory_bytes / GiB:.1f} GiB: using the measured memory")
        spec = spec.with_overrides(memory_bytes=int(memory_bytes))
    if "pcie" in _normalize(name) and spec.intra_node_bytes_per_s > PCIE_GEN4_BYTES_PER_S * 2:
        notes.append(f"{_one_line(name)} is a PCIe card: GPU-to-GPU bandwidth set to PCIe Gen4 x16 "
                     f"({PCIE_GEN4_BYTES_PER_S / GB:.0f} GB/s per direction) instead of {preset}'s NVLink")
        spec = spec.with_overrides(intra_node_bytes_per_s=PCIE_GEN4_BYTES_PER_S)
    return spec, "; ".join(notes)


def _host() -> tuple[int | None, int | None]:
    try:
        import psutil
        return int(psutil.virtual_memory().total), psutil.cpu_count(logical=True)
    except Exception:  # psutil missing or unsupported platform: a plan does not need it
        return None, None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _active_links(pynvml: Any, handle: Any) -> int:
    """Active NVLink links of one GPU; PCIe GPUs answer NotSupported at link 0 (-> 0)."""
    active = 0
    for link in range(int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            state = pynvml.nvmlDeviceGetNvLinkState(handle, link)
        except Exception:  # NVMLError_NotSupported / InvalidArgument past the last link
            break
        active += int(state == getattr(pynvml, "NVML_FEATURE_ENABLED", 1))
    return active


def read_nvml() -> tuple[dict[str, Any] | None, str]:
    """GPUs through NVML: (facts, "") or (None, why not) when there is no driver or GPU."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as error:
        return None, f"NVML could not start: {_one_line(error)}"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        if count == 0:
            return None, "NVML sees no NVIDIA GPU"
        names, memories, links = [], [], []
        for index in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            names.append(_text(pynvml.nvmlDeviceGetName(handle)).strip())
            memories.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).total))
            links.append(_active_links(pynvml, handle))
        try:
            driver: str | None = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        return {"count": count, "names": names, "memories": memories, "links": links, "driver": driver}, ""
    except Exception as error:
        return None, f"NVML query failed: {_one_line(error)}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _check_per_node(gpus_per_node: int | None) -> None:
    if gpus_per_node is not None and (isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int)
                                      or gpus_per_node < 1):
        raise UsageError(f"--gpus-per-node {gpus_per_node!r}: must be a positive integer")


def resolve_hardware(gpu_arg: str | None = "auto", gpus_per_node: int | None = None) -> ProbeResult:
    """``--gpu auto`` (or None) probes NVML, falling back to the default preset; a name is used as is.

    ``gpus_per_node`` overrides the node size; otherwise it is the GPUs NVML sees, or
    the preset's node size (8) when nothing was probed.
    """
    _check_per_node(gpus_per_node)
    host_memory, cpus = _host()
    if gpu_arg is not None and gpu_arg.strip().lower() not in ("", "auto"):
        spec = resolve_gpu(gpu_arg)  # SpecError names --gpu and the presets
        per_node = gpus_per_node or spec.gpus_per_node
        return ProbeResult(spec, per_node, per_node, "named", "", host_memory, cpus)
    found, why = read_nvml()
    if found is None:
        spec = GPU_PRESETS[DEFAULT_GPU]
        per_node = gpus_per_node or spec.gpus_per_node
        return ProbeResult(spec, per_node, per_node, "default",
                           f"no NVIDIA GPU found ({why}); using the default {DEFAULT_GPU} preset "
                           "(pass --gpu NAME to choose)", host_memory, cpus)
    name, memory = found["names"][0], found["memories"][0]
    spec, note = spec_for_nvml_name(name, memory)
    notes = [note] if note else []
    if len(set(found["names"])) > 1:
        notes.append(f"GPUs differ ({', '.join(sorted(set(found['names'])))}): planning with GPU 0's")
    links = found["links"]
    if found["count"] > 1 and not any(links) and spec.intra_node_bytes_per_s > 2 * PCIE_GEN4_BYTES_PER_S:
        notes.append(f"NVML reports no active NVLink links: these GPUs may talk over PCIe, slower than "
                     f"{spec.name}'s {spec.intra_node_bytes_per_s / GB:.0f} GB/s assumed here")
    per_node = gpus_per_node or found["count"]
    return ProbeResult(spec, found["count"], per_node, "nvml", "; ".join(notes), host_memory, cpus,
                       links, found["driver"], name)


__all__ = ["ProbeResult", "resolve_hardware", "spec_for_nvml_name", "preset_for_name", "closest_preset",
           "read_nvml", "NAME_RULES"]

preset_for_nvml_name = spec_for_nvml_name  # the earlier name of the same function
