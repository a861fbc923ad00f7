"""Progress for the long commands (validate, check, large sweeps and capacity searches):
a tqdm bar or a status line on stderr when stderr is a terminal, nothing when it is not
(logs, pipes, CI) or with ``--quiet``. Results still go to stdout only."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def wanted(quiet: bool = False) -> bool:
    """Show progress: not asked to be quiet, and a person is watching stderr."""
    return not quiet and sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None = None, description: str = "",
             enabled: bool | None = None) -> Iterator[T]:
    """``items``, with a bar on stderr while they are consumed (``enabled`` None: a terminal)."""
    from tqdm import tqdm

    show = wanted() if enabled is None else enabled
    yield from tqdm(items, total=total, desc=description, disable=not show, file=sys.stderr, leave=False,
                    dynamic_ncols=True)


def status(message: str, enabled: bool | None = None) -> None:
    """One line on stderr saying what is running and about how long it takes."""
    if wanted() if enabled is None else enabled:
        print(message, file=sys.stderr, flush=True)
