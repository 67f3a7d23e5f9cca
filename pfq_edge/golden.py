"""Golden checks at stage boundaries: a stage's output against the previous stage's on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pfq_edge.errors import GoldenCheckError


@dataclass
class GoldenResult:
    """One stage compared with the previous one on the same ``images`` inputs (logits)."""

    stage: str
    images: int
    max_abs_diff: float
    argmax_agreement: float
    atol: float | None
    min_agreement: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def golden_check(stage: str, reference: np.ndarray, candidate: np.ndarray, atol: float,
                 min_agreement: float = 1.0) -> GoldenResult:
    """Compare logits (N, classes): passes when max |diff| ≤ ``atol`` (None: not checked) and top-1 agrees on at
    least ``min_agreement`` of the inputs.

    Raises GoldenCheckError (the command fails) if it does not pass; returns the result otherwise.
    """
    diff = float(np.abs(reference - candidate).max())
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
    passed = (atol is None or diff <= atol) and agree >= min_agreement
    result = GoldenResult(stage, int(len(reference)), diff, agree, atol, min_agreement, passed)
    if not passed:
        raise GoldenCheckError(f"golden check '{stage}' failed on {result.images} images: max abs diff {diff:.3g} "
                               f"(tolerance {atol}), top-1 agreement {agree:.2%} (required {min_agreement:.0%})")
    return result
