"""Atomic file and directory writes: readers never see a half-written output."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pfq_edge.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def redirect_fd(fd: int, to_fd: int):
    """Point file descriptor ``fd`` (1 stdout, 2 stderr) at ``to_fd`` for the ``with`` block, then restore it —
    for native libraries that write to the descriptor directly, past Python's sys.stdout / sys.stderr."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(fd)
    os.dup2(to_fd, fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the file should look like any other new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# files that mark a folder as a pfq-edge output: one target, a stopped compile (--to-step), several targets
OUTPUT_MARKERS = ("report.json", "steps/state.json", "summary.json")


@contextmanager
def staged_dir(out: Path, force: bool = False):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename, on error it is removed.

    Raises OutputError if ``out`` exists and ``force`` is False, or if its parent cannot be written.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is a file")
    if out.exists() and not force:
        raise OutputError(f"output directory {out} exists; pass --force to replace it")
    if out.exists() and Path.cwd().resolve().is_relative_to(out):
        raise OutputError(f"refusing to replace {out}: it holds the current directory")
    if out.exists() and any(out.iterdir()) and not any((out / m).exists() for m in OUTPUT_MARKERS):
        raise OutputError(f"refusing to replace {out}: it is not empty and not a pfq-edge output folder "
                          f"(no report.json)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.*.partial"):  # left by a killed run (SIGKILL skips clean-up)
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror}") from None
    try:
        yield stage
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result should look like any new folder
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def import_user_module(name: str):
    """importlib.import_module(name) with the working directory on sys.path, as ``python -m`` has it: a user's
    ``mymodels:net`` next to where they run pfq-edge imports without PYTHONPATH."""
    import importlib
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(name)
