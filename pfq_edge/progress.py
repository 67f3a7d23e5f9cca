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
def progress_bar(description: str, total: int | None, unit: str = ""):
    """Yield ``advance(n, now=None, total=None)``; ``now`` names what runs from then on (e.g. FINN's step), shown after
    the count, which ``unit`` follows ("FINN estimate build: 3/12 FINN steps (25%), 120 s — step_streamline");
    ``total`` sets the total once it is known. Shows a rich progress bar on stderr when it is a terminal, else progress lines — also
    while nothing advances (one long step), so a log never goes silent. The stream is the stderr of the moment the
    bar starts: work that redirects stderr inside (FINN's log) does not swallow it."""
    if os.environ.get("PFQ_EDGE_QUIET"):
        yield lambda n=1, now=None, total=None: None
        return
    stream = sys.stderr
    if not stream.isatty():
        with _lines(description, total, stream, unit) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(file=stream), transient=False) as prog:
        task = prog.add_task(description, total=total)

        def advance(n: int = 1, now: str | None = None, total: int | None = None) -> None:
            prog.update(task, advance=n, **({"description": f"{description} — {now}"} if now else {}),
                        **({"total": total} if total else {}))

        yield advance


@contextmanager
def _lines(description: str, total: int | None, stream, unit: str = ""):
    import threading

    start = time.monotonic()
    done, shown, last, current, of_total = [0], [0], [start], [None], [total]
    lock, stop = threading.Lock(), threading.Event()

    def line() -> None:
        with lock:
            total = of_total[0]
            of = f"/{total}" if total else ""
            share = f" ({done[0] / total:.0%})" if total else ""
            now = f" — {current[0]}" if current[0] else ""
            print(f"{description}: {done[0]}{of}{' ' + unit if unit else ''}{share}, {time.monotonic() - start:.0f} s"
                  f"{now}", file=stream, flush=True)
            shown[0], last[0] = done[0], time.monotonic()

    def advance(n: int = 1, now: str | None = None, total: int | None = None) -> None:
        done[0] += n
        if now:
            current[0] = now
        if total:
            of_total[0] = total
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
