"""A fake CUDA device for tracing the CUDA program without a GPU (design.md, "Runtime facts").

``load()`` must run before ``import torch`` in the process: the CUDA hooks are looked up
once, when torch first asks. It compiles ``fake_cuda.cpp`` once (g++, ~10 s) into a cache
folder keyed by the source and the torch version, and loads it. ``stub_torch_cuda()`` then
replaces the device, stream and event functions of ``torch.cuda`` (FSDP2 calls them) with
no-ops and removes the differences between the CPU wheel and a CUDA build that change
what is traced: ops the wheel only decomposes on CUDA (``mirror_cuda_kernels``), the
device mesh's own bookkeeping (``mesh_metadata_outside_fake_mode``). The CUDA trace also
calls ``lower_right_causal_as_on_gpu`` for the portable CP's causal masks. Every tensor on
the fake device must be a FakeTensor: nothing real exists there.

Pinned to the torch version it was tested on; any other is refused in one line
(``FakeCudaUnavailable``), and callers fall back to the CPU trace and say so.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TESTED_TORCH = "2.13.0"
SOURCE = Path(__file__).with_name("fake_cuda.cpp")
# SDPBackend values (torch/nn/attention/__init__.py): what the traced program's SDPA picks.
SDPA_BACKENDS = {"flash": 1, "efficient": 2, "cudnn": 3}


class FakeCudaUnavailable(RuntimeError):
    """The CUDA program cannot be traced here (the message says why, in one line)."""


def torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise FakeCudaUnavailable("PyTorch is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def torch_version() -> str:
    text = (torch_dir() / "version.py").read_text()
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", text, re.M)
    return found.group(1) if found else "unknown"


def library_path() -> Path:
    """Build (once) and return the shared library; raises ``FakeCudaUnavailable``."""
    version = torch_version()
    if version.split("+")[0] != TESTED_TORCH:
        raise FakeCudaUnavailable(f"the CUDA-program trace is tested on torch {TESTED_TORCH} only (found {version})")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise FakeCudaUnavailable("no C++ compiler (g++) to build the fake CUDA device")
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("AUTOPLAN_CACHE", Path.home() / ".cache" / "autoplan"))
    target = cache / f"fake_cuda-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    root = torch_dir()
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = [compiler, "-O1", "-shared", "-fPIC", "-std=c++20", "-w", f"-I{root / 'include'}",
               f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(SOURCE),
               f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{root / 'lib'}", "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FakeCudaUnavailable(f"building the fake CUDA device failed: {last}")
    partial.rename(target)
    return target


def load(sdpa_backend: str = "flash") -> None:
    """Load the fake device into this process; must precede ``import torch``."""
    if "torch" in sys.modules:
        raise FakeCudaUnavailable("torch was imported before the fake CUDA device was loaded")
    library = ctypes.CDLL(str(library_path()), mode=ctypes.RTLD_GLOBAL)
    library.autoplan_set_sdpa_backend(ctypes.c_int64(SDPA_BACKENDS[sdpa_backend]))


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _Stream:
    def __init__(self, *args, **kwargs):
        import torch

        self.device = torch.device("cuda", 0)

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_KEEP: list = []  # the Library objects must outlive the registrations


def mirror_cuda_kernels() -> list[str]:
    """Ops with a CPU kernel and a CompositeImplicitAutograd fallback but no CUDA kernel in
    the CPU wheel (``silu_backward``, ``mish_backward``, ...): a CUDA build has a fused
    kernel for them. Without one here the dispatcher decomposes them at the autograd key
    for CUDA tensors (SwiGLU's backward became sigmoid, three muls and a sub: 4 GiB more
    than the real program at 64k tokens), so register a CUDA kernel that can never run
    (every tensor is fake) just to restore the CUDA build's dispatch table."""
    import torch

    names = []
    library = torch.library.Library("aten", "IMPL")
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue

        def has(key: str, op: str = name) -> bool:
            return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)

        if has("CPU") and has("CompositeImplicitAutograd") and not has("CUDA"):
            def unreachable(*args, _op=name, **kwargs):
                raise RuntimeError(f"{_op} ran on the fake CUDA device: only fake tensors belong there")

            library.impl(name.removeprefix("aten::"), unreachable, "CUDA")
            names.append(name)
    _KEEP.append(library)
    return names


def mesh_metadata_outside_fake_mode() -> None:
    """DeviceMesh computes rank coordinates with small integer CPU tensors (``nonzero``:
    data-dependent). On the fake CUDA device the model is parallelized under fake mode
    (nothing real may live there), and FSDP x TP builds a concatenated mesh then: run the
    mesh's own bookkeeping on real CPU tensors, outside fake mode."""
    import functools

    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh.__init__
    if getattr(original, "_outside_fake_mode", False):
        return

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        with unset_fake_temporarily():
            original(self, *args, **kwargs)

    init._outside_fake_mode = True  # type: ignore[attr-defined]
    DeviceMesh.__init__ = init  # type: ignore[method-assign]


def lower_right_causal_as_on_gpu(sdpa_backend: str = "flash") -> None:
    """The portable all-gather-K/V CP attends with ``causal_lower_right`` masks
    (``torch.nn.attention.bias.CausalBias``). Two things differ on the fake device:
    the mask object (metadata: two lengths) cannot be created as a FakeTensor or under
    the memory tracker's dispatch mode, so it is made outside both; and CausalBias asks ``can_use_flash_attention`` /
    ``can_use_efficient_attention``, CUDA checks that the CPU wheel answers False, which
    would trace the materialized-mask math path no GPU runs. They answer as an H100 does
    for the backend the program asks for (bf16, head dim <= 256: both kernels qualify)."""
    import functools

    import torch.nn.attention.bias as bias
    from torch.utils._python_dispatch import _disable_current_modes

    original = bias.causal_lower_right
    if getattr(original, "_outside_fake_mode", False):
        return

    @functools.wraps(original)
    def causal_lower_right(*size):
        with _disable_current_modes():  # fake mode and the memory tracker's mode
            return original(*size)

    causal_lower_right._outside_fake_mode = True  # type: ignore[attr-defined]
    bias.causal_lower_right = causal_lower_right
    bias.can_use_flash_attention = lambda params, debug=False: sdpa_backend == "flash"
    bias.can_use_efficient_attention = lambda params, debug=False: sdpa_backend in ("flash", "efficient")


def stub_torch_cuda(device_count: int = 8) -> None:
    """``torch.cuda``'s device, stream and event calls as no-ops on one fake device, and
    the CUDA build's dispatch table where the CPU wheel's differs (``mirror_cuda_kernels``)."""
    import torch

    mirror_cuda_kernels()
    mesh_metadata_outside_fake_mode()
    stream = _Stream()
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: device_count
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: stream
    cuda.default_stream = lambda device=None: stream
    cuda.stream = lambda s=None: s if s is not None else stream
    cuda.synchronize = lambda device=None: None
    cuda._lazy_init = lambda: None
    cuda.is_initialized = lambda: True
