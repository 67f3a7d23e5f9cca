"""Errors that the CLI turns into one line on stderr and a documented exit code."""

from __future__ import annotations


class PfqError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class DataError(PfqError):
    """The dataset is missing or unreadable."""

    exit_code = 3


class ModelError(PfqError):
    """The model or its weights cannot be loaded, traced or transformed."""

    exit_code = 4


class ProfileError(PfqError):
    """A target profile is unknown or has invalid values."""

    exit_code = 5


class GoldenCheckError(PfqError):
    """A step's output disagrees with the previous step's beyond its tolerance (pfq_edge.golden.TOLERANCES)."""

    exit_code = 6


class ToolchainError(PfqError):
    """An external toolchain step (Brevitas export, qonnx, FINN) failed."""

    exit_code = 7


class OutputError(PfqError):
    """The output location cannot be written (exists without --force, not writable)."""

    exit_code = 8


class PackageError(PfqError):
    """A deployment package is unreadable, unsafe or does not match its manifest (``pfq-edge verify``)."""

    exit_code = 10


def one_line(exc: BaseException, limit: int = 240) -> str:
    """``exc``'s message on one line (whitespace and newlines collapsed, terminal colour codes removed), at most
    ``limit`` characters; the exception's type name if it has no message. Every one-line error is built with it."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))
    return text[:limit] if text else type(exc).__name__


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of ``exc``'s message (libraries that append a traceback or a long dump after it)."""
    text = str(exc).strip()
    return one_line(Exception(text.splitlines()[0]), limit) if text else type(exc).__name__
