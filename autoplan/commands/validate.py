"""``autoplan validate``: the memory model against the runtime's traced memory over a grid."""

from __future__ import annotations

import argparse
import json

from cost_models.specs import GiB


def register(parser: argparse.ArgumentParser) -> None:
    from ..validation import ACS, MODELS, SEQS
    parser.add_argument("--program", choices=("cpu", "cuda"), default="cpu",
                        help="trace the CPU program (default) or the CUDA program on the fake CUDA device")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--layouts", default=None, help="default: every layout of the program's grid")
    parser.add_argument("--ac", default=",".join(ACS))
    parser.add_argument("--seq", default=",".join(str(s) for s in SEQS))
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from ..report.progress import progress, wanted
    from ..validation import CUDA_LAYOUTS, LAYOUTS, run_cell

    rows = []
    layouts = args.layouts or ",".join(CUDA_LAYOUTS if args.program == "cuda" else LAYOUTS)
    cells = [(model_key, layout, ac, int(seq)) for model_key in args.models.split(",")
             for layout in layouts.split(",") for ac in args.ac.split(",") for seq in args.seq.split(",")]
    print(f"{'model':<6}{'layout':<25}{'AC':<10}{'seq':>7}{'traced GiB':>12}{'predicted':>11}{'error':>8}  phase")
    failed = []
    for model_key, layout, ac, seq in progress(cells, len(cells), "tracing cells", wanted(args.quiet)):
        try:
            row = run_cell(model_key, layout, ac, seq, args.program)
        except RuntimeError as error:  # a cell the program cannot trace: say so, go on
            failed.append((model_key, layout, ac, seq, str(error)))
            print(f"{model_key:<6}{layout:<25}{ac:<10}{seq:>7}  not traced: {error}", flush=True)
            continue
        rows.append(row)
        print(f"{model_key:<6}{layout:<25}{ac:<10}{seq:>7}{row['traced_bytes'] / GiB:>12.2f}"
              f"{row['predicted_bytes'] / GiB:>11.2f}{row['error'] * 100:>+7.1f}%  {row['phase']}",
              flush=True)
    if not rows:
        print(f"\nno cell could be traced ({len(failed)} failed)")
        return 1
    worst = max(rows, key=lambda r: abs(r["error"]))
    outside = [r for r in rows if abs(r["error"]) > 0.05]
    print(f"\n{len(rows)} cells; worst error {worst['error'] * 100:+.1f}% ({worst['model']} {worst['layout']} "
          f"{worst['ac']} {worst['seq_len']}); {len(outside)} cells outside 5%"
          + (f"; {len(failed)} cells not traced" if failed else ""))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0
