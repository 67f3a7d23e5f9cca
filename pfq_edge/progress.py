"""Progress bars (rich) that switch off when output is not a terminal or PFQ_EDGE_QUIET is set."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def enabled() -> bool:
    """True when stderr is a terminal and PFQ_EDGE_QUIET is unset."""
    return sys.stderr.isatty() and not os.environ.get("PFQ_EDGE_QUIET")


@contextmanager
def progress_bar(description: str, total: int | None):
    """Yield ``advance(n)``; shows a rich progress bar on stderr when it is a terminal."""
    if not enabled():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
