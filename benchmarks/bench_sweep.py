"""A 100-point sweep (10 sequence lengths x 10 GPU counts, throughput objective).

Run: python benchmarks/bench_sweep.py
"""

import time

from autoplan.planner import PlanRequest, make_plan
from cost_models.specs import resolve_gpu, resolve_model


def main() -> None:
    model, gpu = resolve_model("llama3-8b"), resolve_gpu("h100")
    seqs = [2**k for k in range(13, 23)]  # 8k .. 4M
    counts = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    began = time.perf_counter()
    fitted = 0
    for seq in seqs:
        for count in counts:
            result = make_plan(PlanRequest(model=model, gpu=gpu, num_gpus=count, target_seq_len=seq, top_k=0))
            fitted += result.plan is not None
    elapsed = time.perf_counter() - began
    print(f"100-point sweep: {elapsed:.2f} s ({elapsed * 10:.0f} ms per point), {fitted} points have a plan")


if __name__ == "__main__":
    main()
