"""Test-wide settings: one thread per process (CI has two cores; gloo tests spawn many)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
