"""Progress on stderr: a rich bar on a terminal, plain lines in logs and pipes (at most one per LINE_EVERY_S and one
at the end, so a CI log shows a long step moving); nothing when PFQ_EDGE_QUIET is set."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

LINE_EVERY_S = 30.0


def enabled() -> bool:
    """True when stderr is a terminal and PFQ_EDGE_QUIET is unset."""
    return sys.stderr.isatty() and not os.environ.get("PFQ_EDGE_QUIET")


@contextmanager
def progress_bar(description: str, total: int | None):
    """Yield ``advance(n)``; shows a rich progress bar on stderr when it is a terminal, else progress lines."""
    if os.environ.get("PFQ_EDGE_QUIET"):
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        with _lines(description, total) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


@contextmanager
def _lines(description: str, total: int | None):
    start = last = time.monotonic()
    done, shown = [0], [0]

    def line() -> None:
        of = f"/{total} ({done[0] / total:.0%})" if total else ""
        print(f"{description}: {done[0]}{of}, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        shown[0] = done[0]

    def advance(n: int = 1) -> None:
        nonlocal last
        done[0] += n
        if time.monotonic() - last >= LINE_EVERY_S:
            last = time.monotonic()
            line()

    yield advance
    if time.monotonic() - start >= LINE_EVERY_S and shown[0] != done[0]:  # short work stays silent
        line()
