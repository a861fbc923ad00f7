"""Test-wide settings: one thread per process (CI has two cores; gloo tests spawn many),
and hypothesis derandomized (seeded from each test's name) so a CI failure reproduces."""

import os

from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")

settings.register_profile("autoplan", max_examples=60, deadline=None, derandomize=True, database=None)
settings.load_profile("autoplan")
