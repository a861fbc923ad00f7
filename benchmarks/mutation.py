"""Mutation testing as a standing habit: how many small, plausible bugs the suite catches.

    python benchmarks/mutation.py [--group runtime|memory_core|rules_units|search|... (see GROUPS)] [--jobs 1]
    python benchmarks/mutation.py --rerun-survivors /tmp/autoplan-mutation-GROUP-XXXX
    python benchmarks/mutation.py --recheck-timeouts /tmp/autoplan-mutation-GROUP-XXXX [--limit-s 120]
    python benchmarks/mutation.py --group GROUP --only 'module.x_function*'   # functions changed since a run
    python benchmarks/mutation.py --group GROUP --sample 100 [--seed 0]      # a uniform sample of its mutants
    python benchmarks/mutation.py --finish /tmp/autoplan-mutation-GROUP-XXXX  # verdicts for the rest of a run

Runs mutmut (a kept library; ``pip install mutmut``) on a throw-away copy of the tree, one
group of modules at a time against the tests that cover them, and prints per group the
mutation score (killed / total) and every surviving mutant's name. ``mutmut show NAME``
in the printed work folder shows a survivor's diff. Not part of CI: each fast group takes
about 20 minutes with one worker; the whole-package groups (cost_models, planner) hours.
benchmarks/mutation_results.md records the last scores and what each survivor is.

A survivor is either a missing test (write one that fails on it) or an equivalent mutant
(a change no input can observe, e.g. ``max(a, 0.0)`` -> ``max(a, 1e-300)`` on positive
values); the closing note of the work that ran this lists which is which.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each group pairs a few modules with the FAST tests that exercise them (mutmut 3 runs,
# per mutant, only the listed tests that cover the mutated function), so one group runs in
# about 20 minutes with one worker. `cost_models` and `planner` are the old whole-package
# groups: their lists include slow brute-force and published-run tests (hours).
_UNITS = "tests/test_runtime_units.py::"
_SLOW_HF = "tests/test_hf_config.py::test_qkv_biases_train_under_tensor_parallel_like_one_process"  # 10 s, torch
GROUPS = {
    # The FLOP and collective formulas with their fast hand-derived tests.
    "cost_core": {
        "sources": ["cost_models/flops.py", "cost_models/comm.py"],
        "tests": ["tests/test_cost_models.py", "tests/test_comm.py", "tests/test_seeded_cost.py",
                  "tests/test_step_time.py", "tests/test_flops_comm_by_hand.py"],
    },
    # Activation, allocator and kernel memory with the phase walk it is checked against.
    "memory_core": {
        "sources": ["cost_models/activations.py", "cost_models/allocator.py", "cost_models/memory.py",
                    "cost_models/phases.py", "cost_models/kernels.py"],
        "tests": ["tests/test_memory_phases.py", "tests/test_memory_ring.py", "tests/test_memory_allocator.py",
                  "tests/test_cost_models.py", "tests/test_seeded_cost.py", "tests/test_cost_properties.py",
                  "tests/test_torchtitan_profile.py", "tests/test_ilp_memory.py", "tests/test_ilp_memory_binding.py",
                  "tests/test_step_time.py", "tests/test_memory_by_hand.py"],
    },
    # The phase walk's closed form and the ILP's memory constraints that follow it (where a
    # block sits: held reduce-scatter input, block 0's prefetch), checked split by split.
    "phases_ilp": {
        "sources": ["cost_models/phases.py", "autoplan/ilp_memory.py"],
        "tests": ["tests/test_ilp_memory.py", "tests/test_ilp_memory_binding.py", "tests/test_memory_by_hand.py",
                  "tests/test_memory_phases.py"],
    },
    # Step time, executor profiles, hardware/model specs.
    "step_core": {
        "sources": ["cost_models/step.py", "cost_models/executors.py", "cost_models/specs.py",
                    "cost_models/models.py"],
        "tests": ["tests/test_cost_models.py", "tests/test_step_time.py", "tests/test_seeded_cost.py",
                  "tests/test_cost_properties.py", "tests/test_flops_comm_by_hand.py", "tests/test_memory_phases.py",
                  "tests/test_hf_config.py", "tests/test_step_by_hand.py", "tests/test_pipeline_stage_terms.py",
                  "--deselect", _SLOW_HF],
    },
    # Layout rules, --fix suggestions and unit parsing (split from the search: one group of
    # 1,300 mutants ran each through the search's brute-force tests, over an hour).
    "rules_units": {
        "sources": ["cost_models/rules.py", "autoplan/fix.py", "autoplan/units.py"],
        "tests": ["tests/test_units.py", "tests/test_fix.py", "tests/test_rules_search_by_hand.py",
                  "tests/test_seeded_cost.py", "tests/test_cli_conflicts.py"],
    },
    # The layout search (degrees, seq grid, batches, pins, pipeline candidates).
    "search": {
        "sources": ["autoplan/search.py"],
        "tests": ["tests/test_rules_search_by_hand.py", "tests/test_infeasible_advice.py",
                  "tests/test_planner_bruteforce.py", "tests/test_alternatives.py", "tests/test_seeded_cost.py",
                  "tests/test_ilp_memory.py", "tests/test_planner_pipeline.py"],
    },
    # What a step is asked to do (validation) and the pipeline's cost model.
    "config_pipeline": {
        "sources": ["cost_models/config.py", "cost_models/pipeline.py"],
        "tests": ["tests/test_pipeline_stage_terms.py", "tests/test_pipeline_cost.py", "tests/test_planner_pipeline.py",
                  "tests/test_capacity_pipelines.py",
                  "tests/test_cost_models.py", "tests/test_step_by_hand.py", "tests/test_rules_search_by_hand.py",
                  "tests/test_memory_by_hand.py"],
    },
    # The ILP, the planner around it and the longest-context search, against their
    # brute-force and independent references.
    "planner_core": {
        "sources": ["autoplan/ilp.py", "autoplan/planner.py", "autoplan/longest.py"],
        "tests": ["tests/test_infeasible_advice.py", "tests/test_planner_bruteforce.py",
                  "tests/test_alternatives.py", "tests/test_ilp_objective_accum.py", "tests/test_longest.py",
                  "tests/test_planner_pipeline.py", "tests/test_ilp_memory_binding.py", "tests/test_cli.py",
                  "tests/test_capacity_pipelines.py", "tests/test_planner_reference.py"],
    },
    # The runtime's pure pieces, in process (the torchrun tests import the tree they run
    # in, not mutmut's copy, and take seconds each).
    "runtime": {
        "sources": ["runtime/context_parallel.py", "runtime/metrics.py", "runtime/data.py"],
        "tests": ["tests/test_runtime_metrics_by_hand.py", "tests/test_context_parallel_by_hand.py",
                  "tests/test_runtime_data.py", "tests/test_seeded_runtime.py",
                  _UNITS + "test_portable_cp_attention_is_exact_in_fp64",
                  _UNITS + "test_gathered_chunks_reorder_to_the_sequence",
                  _UNITS + "test_token_file_and_too_short_file"],
    },
    "cost_models": {
        "sources": ["cost_models/"],
        "tests": ["tests/test_cost_models.py", "tests/test_cost_properties.py", "tests/test_memory_phases.py",
                  "tests/test_step_time.py", "tests/test_comm.py", "tests/test_published_runs.py",
                  "tests/test_memory_ring.py", "tests/test_torchtitan_profile.py",
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
}
FAST_GROUPS = ["runtime", "memory_core", "rules_units", "search", "step_core", "cost_core", "phases_ilp",
               "config_pipeline", "planner_core"]


def _copy_tree(work: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def _group_tests(name: str, tree: Path) -> list[str]:
    """A group's test files (or node ids, file::test) that exist in ``tree``, and its pytest options."""
    return [t for t in GROUPS[name]["tests"] if t.startswith("-") or (tree / t.split("::")[0]).exists()]


