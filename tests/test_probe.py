"""Hardware probe with a stand-in NVML module (no real GPU needed)."""

import sys
import types

import pytest

from autoplan import probe
from cost_models.specs import GPU_PRESETS, MiB


def fake_pynvml(name, count=8, memory=81559 * MiB, fail_init=False):
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetCount = lambda: count
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetName = lambda h: name.encode()
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=memory)
    module.NVML_NVLINK_MAX_LINKS = 18
    module.nvmlDeviceGetNvLinkState = lambda h, link: 1
    module.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    return module


@pytest.mark.parametrize("nvml_name, preset", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm-80gb"), ("NVIDIA H100 PCIe", "h100-pcie-80gb"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA B200", "b200"),
    ("NVIDIA L40S", "l40s"),
])
def test_nvml_names_map_to_presets(monkeypatch, nvml_name, preset):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(nvml_name))
    found = probe.resolve_hardware("auto")
    assert found.source == "nvml" and found.gpu.name == preset and found.gpu_count == 8
    assert found.nvlink_links == [18] * 8 and found.driver == "550.54.15"


def test_unknown_gpu_keeps_measured_memory(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml("NVIDIA RTX 9999", count=2, memory=32 * 1024**3))
    found = probe.resolve_hardware("auto")
    assert found.gpu.memory_bytes == 32 * 1024**3 and "unknown GPU" in found.note


def test_no_driver_falls_back_to_default_and_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml("x", fail_init=True))
    found = probe.resolve_hardware("auto")
    assert found.source == "default" and found.gpu == GPU_PRESETS["h100-sxm-80gb"]
    assert "no NVIDIA GPU" in found.note and "\n" not in found.note


def test_named_gpu_skips_the_probe(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml("NVIDIA H100 80GB HBM3"))
    found = probe.resolve_hardware("a100-40gb", gpus_per_node=4)
    assert found.source == "named" and found.gpu.name == "a100-40gb" and found.gpus_per_node == 4
