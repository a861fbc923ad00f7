"""Mutation testing as a standing habit: how many small, plausible bugs the suite catches.

    python benchmarks/mutation.py [--group cost_models|planner|runtime ...] [--jobs 2]

Runs mutmut (a kept library; ``pip install mutmut``) on a throw-away copy of the tree, one
group of modules at a time against the tests that cover them, and prints per group the
mutation score (killed / total) and every surviving mutant's name. ``mutmut show NAME``
in the printed work folder shows a survivor's diff. Not part of CI: a full run takes
tens of minutes on two cores.

A survivor is either a missing test (write one that fails on it) or an equivalent mutant
(a change no input can observe, e.g. ``max(a, 0.0)`` -> ``max(a, 1e-300)`` on positive
values); the closing note of the work that ran this lists which is which.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GROUPS = {
    # The FLOP and collective formulas with their fast hand-derived tests: a group small
    # enough to run in ~20 minutes on two cores (the whole cost_models group runs every
    # memory and published-run test per mutant: hours).
    "cost_core": {
        "sources": ["cost_models/flops.py", "cost_models/comm.py"],
        "tests": ["tests/test_cost_models.py", "tests/test_comm.py", "tests/test_seeded_cost.py",
                  "tests/test_step_time.py", "tests/test_flops_comm_by_hand.py"],
    },
    "cost_models": {
        "sources": ["cost_models/"],
        "tests": ["tests/test_cost_models.py", "tests/test_cost_properties.py", "tests/test_memory_phases.py",
                  "tests/test_step_time.py", "tests/test_comm.py", "tests/test_published_runs.py",
                  "tests/test_memory_model.py", "tests/test_memory_ring.py", "tests/test_torchtitan_profile.py",
                  "tests/test_planner_reference.py", "tests/test_ilp_memory.py",
                  "tests/test_seeded_cost.py", "tests/test_memory_allocator.py", "tests/test_hf_config.py"],
    },
    "planner": {
        "sources": ["autoplan/search.py", "autoplan/ilp.py", "autoplan/ilp_memory.py", "autoplan/planner.py", "autoplan/fix.py",
                    "autoplan/units.py", "autoplan/longest.py", "cost_models/rules.py"],
        "tests": ["tests/test_planner_bruteforce.py", "tests/test_planner_reference.py", "tests/test_ilp_memory.py",
                  "tests/test_fix.py", "tests/test_units.py", "tests/test_cli.py", "tests/test_alternatives.py",
                  "tests/test_ilp_objective_accum.py", "tests/test_ilp_memory_binding.py", "tests/test_longest.py",
                  "tests/test_cli_conflicts.py"],
    },
    "runtime": {
        "sources": ["runtime/context_parallel.py", "runtime/metrics.py", "runtime/data.py"],
        "tests": ["tests/test_runtime_units.py", "tests/test_seeded_runtime.py", "tests/test_runtime_inputs.py",
                  "tests/test_runtime_data.py"],
    },
}


def _copy_tree(work: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def run_group(name: str, jobs: int) -> tuple[int, int, list[str], Path]:
    group = GROUPS[name]
    work = Path(tempfile.mkdtemp(prefix=f"autoplan-mutation-{name}-"))
    _copy_tree(work)
    tests = [t for t in group["tests"] if (work / t).exists()]
    config = ("\n[tool.mutmut]\n"
              f"source_paths = {group['sources']!r}\n"
              f"pytest_add_cli_args_test_selection = {tests!r}\n"
              "pytest_add_cli_args = ['-p', 'no:cacheprovider', '-q', '-x']\n"
              "also_copy = ['autoplan', 'cost_models', 'runtime', 'tests', 'examples', 'benchmarks']\n")
    with open(work / "pyproject.toml", "a") as out:
        out.write(config.replace("'", '"'))
    began = time.perf_counter()
    log = work / "mutmut-run.log"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)], cwd=work,
                       stdout=out, stderr=subprocess.STDOUT)
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True).stdout
    statuses = dict(re.findall(r"^\s*(\S+): (\S.*)$", results, flags=re.M))
    total = len(statuses)
    if statuses and all(s == "not checked" for s in statuses.values()):
        tail = log.read_text(errors="replace")[-600:]
        print(f"{name}: mutmut checked none of {total} mutants; see {log}:\n{tail}", flush=True)
    killed = sum(1 for s in statuses.values() if s in ("killed", "timeout"))
    survivors = sorted(m for m, s in statuses.items() if s == "survived")
    print(f"{name}: {killed} killed of {total} mutants ({killed / max(total, 1):.0%}), "
          f"{len(survivors)} survived, {time.perf_counter() - began:.0f} s; work folder {work}", flush=True)
    return killed, total, survivors, work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", choices=list(GROUPS), help="default: every group")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("mutmut") is None and subprocess.run([sys.executable, "-m", "mutmut", "--help"],
                                                         capture_output=True).returncode != 0:
        print("mutation testing needs mutmut: pip install mutmut", file=sys.stderr)
        return 2
    for name in args.group or list(GROUPS):
        _, _, survivors, _ = run_group(name, args.jobs)
        for mutant in survivors:
            print(f"  survived {mutant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
