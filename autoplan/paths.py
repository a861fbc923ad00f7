"""Can we write there? Checked before work starts, so a bad output path is one line up
front rather than a traceback after the work (or a lost result)."""

from __future__ import annotations

import os
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(value: str | os.PathLike) -> str | None:
    """Why a folder cannot be created or written at ``value``, or None."""
    base = _nearest_existing(Path(value))
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"folder {base} is not writable"
    return None


def file_problem(value: str | os.PathLike) -> str | None:
    """Why a file cannot be created or appended at ``value``, or None."""
    path = Path(value)
    if path.is_dir():
        return "is a folder; give a file name"
    if path.exists():
        return None if os.access(path, os.W_OK) else "file is not writable"
    return folder_problem(path.absolute().parent)
