"""A 100-point sweep: 10 sequence lengths x 10 GPU counts, the fastest plan at each
(throughput objective), through ``autoplan.sweep.grid``.

Run: python benchmarks/bench_sweep.py [--jobs N] [--profile]

``--jobs 1`` runs every point in this process (the planner's own speed); the default
spreads points over the CPUs (at most 8). ``--profile`` prints where one serial pass
spends its time (cProfile, top 25 by cumulative time).
"""

import argparse
import time

from autoplan.sweep import SweepSetup, _plan, grid
from cost_models.specs import resolve_gpu, resolve_model

SEQS = [2**k for k in range(13, 23)]  # 8k .. 4M
COUNTS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def run(jobs: int | None) -> tuple[float, list[dict]]:
    _plan.cache_clear()  # time the planning, not the memo
    setup = SweepSetup(resolve_model("llama3-8b"), resolve_gpu("h100"), gpus_per_node=8)
    began = time.perf_counter()
    rows = grid(setup, SEQS, COUNTS, jobs=jobs)
    return time.perf_counter() - began, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.enable()
        run(1)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        return
    elapsed, rows = run(args.jobs)
    assert len(rows) == 100
    fitted = sum(r["fits"] for r in rows)
    jobs = "default jobs" if args.jobs is None else f"jobs={args.jobs}"
    print(f"100-point sweep ({jobs}): {elapsed:.2f} s ({elapsed * 10:.0f} ms per point), {fitted} points have a plan")


if __name__ == "__main__":
    main()
