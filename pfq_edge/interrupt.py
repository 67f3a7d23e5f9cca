"""Ctrl-C / SIGTERM that libraries cannot swallow.

Some of the tools a compile runs catch every exception, KeyboardInterrupt included: FINN's build_dataflow turns it
into a failed build, and a torch.onnx export failure makes us fall back to the other exporter. The handler records
the signal before raising KeyboardInterrupt, and ``check`` (called between and after stages) raises it again.
"""

from __future__ import annotations

import signal

_received: int | None = None


def _handler(signum, frame):
    global _received
    _received = signum
    raise KeyboardInterrupt


def install() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt and are remembered (main thread only)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raise KeyboardInterrupt if a signal came in, even if the code it interrupted swallowed it."""
    if _received is not None:
        raise KeyboardInterrupt
