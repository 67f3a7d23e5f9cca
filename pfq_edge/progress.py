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
    """Yield ``advance(n)``; shows a rich progress bar on stderr when it is a terminal, else progress lines — also
    while nothing advances (one long step), so a log never goes silent. The stream is the stderr of the moment the
    bar starts: work that redirects stderr inside (FINN's log) does not swallow it."""
    if os.environ.get("PFQ_EDGE_QUIET"):
        yield lambda n=1: None
        return
    stream = sys.stderr
    if not stream.isatty():
        with _lines(description, total, stream) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(file=stream), transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


@contextmanager
def _lines(description: str, total: int | None, stream):
    import threading

    start = time.monotonic()
    done, shown, last = [0], [0], [start]
    lock, stop = threading.Lock(), threading.Event()

    def line() -> None:
        with lock:
            of = f"/{total} ({done[0] / total:.0%})" if total else ""
            print(f"{description}: {done[0]}{of}, {time.monotonic() - start:.0f} s", file=stream, flush=True)
            shown[0], last[0] = done[0], time.monotonic()

    def advance(n: int = 1) -> None:
        done[0] += n
        if time.monotonic() - last[0] >= LINE_EVERY_S:
            line()

    def heartbeat() -> None:  # a step that takes minutes between two advances still shows it is alive
        while not stop.wait(LINE_EVERY_S):
            if time.monotonic() - last[0] >= LINE_EVERY_S:
                line()

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        yield advance
    finally:
        stop.set()
        beat.join()
    if time.monotonic() - start >= LINE_EVERY_S and shown[0] != done[0]:  # short work stays silent
        line()
