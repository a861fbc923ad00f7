"""Ten plausible bugs, seeded one at a time: each must fail at least one test.

    python benchmarks/seeded_bugs.py [--only NAME ...] [--timeout 900]

For each bug: copy the tree (without .git) to a temp folder, apply the one textual
replacement (the old text must occur exactly once, else this script fails loudly: the
code moved and the table needs updating), run the tests listed for it there with
``PYTHONPATH=<copy> python -m pytest -q -x <tests>`` under a timeout, and print
``bug | caught by | result``. A bug is caught when pytest exits 1 (a test failed);
a timeout or a collection error is reported as such, not as a catch. Exit 1 if any
bug survives (or could not be checked). Not part of CI (it seeds bugs); about a minute on 2 cores.

The table is the issue's list ("tests that catch real bugs"); the tests named for each
bug compare against an independent reference (hand arithmetic, a brute force, a
single-process run), never against the code under test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bug:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    Bug("attention backward factor 2.5 -> 2.0", "cost_models/flops.py",
        "ATTENTION_BACKWARD_FACTOR = 2.5", "ATTENTION_BACKWARD_FACTOR = 2.0",
        ("tests/test_seeded_cost.py::test_attention_backward_is_two_and_a_half_forwards",)),
    Bug("full-AC recompute omits attention", "cost_models/step.py",
        '        "full": forward,\n', '        "full": forward - attention_fwd,\n',
        ("tests/test_seeded_cost.py::test_full_recompute_reruns_the_whole_forward_attention_included",)),
    Bug('ILP "none on top" phase without its working set', "autoplan/ilp_memory.py",
        '(un, Wt["none"] + top_step["none"] + big)',
        '(un, top_step["none"] + big)',
        ("tests/test_ilp_memory_binding.py", "tests/test_ilp_memory.py")),
    Bug("ILP objective ignores grad accumulation", "autoplan/ilp.py",
        "terms.append(scale * (t.grad_accum_steps * micro + t.optimizer_s * x[i]))",
        "terms.append(scale * (micro + t.optimizer_s * x[i]))",
        ("tests/test_ilp_objective_accum.py",
         "tests/test_planner_reference.py::test_pinned_global_batch_with_grad_accumulation_matches_the_reference")),
    Bug("contiguous CP chunks instead of head-tail", "runtime/context_parallel.py",
        "    return cp_rank, 2 * cp - 1 - cp_rank\n", "    return 2 * cp_rank, 2 * cp_rank + 1\n",
        ("tests/test_seeded_runtime.py::test_head_tail_chunks_per_rank",
         "tests/test_seeded_runtime.py::test_every_cp_rank_does_equal_causal_work")),
    Bug("`autoplan run` drops --resume", "autoplan/commands/run.py",
        '    if args.resume:\n        command.append("--resume")\n', "",
        ("tests/test_seeded_runtime.py::test_run_passes_resume_and_checkpoint_dir_to_training",)),
    Bug("runtime tokens/s not divided by world size", "runtime/metrics.py",
        "self.plan.global_batch_tokens / self.world_size / step_time_s",
        "self.plan.global_batch_tokens / step_time_s",
        ("tests/test_seeded_runtime.py::test_step_metrics_against_hand_arithmetic",)),
    Bug("runtime loss not divided by grad accumulation", "runtime/train.py",
        "            loss = micro_loss(state, inputs, labels, positions) / accum\n",
        "            loss = micro_loss(state, inputs, labels, positions)\n",
        ("tests/test_grad_accum_equivalence.py",)),
    Bug("search batch cap ignores CP", "autoplan/search.py",
        "and batch * seq_len // par.cp > MAX_BATCHED_TOKENS_PER_GPU",
        "and batch * seq_len > MAX_BATCHED_TOKENS_PER_GPU",
        ("tests/test_planner_reference.py::test_search_space_holds_every_layout_the_rules_allow",
         "tests/test_seeded_cost.py::test_batch_cap_counts_tokens_per_gpu_after_cp")),
    Bug("AdamW temporaries 3x -> 1x", "cost_models/memory.py",
        "optimizer_temp_bytes=3 * prec.master_bytes", "optimizer_temp_bytes=1 * prec.master_bytes",
        ("tests/test_seeded_cost.py::test_adamw_temporaries_by_hand_and_measured",)),
)


def seed(bug: Bug, work: Path) -> None:
    target = work / bug.path
    text = target.read_text()
    count = text.count(bug.old)
    if count != 1:
        raise SystemExit(f"seeded_bugs: {bug.name!r}: the old text occurs {count} times in {bug.path} "
                         f"(expected exactly once); update the table:\n{bug.old}")
    target.write_text(text.replace(bug.old, bug.new))


def check(bug: Bug, timeout_s: float) -> tuple[str, str, float]:
    """(result, detail, seconds): result is caught, SURVIVED, TIMEOUT or ERROR."""
    with tempfile.TemporaryDirectory(prefix="autoplan-seeded-") as tmp:
        work = Path(tmp) / "tree"
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache",
                                                                   ".hypothesis", ".mypy_cache", ".ruff_cache"))
        seed(bug, work)
        env = dict(os.environ, PYTHONPATH=str(work), OMP_NUM_THREADS="1")
        began = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests],
                                  cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "TIMEOUT", f"no verdict within {timeout_s:.0f} s", time.perf_counter() - began
        seconds = time.perf_counter() - began
        failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in done.stdout.splitlines()
                  if line.startswith("FAILED ")]
        if done.returncode == 1 and failed:
            return "caught", ", ".join(failed), seconds
        if done.returncode == 0:
            return "SURVIVED", "all listed tests pass", seconds
        return "ERROR", f"pytest exit {done.returncode}: {done.stdout[-600:]}{done.stderr[-600:]}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="substring of a bug name (repeatable)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per bug")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or any(s in b.name for s in args.only)]
    print("bug | caught by | result", flush=True)
    bad = 0
    for bug in bugs:
        result, detail, seconds = check(bug, args.timeout)
        bad += result != "caught"
        print(f"{bug.name} | {detail} | {result} ({seconds:.0f} s)", flush=True)
    print(f"{len(bugs) - bad} of {len(bugs)} seeded bugs caught", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
