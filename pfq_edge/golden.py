"""Golden checks at step boundaries: a step's output against the previous step's on the same inputs.

Quantized networks make exact equality the wrong test between two runtimes: float32 sums in a different order put
a value on the other side of a rounding boundary now and then, the activation moves by one quantization step and
that step propagates to the logits. So a check bounds three things: top-1 agreement, the share of images whose
logits differ by more than ``atol`` (such one-step flips), and — when every image must match — the max |Δ|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pfq_edge.errors import GoldenCheckError


@dataclass(frozen=True)
class Tolerance:
    """What one golden check allows (see ``golden_check``); ``raises``: False for a measurement only."""

    atol: float | None
    min_agreement: float
    max_mismatch_fraction: float = 0.0
    raises: bool = True


# Every golden check of a compile, by name; each step declares the names it runs (pfq_edge/steps.py, backends).
TOLERANCES = {
    # PfQ removal that no constant meets zero padding in: identical up to float rounding (~1e-6)
    "prune exact": Tolerance(atol=1e-4, min_agreement=1.0),
    # removal that is exact in the interior only (zero-padded borders differ)
    "prune approximate": Tolerance(atol=None, min_agreement=0.99),
    # rule bn-epsilon: pruned vs original float on the calibration images; min_agreement is the profile's
    # pfq.min_agreement (passed by the step)
    "bn-epsilon guard": Tolerance(atol=None, min_agreement=0.98),
    # Brevitas vs the exported graph (qonnx or onnxruntime, optimizations off): |Δlogit| ~1e-6 unless an activation
    # lands one step over a rounding boundary (seen: 23/256 images = 9% after full QAT)
    "export": Tolerance(atol=1e-3, min_agreement=0.99, max_mismatch_fraction=0.25),
    # onnxruntime at an optimization level vs the QCDQ graph as written: its integer kernels move most images by a
    # step; the level must not change the classification (recorded, the level is chosen by it)
    "onnxruntime level": Tolerance(atol=1e-3, min_agreement=0.99, max_mismatch_fraction=1.0, raises=False),
    # the TVM library reloaded in a fresh process vs the QCDQ model in onnxruntime: the same one-step flips as
    # "export", and so the same agreement (seen: 1 near-tie of 200 on EfficientNet-Lite0 64×64 W8A8, 15 images
    # moved, max |Δlogit| 0.026)
    "tvm build": Tolerance(atol=1e-3, min_agreement=0.99, max_mismatch_fraction=0.25),
}


def check(name: str, stage: str, reference: np.ndarray, candidate: np.ndarray,
          min_agreement: float | None = None) -> "GoldenResult":
    """``golden_check`` with the tolerance ``TOLERANCES[name]``; ``stage`` labels the result; ``min_agreement``
    replaces the table's where a profile sets it. Raises GoldenCheckError if the check fails and the entry raises."""
    tol = TOLERANCES[name]
    return golden_check(stage, reference, candidate, atol=tol.atol,
                        min_agreement=tol.min_agreement if min_agreement is None else min_agreement,
                        max_mismatch_fraction=tol.max_mismatch_fraction, raise_on_fail=tol.raises)


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

    @classmethod
    def from_dict(cls, d: dict) -> "GoldenResult":
        return cls(**d)


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
