"""``autoplan probe``: the hardware the planner sees (NVML + psutil, or the default preset)."""

from __future__ import annotations

import argparse
import json

from . import options


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="auto", help="auto (probe with NVML) or a preset name")
    options.add_format(parser, ("table", "json"))


def run(args: argparse.Namespace) -> int:
    from ..probe import resolve_hardware

    found = resolve_hardware(args.gpu, None)
    if args.format == "json":
        print(json.dumps(found.to_dict(), indent=2, default=str))
        return 0
    gpu = found.gpu
    print(f"gpu          {gpu.name} ({gpu.memory_bytes / 2**30:.1f} GiB, {gpu.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16)")
    print(f"count        {found.gpu_count} ({found.gpus_per_node} per node)   source {found.source}")
    if found.host_memory_bytes:
        print(f"host         {found.cpu_count} CPUs, {found.host_memory_bytes / 2**30:.1f} GiB memory")
    if found.note:
        print(f"note         {found.note}")
    return 0
