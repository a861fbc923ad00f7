"""Hardware probe with a stand-in NVML module (no real GPU needed)."""

import json
import sys
import types

import pytest

from autoplan import probe
from autoplan.errors import UsageError
from cost_models.specs import GB, GPU_PRESETS, GiB, MiB, SpecError


class NVMLError(Exception):
    pass


def fake_pynvml(names, memory=81559 * MiB, links=18, fail_init=False, fail_query=False, driver=b"550.54.15"):
    """A pynvml stand-in: ``names`` is one name (times 8 GPUs) or a list, one per GPU."""
    names = [names] * 8 if isinstance(names, str) else list(names)
    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError
    module.NVML_NVLINK_MAX_LINKS = 18
    module.NVML_FEATURE_ENABLED = 1
    calls = module.calls = []

    def init():
        calls.append("init")
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def name(handle):
        if fail_query:
            raise NVMLError("GPU is lost")
        return names[handle].encode()

    def nvlink_state(handle, link):
        if links == 0 and link == 0:
            raise NVMLError("Not Supported")
        if link >= 18:
            raise NVMLError("Invalid Argument")
        return 1 if link < links else 0

    module.nvmlInit = init
    module.nvmlShutdown = lambda: calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: len(names)
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetName = name
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=memory, free=memory, used=0)
    module.nvmlDeviceGetNvLinkState = nvlink_state
    module.nvmlSystemGetDriverVersion = lambda: driver
    return module


@pytest.fixture
def nvml(monkeypatch):
    def install(*args, **kwargs):
        module = fake_pynvml(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module
    return install


@pytest.mark.parametrize("nvml_name, preset, memory", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm-80gb", 81559 * MiB),
    ("NVIDIA H100 PCIe", "h100-pcie-80gb", 81559 * MiB),
    ("NVIDIA H200", "h200", 143771 * MiB),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb", 81920 * MiB),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb", 40960 * MiB),
    ("NVIDIA B200", "b200", 180 * 10**9),
    ("NVIDIA L40S", "l40s", 46068 * MiB),
])
def test_nvml_names_map_to_presets(nvml, nvml_name, preset, memory):
    module = nvml(nvml_name, memory=memory)
    found = probe.resolve_hardware("auto")
    assert found.source == "nvml" and found.gpu == GPU_PRESETS[preset] and found.note == ""
    assert found.gpu_count == 8 and found.gpus_per_node == 8
    assert found.nvlink_links == [18] * 8 and found.driver == "550.54.15"
    assert found.gpu_name_reported == nvml_name
    assert module.calls == ["init", "shutdown"]