def _pytest(work: Path, tests: list[str], mutant: str, timeout_s: float) -> subprocess.CompletedProcess:
    """One pytest run of ``tests`` in the mutated tree with ``mutant`` active ("" for none)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=work / "mutants", env=dict(os.environ, MUTANT_UNDER_TEST=mutant), capture_output=True,
                          text=True, timeout=timeout_s)


def _configure(work: Path, name: str) -> None:
    group = GROUPS[name]
    tests = _group_tests(name, work)
    config = ("\n[tool.mutmut]\n"
              f"source_paths = {group['sources']!r}\n"
              f"pytest_add_cli_args_test_selection = {tests!r}\n"
              "pytest_add_cli_args = ['-p', 'no:cacheprovider', '-q', '-x']\n"
              # CPU-time limit per mutant: (tests' time + 1 s) x 2 x this, and mutmut 3.8 stops
              # a mutant at half that in wall-clock time. mutmut's default 15 spends minutes on
              # each mutant that loops forever (e.g. in prime_factors); at 5 on two busy cores
              # (two runs side by side) over half of some groups' mutants "timed out" whose
              # tests pass or fail within seconds. `--recheck-timeouts` settles them.
              "timeout_multiplier = 10.0\n"
              "also_copy = ['autoplan', 'cost_models', 'runtime', 'tests', 'examples', 'benchmarks']\n")
    with open(work / "pyproject.toml", "a") as out:
        out.write(config.replace("'", '"'))


def _mutmut_run(work: Path, jobs: int, only: list[str] | None = None) -> Path:
    log = work / "mutmut-run.log"
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *(only or [])],
                       cwd=work, stdout=out, stderr=subprocess.STDOUT)
    return log


def _statuses(work: Path) -> dict[str, str]:
    """mutmut's status of each mutant, overridden by the verdicts of ``recheck``."""
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True).stdout
    statuses = dict(re.findall(r"^\s*(\S+): (\S.*)$", results, flags=re.M))
    verdicts_file = work / "rechecked.json"
    if verdicts_file.exists():
        statuses.update(json.loads(verdicts_file.read_text()))
    sample_file = work / "sample.json"
    if sample_file.exists():  # a sampled run: its sample is the whole population scored
        sample = set(json.loads(sample_file.read_text()))
        statuses = {m: s for m, s in statuses.items() if m in sample}
    return statuses


