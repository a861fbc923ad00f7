"""Re-price the validation grid's cells against traces already taken.

    PYTHONPATH=. python benchmarks/validate_repredict.py [benchmarks/validate_memory_results.json]

``autoplan validate --json FILE`` stores every cell's traced peak (the trace depends only
on the runtime, not on the cost model); this re-predicts each cell with the current
memory model and prints the same table, so a change to the model is checked on all 162
cells in a second instead of re-tracing them (about 7 minutes on one core).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from autoplan.plan import ActivationCheckpointDoc, Plan
from autoplan.validate import LAYOUTS, MODELS
from cost_models.memory import estimate_memory
from cost_models.specs import GiB, MODEL_PRESETS

DEFAULT = Path(__file__).with_name("validate_memory_results.json")


def main(argv: list[str] | None = None) -> int:
    path = Path((argv or sys.argv[1:] or [DEFAULT])[0])
    rows = json.loads(path.read_text())
    print(f"{'model':<6}{'layout':<18}{'AC':<10}{'seq':>7}{'traced GiB':>12}{'predicted':>11}{'error':>8}  phase")
    for row in rows:
        preset, layers = MODELS[row["model"]]
        model = replace(MODEL_PRESETS[preset], n_layers=layers)
        parallelism, order = LAYOUTS[row["layout"]]
        plan = Plan(seq_len=row["seq_len"], parallelism=parallelism, model=model.to_dict(),
                    activation_checkpoint=ActivationCheckpointDoc(mode=row["ac"]), loss_chunk_tokens=4096,
                    **({"mesh_order": order} if order else {}))
        est = estimate_memory(model, plan.train_config(), "autoplan")
        row["predicted_bytes"] = est.forward_backward_tensor_peak_bytes
        row["error"] = row["predicted_bytes"] / row["traced_bytes"] - 1
        row["phase"] = est.tensor_peak_phase
        print(f"{row['model']:<6}{row['layout']:<18}{row['ac']:<10}{row['seq_len']:>7}"
              f"{row['traced_bytes'] / GiB:>12.2f}{row['predicted_bytes'] / GiB:>11.2f}{row['error'] * 100:>+7.1f}%"
              f"  {row['phase']}")
    worst = max(rows, key=lambda r: abs(r["error"]))
    outside = [r for r in rows if abs(r["error"]) > 0.05]
    print(f"\n{len(rows)} cells; worst error {worst['error'] * 100:+.1f}% ({worst['model']} {worst['layout']} "
          f"{worst['ac']} {worst['seq_len']}); {len(outside)} cells outside 5%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
