"""Test-wide settings: one thread per process (CI has two cores; gloo tests spawn many),
hypothesis derandomized (seeded from each test's name) so a CI failure reproduces, and
fresh caches per test under mutation testing."""

import os
import sys

import pytest
from hypothesis import Phase, settings

os.environ.setdefault("OMP_NUM_THREADS", "1")

settings.register_profile("autoplan", max_examples=60, deadline=None, derandomize=True, database=None)
# Under mutmut a failing property test only has to fail: shrinking its example would run
# into the mutant's CPU-time limit (counted as caught either way, but minutes later).
settings.register_profile("mutation", parent=settings.get_profile("autoplan"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("mutation" if os.environ.get("MUTANT_UNDER_TEST") else "autoplan")


@pytest.fixture(autouse=True)
def _fresh_caches_under_mutation_testing():
    """Under mutmut (benchmarks/mutation.py) each mutant's tests run in a process forked
    from one whose lru_caches the unmutated code already filled: a mutant under a cached
    function (the loss allocator simulation, GEMM efficiencies, ...) would never run. Empty
    every cache of the project's modules before each test there; a plain run keeps them."""
    if os.environ.get("MUTANT_UNDER_TEST"):
        for name, module in list(sys.modules.items()):
            if module is not None and name.split(".")[0] in ("cost_models", "autoplan", "runtime"):
                for value in list(vars(module).values()):
                    if callable(getattr(value, "cache_clear", None)):
                        value.cache_clear()
    yield