def _report(name: str, work: Path, log: Path, began: float, only: list[str] | None = None
            ) -> tuple[int, int, list[str], Path]:
    statuses = _statuses(work)
    if only:  # a run of some functions' mutants: score those
        statuses = {m: s for m, s in statuses.items() if any(fnmatch.fnmatch(m, pattern) for pattern in only)}
    total = len(statuses)
    if statuses and all(s == "not checked" for s in statuses.values()):
        tail = log.read_text(errors="replace")[-600:]
        print(f"{name}: mutmut checked none of {total} mutants; see {log}:\n{tail}", flush=True)
    # A mutant that crashes the test process (mutmut's "suspicious": a signal such as the
    # SIGFPE of the CPU flash kernel on an out-of-range slice, or "segfault") is caught.
    crashed = sum(1 for s in statuses.values() if s in ("suspicious", "segfault"))
    killed = crashed + sum(1 for s in statuses.values() if s in ("killed", "timeout"))
    survivors = sorted(m for m, s in statuses.items() if s == "survived")
    untested = sum(1 for s in statuses.values() if s == "no tests")
    print(f"{name}: {killed} killed of {total} mutants ({killed / max(total, 1):.0%}; {crashed} of them by a crash), "
          f"{len(survivors)} survived, {untested} not covered by any listed test, "
          f"{time.perf_counter() - began:.0f} s; work folder {work}", flush=True)
    return killed, total, survivors, work


def run_group(name: str, jobs: int, only: list[str] | None = None, sample: int | None = None,
              seed: int = 0, limit_s: float = 120.0) -> tuple[int, int, list[str], Path]:
    """Mutate a group's sources and run its tests on each mutant (``only``: the mutants whose
    names match these fnmatch patterns, e.g. the functions changed since a full run;
    ``sample``: that many mutants drawn uniformly, seeded, when all would take hours)."""
    work = Path(tempfile.mkdtemp(prefix=f"autoplan-mutation-{name}-"))
    _copy_tree(work)
    _configure(work, name)
    began = time.perf_counter()
    if sample is not None:
        # mutmut generates every mutant and maps tests before it filters by name: a name
        # that matches nothing stops it right there, with every mutant listed. The drawn
        # mutants then run one pytest each (``recheck``): on two busy cores mutmut's
        # forked runs "time out" by the dozen, each after minutes, on the planner's tests.
        _mutmut_run(work, jobs, ["autoplan-no-such-mutant"])
        names = sorted(_statuses(work))
        drawn = sorted(random.Random(seed).sample(names, min(sample, len(names))))
        (work / "sample.json").write_text(json.dumps(drawn, indent=1))
        print(f"{name}: drew {len(drawn)} of {len(names)} mutants (seed {seed})", flush=True)
        return recheck(work, ("not checked", "no tests"), limit_s, jobs)
    return _report(name, work, _mutmut_run(work, jobs, only), began, only)