@pytest.mark.parametrize("nvml_name, preset", [
    ("NVIDIA H100 NVL", "h100-pcie-80gb"), ("NVIDIA GH200 480GB", "h200"), ("NVIDIA A100 80GB PCIe", "a100-sxm-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("Tesla V100-SXM2-32GB", None), ("NVIDIA L40", None),
    ("NVIDIA GB200", "b200"), ("NVIDIA H100_80GB_HBM3", "h100-sxm-80gb"),
])
def test_name_rules(nvml_name, preset):
    assert probe.preset_for_name(nvml_name) == preset


def test_pcie_a100_gets_pcie_bandwidth_and_a_note(nvml):
    nvml("NVIDIA A100-PCIE-40GB", memory=40960 * MiB, links=0)
    found = probe.resolve_hardware("auto")
    assert found.gpu.name == "a100-40gb" and found.gpu.intra_node_bytes_per_s == 32 * GB
    assert found.gpu.bf16_flops_per_s == GPU_PRESETS["a100-40gb"].bf16_flops_per_s
    assert "PCIe card" in found.note and "\n" not in found.note
    assert found.nvlink_links == [0] * 8


def test_measured_memory_overrides_a_preset_that_differs(nvml):
    nvml("NVIDIA H100 NVL", memory=95830 * MiB)  # the 94 GB H100 NVL
    found = probe.resolve_hardware("auto")
    assert found.gpu.memory_bytes == 95830 * MiB
    assert found.gpu.bf16_flops_per_s == GPU_PRESETS["h100-pcie-80gb"].bf16_flops_per_s
    assert "using the measured memory" in found.note


def test_unknown_gpu_keeps_measured_memory_with_closest_preset(nvml):
    nvml(["NVIDIA RTX 9999"] * 2, memory=32 * GiB)
    found = probe.resolve_hardware("auto")
    closest = GPU_PRESETS["a100-40gb"]  # 40 GiB is the nearest preset to 32 GiB
    assert found.source == "nvml" and found.gpu.name == "nvidia-rtx-9999"
    assert found.gpu.memory_bytes == 32 * GiB
    assert found.gpu.bf16_flops_per_s == closest.bf16_flops_per_s
    assert found.gpu.hbm_bytes_per_s == closest.hbm_bytes_per_s
    assert "unknown GPU 'NVIDIA RTX 9999'" in found.note and "a100-40gb" in found.note
    assert found.gpu_count == 2 and found.gpus_per_node == 2


def test_closest_preset_by_memory():
    assert probe.closest_preset(81559 * MiB) == "h100-sxm-80gb"
    assert probe.closest_preset(48 * GiB) == "l40s"
    assert probe.closest_preset(150 * GiB) == "h200"
    assert probe.closest_preset(190 * GiB) == "b200"  # NVIDIA names never map to the AMD preset
    assert probe.closest_preset(190 * GiB, "AMD Instinct MI325X") == "mi300x"


@pytest.mark.parametrize("kwargs, why", [
    ({"fail_init": True}, "(NVML could not start: Driver Not Loaded); using the default"),
    ({"names": []}, "(NVML sees no NVIDIA GPU);"),
    ({"fail_query": True}, "(NVML query failed: GPU is lost);"),
])
def test_no_driver_or_gpu_falls_back_to_default_and_says_so(nvml, kwargs, why):
    module = nvml(**({"names": "x"} | kwargs))
    found = probe.resolve_hardware("auto")
    assert found.source == "default" and found.gpu == GPU_PRESETS["h100-sxm-80gb"]
    assert found.gpu_count == 8 and found.gpus_per_node == 8
    assert found.note.startswith("no NVIDIA GPU found") and why in found.note and "h100-sxm-80gb" in found.note
    assert "\n" not in found.note
    if not kwargs.get("fail_init"):
        assert module.calls[-1] == "shutdown"


def test_without_pynvml_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    found = probe.resolve_hardware(None, gpus_per_node=4)
    assert found.source == "default" and found.gpus_per_node == 4 and "pynvml" in found.note


def test_named_gpu_skips_the_probe(nvml):
    module = nvml("NVIDIA H100 80GB HBM3")
    found = probe.resolve_hardware("a100-40gb", gpus_per_node=4)
    assert found.source == "named" and found.gpu == GPU_PRESETS["a100-40gb"] and found.gpus_per_node == 4
    assert found.note == "" and module.calls == []
    assert probe.resolve_hardware("H100").gpu == GPU_PRESETS["h100-sxm-80gb"]


def test_bad_gpu_name_and_node_size_are_one_line_errors():
    with pytest.raises(SpecError, match=r"^--gpu 'tpu-v5': unknown GPU"):
        probe.resolve_hardware("tpu-v5")
    for bad in (0, -8, 2.5):
        with pytest.raises(UsageError, match=r"^--gpus-per-node"):
            probe.resolve_hardware("h100", gpus_per_node=bad)


def test_gpus_per_node_overrides_the_count(nvml):
    nvml("NVIDIA H100 80GB HBM3")
    found = probe.resolve_hardware("auto", gpus_per_node=4)
    assert found.gpu_count == 8 and found.gpus_per_node == 4


def test_mixed_gpus_and_missing_nvlink_are_noted(nvml):
    nvml(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"], links=0)
    found = probe.resolve_hardware("auto")
    assert found.gpu.name == "h100-sxm-80gb"
    assert "GPUs differ" in found.note and "no active NVLink links" in found.note and "\n" not in found.note


def test_str_names_from_newer_pynvml(nvml):
    module = nvml("NVIDIA H200", memory=143771 * MiB, driver="560.35.03")
    module.nvmlDeviceGetName = lambda h: "NVIDIA H200"
    found = probe.resolve_hardware("auto")
    assert found.gpu.name == "h200" and found.driver == "560.35.03"


def test_to_dict_is_json(nvml):
    nvml("NVIDIA H100 80GB HBM3")
    data = json.loads(json.dumps(probe.resolve_hardware("auto").to_dict()))
    assert data["gpu"]["name"] == "h100-sxm-80gb" and data["source"] == "nvml"
    assert set(data) >= {"gpu", "gpu_count", "gpus_per_node", "source", "note", "host_memory_bytes", "cpu_count",
                         "nvlink_links", "driver"}


def test_host_facts_come_from_psutil(monkeypatch):
    fake = types.ModuleType("psutil")
    fake.virtual_memory = lambda: types.SimpleNamespace(total=512 * GiB)
    fake.cpu_count = lambda logical=True: 96
    monkeypatch.setitem(sys.modules, "psutil", fake)
    found = probe.resolve_hardware("h100")
    assert found.host_memory_bytes == 512 * GiB and found.cpu_count == 96


def test_real_machine_probe_does_not_crash():
    found = probe.resolve_hardware("auto")  # whatever this machine has (CI: no GPU)
    assert found.source in ("nvml", "default") and found.gpu_count >= 1 and "\n" not in found.note
