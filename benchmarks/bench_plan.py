"""Planner wall time: the headline command, a 16,384-GPU 405B plan and a 10^9-GPU max-seqlen answer.

Run: python benchmarks/bench_plan.py
Each case runs in a fresh interpreter (``autoplan`` as a user would run it), so import
time counts; the script also checks that planning never imports torch.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CASES = [
    ("headline: --gpus 64 --target-seqlen 256k", ["--gpus", "64", "--target-seqlen", "256k"], 1.0),
    ("llama3.1-405b on 16,384 GPUs at 128k",
     ["--model", "llama3.1-405b", "--gpus", "16384", "--target-seqlen", "128k"], 1.0),
    # divisors by prime factorization: a linear scan never finished here
    ("--gpus 1000000000 (max-seqlen)", ["--gpus", "1000000000"], 5.0),
]
CHECK_NO_TORCH = ("import sys, runpy; sys.argv = ['autoplan', '--gpus', '64', '--target-seqlen', '256k'];"
                  "from autoplan.cli import main; main(sys.argv[1:]);"
                  "assert 'torch' not in sys.modules, 'planning imported torch'")


def wall_s(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoplan", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    subprocess.run([sys.executable, "-c", CHECK_NO_TORCH], check=True, capture_output=True)
    print("torch not imported on the planning path: ok")
    failed = False
    for name, args, budget in CASES:
        times = [wall_s(args) for _ in range(3)]
        median = statistics.median(times)
        verdict = "ok" if median < budget else "OVER BUDGET"
        failed |= median >= budget
        print(f"{name:<45} median {median:6.2f} s of 3 runs (budget {budget:.0f} s) {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
