"""Peak reserved memory of the published torchtitan runs vs the memory model.

    PYTHONPATH=. python benchmarks/published_memory.py [--runs PATH]

For every run in ``calibration-runs.json`` that published memory (torchtitan's logged
``memory`` = peak reserved caching-allocator bytes), prints the prediction of the
``torchtitan`` executor profile (late 2024: per-op SAC, full-sequence fp32 loss, FSDP2
side-stream pools, the loss's stranded allocator blocks) with the prior fragmentation
remainder, with the remainder fitted on all runs, and leave-one-group-out (the remainder
fitted without the run's ``same_config_group``, then predicting it).

The remainder is the one fitted parameter: reserved = (tensors + stranded) x (1 + f) +
pools, linear in f, so its least-squares value on relative errors is closed form:
f = sum(b_i / m_i (1 - (b_i + p_i) / m_i)) / sum((b_i / m_i)^2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.memory import memory_terms, predict_reserved_peak_bytes
from cost_models.specs import resolve_model

GiB = 2**30
DEFAULT_RUNS = Path(__file__).resolve().parents[1] / ".." / "shared" / "published-runs" / "calibration-runs.json"
MODELS = {"Llama 3.1 8B": "llama3-8b", "Llama 3 8B": "llama3-8b", "Llama 3 70B": "llama3-70b"}


def run_config(run: dict) -> tuple:
    model = resolve_model(MODELS[run["model"]])
    ac_text = run["ac_mode"]
    mode = "full" if ac_text.startswith("full") else "none" if ac_text.startswith("none") else "selective"
    cfg = TrainConfig(Parallelism(dp_replicate=run["dp_replicate"], dp_shard=run["dp_shard_fsdp"], cp=run["cp"],
                                  tp=run["tp"]),
                      run["seq_len"], run["local_batch_size"], run["grad_accum_steps"],
                      ac=ACPolicy.uniform(mode, model.n_layers))
    executor = resolve_executor("torchtitan").with_overrides(compile=bool(run["torch_compile"]))
    return model, cfg, executor


def parts(run: dict) -> tuple[float, float]:
    """(b, p): reserved = b (1 + f) + p."""
    model, cfg, executor = run_config(run)
    with_zero = predict_reserved_peak_bytes(model, cfg, executor, fragmentation=0.0)
    pools = memory_terms(model, cfg, executor).allocator_pool_bytes
    return with_zero - pools, pools


def fit_remainder(rows: list[tuple[float, float, float]]) -> float:
    """rows of (b, p, measured)."""
    num = sum(b / m * (1 - (b + p) / m) for b, p, m in rows)
    den = sum((b / m) ** 2 for b, p, m in rows)
    return num / den


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    args = parser.parse_args(argv)
    runs = [r for r in json.loads(args.runs.read_text()) if r["measured"].get("memory_gib_peak_reserved")]
    prior = resolve_executor("torchtitan").allocator_fragmentation
    rows = []
    for run in runs:
        b, p = parts(run)
        rows.append((run, b, p, run["measured"]["memory_gib_peak_reserved"] * GiB))
    f_all = fit_remainder([(b, p, m) for _, b, p, m in rows])
    print(f"fragmentation remainder: prior {prior:.4f}, fitted on all {len(rows)} runs {f_all:.4f}")
    header = f"{'run':34s} {'group':30s} {'published':>9s} {'prior':>14s} {'fitted':>14s} {'leave-group-out':>22s}"
    print(header)
    errors = {"prior": [], "fitted": [], "logo": []}
    for run, b, p, m in rows:
        group = run.get("same_config_group") or run["id"]
        others = [(b2, p2, m2) for r2, b2, p2, m2 in rows if (r2.get("same_config_group") or r2["id"]) != group]
        f_logo = fit_remainder(others) if others else prior
        preds = {"prior": b * (1 + prior) + p, "fitted": b * (1 + f_all) + p, "logo": b * (1 + f_logo) + p}
        for k, v in preds.items():
            errors[k].append(v / m - 1)
        cell = lambda k: f"{preds[k] / GiB:6.1f} ({preds[k] / m - 1:+5.1%})"  # noqa: E731
        print(f"{run['id']:34s} {group:30s} {m / GiB:9.1f} {cell('prior'):>14s} {cell('fitted'):>14s} "
              f"{cell('logo'):>15s} f={f_logo:.3f}")
    for k, errs in errors.items():
        print(f"max |error| {k:7s}: {max(abs(e) for e in errs):.1%}")
    b, p = parts(rows[0][0])
    model, cfg, executor = run_config(rows[0][0])
    terms = memory_terms(model, cfg, executor)
    print(f"\nparts of {rows[0][0]['id']} (GiB): tensor peak + stranded {b / GiB:.2f} "
          f"(stranded {terms.loss_stranded_bytes / GiB:.2f}), side-stream pools {p / GiB:.2f}; "
          f"selective saved per block {terms.layer.saved['selective'] / GiB:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
