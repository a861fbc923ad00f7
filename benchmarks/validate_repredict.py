"""Re-price the validation grid's cells against traces already taken.

    PYTHONPATH=. python benchmarks/validate_repredict.py [benchmarks/validate_memory_results.json]
    PYTHONPATH=. python benchmarks/validate_repredict.py benchmarks/validate_cuda_results.json --program cuda

``--write`` stores the new predictions back into the file.

``autoplan validate --json FILE`` stores every cell's traced peak (the trace depends only
on the runtime, not on the cost model); this re-predicts each cell with the current
memory model and prints the same table, so a change to the model is checked on all 162
cells in a second instead of re-tracing them (about 7 minutes on one core).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autoplan.validation import cell_plan
from cost_models.memory import estimate_memory
from cost_models.specs import GiB

DEFAULT = Path(__file__).with_name("validate_memory_results.json")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    program = "cpu"
    write = "--write" in args
    if write:
        args.remove("--write")
    if "--program" in args:
        at = args.index("--program")
        program = args[at + 1]
        del args[at:at + 2]
    path = Path(args[0] if args else DEFAULT)
    rows = json.loads(path.read_text())
    print(f"{'model':<6}{'layout':<25}{'AC':<10}{'seq':>7}{'traced GiB':>12}{'predicted':>11}{'error':>8}  phase")
    for row in rows:
        model, plan = cell_plan(row["model"], row["layout"], row["ac"], row["seq_len"], program)
        est = estimate_memory(model, plan.train_config(), "autoplan")
        row["predicted_bytes"] = est.forward_backward_tensor_peak_bytes
        row["error"] = row["predicted_bytes"] / row["traced_bytes"] - 1
        row["phase"] = est.tensor_peak_phase
        print(f"{row['model']:<6}{row['layout']:<25}{row['ac']:<10}{row['seq_len']:>7}"
              f"{row['traced_bytes'] / GiB:>12.2f}{row['predicted_bytes'] / GiB:>11.2f}{row['error'] * 100:>+7.1f}%"
              f"  {row['phase']}")
    if write:
        path.write_text(json.dumps(rows, indent=1))
    worst = max(rows, key=lambda r: abs(r["error"]))
    outside = [r for r in rows if abs(r["error"]) > 0.05]
    print(f"\n{len(rows)} cells; worst error {worst['error'] * 100:+.1f}% ({worst['model']} {worst['layout']} "
          f"{worst['ac']} {worst['seq_len']}); {len(outside)} cells outside 5%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
