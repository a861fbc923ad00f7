"""Trace a plan's CUDA program on a machine without a GPU, in a process of its own.

    python -m runtime.cuda_trace PLAN.yaml --json OUT.json [--sdpa-backend flash|efficient|cudnn]

The fake CUDA device (``runtime/fake_cuda.py``) has to be loaded before ``import torch``,
so this runs as its own process (``autoplan check`` starts it). Writes the traced peak
and components as JSON; a one-line error (exit 3) when the CUDA program cannot be traced
here, so the caller can fall back to the CPU program and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("--json", required=True, help="write the traced peak and components here")
    parser.add_argument("--sdpa-backend", choices=("flash", "efficient", "cudnn"), default="flash")
    args = parser.parse_args(argv)
    from . import fake_cuda

    try:
        fake_cuda.load(args.sdpa_backend)
    except fake_cuda.FakeCudaUnavailable as error:
        print(f"runtime.cuda_trace: {error}", file=sys.stderr)
        return 3
    import warnings

    warnings.filterwarnings("ignore")
    fake_cuda.stub_torch_cuda()
    fake_cuda.lower_right_causal_as_on_gpu(args.sdpa_backend)
    from autoplan.plan import Plan

    from .trace import trace_plan_memory

    result = trace_plan_memory(Plan.load(args.plan), device_type="cuda")
    with open(args.json, "w") as out:
        json.dump({"peak_bytes": result.peak_bytes, "categories": result.categories,
                   "components": result.components, "sdpa_backend": args.sdpa_backend}, out)
    sys.stdout.flush()
    sys.stderr.flush()
    # The fake process group's threads do not always wind down cleanly at interpreter exit
    # ("terminate called without an active exception"); the result is written: leave now.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
