"""Per-pp-rank memory: the pipeline cost model against the runtime's traced memory.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/validate_pipeline.py [--write]

Each row traces one pp rank of a plan (runtime/trace.py ``trace_pipeline_memory``: the
runtime's stages, PyTorch's schedule, the pipeline loss, FSDP2 / TP per stage, fake
tensors and the fake process group; the second step's forward + backward peak) and
compares it with ``cost_models.pipeline.estimate_pipeline(...).stages[rank]``'s
forward + backward tensor peak. Llama 3 8B shapes (reduced layers), bf16 params, fp32
master and grads, loss chunks of 4096 tokens. ``--write`` writes
benchmarks/validate_pipeline_results.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from autoplan.plan import ActivationCheckpointDoc, Plan
from cost_models.executors import resolve_executor
from cost_models.pipeline import estimate_pipeline
from cost_models.specs import MODEL_PRESETS, ClusterSpec, resolve_gpu
from runtime.trace import trace_plan_memory

GiB = 2**30
OUT = Path(__file__).with_name("validate_pipeline_results.txt")

# name, layers, parallelism, plan fields, AC, seq_len, local batch (= micro-batches x micro-batch size)
LAYOUTS = [
    ("PP2 1F1B", 4, {"pp": 2}, {}, "none", 1024, 4),
    ("PP2 GPipe", 4, {"pp": 2}, {"pp_schedule": "gpipe"}, "none", 1024, 4),
    ("PP2 x FSDP2", 4, {"pp": 2, "dp_shard": 2}, {}, "none", 1024, 4),
    ("PP2 x TP2", 4, {"pp": 2, "tp": 2}, {}, "none", 1024, 4),
    ("PP2 interleaved v=2", 4, {"pp": 2}, {"pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 2}, "none", 1024, 4),
    ("PP2 1F1B full AC", 4, {"pp": 2}, {}, "full", 4096, 4),
    ("PP2 1F1B selective AC", 4, {"pp": 2}, {}, "selective", 4096, 4),
    ("PP4 1F1B 8 layers", 8, {"pp": 4}, {}, "none", 2048, 8),
    ("PP2 x FSDP2 x TP2", 4, {"pp": 2, "dp_shard": 2, "tp": 2}, {}, "none", 2048, 4),
    # Activations only: the debug model (d = 64, vocab 256), 8 x 4096-token micro-batches.
    ("debug PP2 1F1B", 2, {"pp": 2}, {"pp_microbatches": 4}, "none", 4096, 32, "debug"),
]


def rows(selected: list[str] | None = None):
    for name, layers, parallelism, fields, ac, seq, batch, *preset in LAYOUTS:
        if selected and name not in selected:
            continue
        model = replace(MODEL_PRESETS[preset[0] if preset else "llama3-8b"], n_layers=layers)
        plan = Plan(seq_len=seq, local_batch_size=batch, parallelism=parallelism, model=model.to_dict(),
                    activation_checkpoint=ActivationCheckpointDoc(mode=ac), loss_chunk_tokens=4096, **fields)
        cfg = plan.train_config()
        stages = estimate_pipeline(model, ClusterSpec(resolve_gpu("h100"), plan.parallelism.world_size), cfg,
                                   resolve_executor("autoplan"), cfg.ac_policy(layers).layer_modes).stages
        for rank in range(plan.parallelism.pp):
            began = time.perf_counter()
            traced = trace_plan_memory(plan, pp_rank=rank)
            predicted = stages[rank].forward_backward_tensor_bytes
            yield (f"{name:<24}{ac:<10}{seq:>6}{plan.microbatches:>4}{rank:>6}{traced.peak_bytes / GiB:>11.4f}"
                   f"{predicted / GiB:>11.4f}{(predicted / traced.peak_bytes - 1) * 100:>+8.2f}%  "
                   f"{stages[rank].tensor_peak_phase:<19}{traced.peak_at}  ({time.perf_counter() - began:.0f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--only", action="append", help="layout name (repeatable)")
    args = parser.parse_args(argv)
    header = [
        "# PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/validate_pipeline.py --write",
        "# traced: one pp rank, the CPU program under fake tensors (runtime/trace.py); predicted: the",
        "# forward + backward tensor peak of cost_models/pipeline.py (its phase); the trace's peak op last.",
        "# Llama 3 8B shapes (last row: the debug model), bf16 params / fp32 master + grads, loss chunks of 4096",
    "# tokens; m micro-batches of local batch / m sequences (1 for the 8B rows).",
        f"{'layout':<24}{'AC':<10}{'seq':>6}{'m':>4}{'rank':>6}{'traced GiB':>11}{'predicted':>11}{'error':>9}  "
        f"{'predicted phase':<19}traced peak at",
    ]
    lines = list(header)
    print("\n".join(header))
    for line in rows(args.only):
        print(line, flush=True)
        lines.append(line)
    if args.write:
        OUT.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