def _copy_tests(work: Path) -> None:
    """This tree's current tests into a run's work folder (and the mutated copy under it)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "tests"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for test in files:
        for target in (work / test, work / "mutants" / test):
            if target.parent.exists():
                shutil.copy2(ROOT / test, target)


def recheck(work: Path, which: tuple[str, ...], limit_s: float, jobs: int = 1, resume: bool = False
            ) -> tuple[int, int, list[str], Path]:
    """Run each mutant of a run whose status is in ``which`` ("not checked", "survived",
    "no tests", "timeout") alone against this tree's current tests (the group's whole list)
    under a wall-clock limit of ``limit_s`` (at least 3x the unmutated run). A mutant whose
    tests pass is a survivor; one that fails a test or runs out the limit is caught.
    Verdicts are kept in the work folder's rechecked.json; the other mutants keep mutmut's
    results.

    Why not ``mutmut run NAMES``: mutmut runs, per mutant, only the tests its clean run
    saw calling the function, so new parametrized cases and test modules that plan at
    import (collection) are never selected; and its CPU-time limit marks as "timeout"
    mutants whose tests pass, only slower than the clean run (caches are emptied per test).
    The sources must be the ones that run mutated."""
    name = next((g for g in GROUPS if work.name.startswith(f"autoplan-mutation-{g}-")), work.name)
    began = time.perf_counter()
    _copy_tests(work)
    tests = _group_tests(name, work / "mutants")
    clean_began = time.perf_counter()
    clean = _pytest(work, tests, "", 10 * limit_s)
    # A mutant stopped at the limit counts as caught (it loops): give a slow survivor room.
    limit_s = max(limit_s, 3 * (time.perf_counter() - clean_began))
    if clean.returncode != 0:  # every mutant would look caught
        tail = "\n".join(clean.stdout.splitlines()[-5:])
        raise SystemExit(f"{work}: the current tests fail on its unmutated sources (the code changed since that "
                         f"run; start a fresh one, --only the changed functions):\n{tail}")
    verdicts_file = work / "rechecked.json"
    verdicts = json.loads(verdicts_file.read_text()) if verdicts_file.exists() else {}
    targets = sorted(m for m, s in _statuses(work).items() if s in which)
    if resume:  # an interrupted --finish: keep the verdicts it reached
        targets = [m for m in targets if m not in verdicts]
    lock = threading.Lock()

    def check(mutant: str) -> None:
        try:
            passed = _pytest(work, tests, mutant, limit_s).returncode == 0
        except subprocess.TimeoutExpired:
            passed = False
        with lock:
            verdicts[mutant] = "survived" if passed else "killed"
            verdicts_file.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
            print(f"  {mutant}: {verdicts[mutant]}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(check, targets))
    print(f"re-checked {len(targets)} mutants that were {' or '.join(which)}", flush=True)
    return _report(name, work, work / "mutmut-run.log", began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", choices=list(GROUPS),
                        help=f"default: the fast groups ({', '.join(FAST_GROUPS)})")
    parser.add_argument("--jobs", type=int, default=1, help="mutmut workers (default 1)")
    parser.add_argument("--rerun-survivors", metavar="WORK", type=Path,
                        help="run each survivor of a finished run (its work folder) again against the current tests")
    parser.add_argument("--recheck-timeouts", metavar="WORK", type=Path,
                        help="run each timed-out mutant of a finished run again, alone, under a wall-clock limit")
    parser.add_argument("--finish", metavar="WORK", type=Path,
                        help="give every mutant of a run (of its sample) that mutmut has not killed a verdict "
                             "of its own (one pytest per mutant)")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="with --group: only the mutants matching this fnmatch pattern (repeatable), e.g. "
                             "'autoplan.planner.x__infeasible*'")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="with --group: score N mutants drawn uniformly (seeded) instead of all of them")
    parser.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    parser.add_argument("--limit-s", type=float, default=120.0, help="wall-clock limit per re-checked mutant (s, default 120)")
    args = parser.parse_args()
    if shutil.which("mutmut") is None and subprocess.run([sys.executable, "-m", "mutmut", "--help"],
                                                         capture_output=True).returncode != 0:
        print("mutation testing needs mutmut: pip install mutmut", file=sys.stderr)
        return 2
    if args.finish:
        runs = [lambda: recheck(args.finish, ("not checked", "timeout", "survived", "no tests"), args.limit_s,
                                args.jobs, resume=True)]
    elif args.recheck_timeouts:
        runs = [lambda: recheck(args.recheck_timeouts, ("timeout",), args.limit_s, args.jobs)]
    elif args.rerun_survivors:
        runs = [lambda: recheck(args.rerun_survivors, ("survived", "no tests"), args.limit_s, args.jobs)]
    else:
        runs = [lambda name=name: run_group(name, args.jobs, args.only, args.sample, args.seed, args.limit_s) for name in args.group or FAST_GROUPS]
    for run in runs:
        _, _, survivors, _ = run()
        for mutant in survivors:
            print(f"  survived {mutant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
