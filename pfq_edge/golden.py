"""Golden checks at stage boundaries: a stage's output against the previous stage's on the same inputs.

Quantized networks make exact equality the wrong test between two runtimes: float32 sums in a different order put
a value on the other side of a rounding boundary now and then, the activation moves by one quantization step and
that step propagates to the logits. So a check bounds three things: top-1 agreement, the share of images whose
logits differ by more than ``atol`` (such one-step flips), and — when every image must match — the max |Δ|.
"""

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
    mismatched_images: int        # images with max |Δlogit| > atol
    atol: float | None
    min_agreement: float
    max_mismatch_fraction: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def golden_check(stage: str, reference: np.ndarray, candidate: np.ndarray, atol: float | None,
                 min_agreement: float = 1.0, max_mismatch_fraction: float = 0.0,
                 raise_on_fail: bool = True) -> GoldenResult:
    """Compare logits (N, classes) of two stages on the same N inputs.

    Passes when top-1 agrees on ≥ ``min_agreement`` of the inputs and, if ``atol`` is set, at most
    ``max_mismatch_fraction`` of the inputs have max |Δ| > ``atol``. Raises GoldenCheckError (the command fails)
    otherwise, unless ``raise_on_fail`` is False (a measurement only); returns the measured result.
    """
    per_image = np.abs(reference - candidate).reshape(len(reference), -1).max(1)
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
    mismatched = int((per_image > atol).sum()) if atol is not None else 0
    passed = agree >= min_agreement and mismatched <= max_mismatch_fraction * len(reference)
    result = GoldenResult(stage, int(len(reference)), float(per_image.max()), agree, mismatched, atol, min_agreement,
                          max_mismatch_fraction, passed)
    if not passed and raise_on_fail:
        flips = (f"{mismatched} images differ by more than {atol} (allowed {max_mismatch_fraction:.0%}), "
                 if atol is not None else "")
        raise GoldenCheckError(
            f"golden check '{stage}' failed on {result.images} images: top-1 agreement {agree:.2%} (required "
            f"{min_agreement:.0%}), {flips}max abs diff {result.max_abs_diff:.3g}")
    return result
