"""torchtitan's own files, from its PyPI wheels, for the tests that trace torchtitan's
policies and model (tests/test_torchtitan_profile.py).

torchtitan does not install on this torch (design.md), so the wheel is downloaded with
``pip download --no-deps`` (PyPI is reachable from every machine of this project, CI
included) and unzipped into a cache folder once. ``TORCHTITAN01_SRC`` /
``TORCHTITAN_SRC`` point at an already unzipped wheel instead.

Without the files a test skips on a developer's machine and fails under CI (``CI=true``),
as the shellcheck test does: CI must not go green with these checks silently skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ENV_VARS = {"0.1.0": "TORCHTITAN01_SRC", "0.3.0": "TORCHTITAN_SRC"}
CACHE = Path(os.environ.get("AUTOPLAN_TEST_CACHE", Path.home() / ".cache" / "autoplan-tests"))
_failed: dict[str, str] = {}


def torchtitan_source(version: str) -> Path | None:
    """The folder holding the unzipped wheel (its ``torchtitan/`` package), or None."""
    override = os.environ.get(ENV_VARS[version])
    if override:
        return Path(override)
    target = CACHE / f"torchtitan-{version}"
    if (target / "torchtitan").is_dir():
        return target
    if version in _failed:
        return None
    with tempfile.TemporaryDirectory() as download:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"torchtitan=={version}",
                            "-d", download], check=True, capture_output=True, timeout=180)
            wheel = next(Path(download).glob("torchtitan-*.whl"))
            partial = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(partial)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.rename(target)
        except (subprocess.SubprocessError, StopIteration, OSError, zipfile.BadZipFile) as error:
            _failed[version] = f"{type(error).__name__}: {error}"
            return None
    return target


def missing(version: str) -> None:
    """Skip (developer machine) or fail (CI) a test whose torchtitan files are missing."""
    why = (f"torchtitan {version} wheel not available ({_failed.get(version, 'not found')}); "
           f"set {ENV_VARS[version]} to an unzipped wheel")
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)
