"""Golden checks at step boundaries: a step's output against the previous step's on the same inputs.

Quantized networks make exact equality the wrong test between two runtimes: float32 sums in a different order put
a value on the other side of a rounding boundary now and then, the activation moves by one quantization step and
that step propagates to the logits. So a check bounds three things: top-1 agreement, the share of images whose
logits differ by more than ``atol`` (such one-step flips), and — when every image must match — the max |Δ|.

In a deep network those flips compound: on EfficientNet-Lite0 W8A8 (64×64) Brevitas' own float32 run is off its
float64 run by up to 0.5 in the logits on 46% of the images and flips 3 of 200 decisions — as far as onnxruntime is.
There the float32 reference cannot judge a candidate to 1e-3, so checks marked ``arbiter`` fall back to the float64
computation of the quantized model (``exact``) when the float32 comparison fails: the candidate passes when it is no
further from it than the float32 reference is (``judge_by_arbiter``). A real fault — a dropped bias, a wrong scale —
moves every image and fails both comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    arbiter: bool = False   # judge by the float64 computation when the float32 comparison fails (module docstring)


# Every golden check of a compile, by name; each step declares the names it runs (pfq_edge/steps.py, backends).
TOLERANCES = {
    # PfQ rule exact (constants that meet zero padding are neutralized, not removed): identical up to float rounding
    "prune exact": Tolerance(atol=1e-4, min_agreement=1.0),
    # rule bn-epsilon: pruned vs original float (compile: the calibration images; prune --check: the test images it is
    # given); min_agreement is the profile's pfq.min_agreement (passed by the step)
    "bn-epsilon guard": Tolerance(atol=None, min_agreement=0.98),
    # rule near-constant: the same data guard (filters below a quantization step replaced by act(β))
    "near-constant guard": Tolerance(atol=None, min_agreement=0.98),
    # prune --at-padding remove under rule exact: border outputs change, judged like the approximate rules
    "at-padding removal guard": Tolerance(atol=None, min_agreement=0.98),
    # Brevitas vs the exported graph (qonnx or onnxruntime, optimizations off): |Δlogit| ~1e-6 unless an activation
    # lands one step over a rounding boundary (seen: 23/256 images = 9% after full QAT)
    "export": Tolerance(atol=1e-3, min_agreement=0.99, max_mismatch_fraction=0.25, arbiter=True),
    # onnxruntime at an optimization level vs the QCDQ graph as written: its integer kernels move most images by a
    # step; the level must not change the classification (recorded, the level is chosen by it)
    "onnxruntime level": Tolerance(atol=1e-3, min_agreement=0.99, max_mismatch_fraction=1.0, raises=False,
                                   arbiter=True),
    # the TVM library reloaded in a fresh process vs the QCDQ model in onnxruntime: the same one-step flips as
    # "export", and so the same agreement (seen: 1 near-tie of 200 on EfficientNet-Lite0 64×64 W8A8, 15 images
    # moved, max |Δlogit| 0.026)
    "tvm build": Tolerance(atol=1e-3, min_agreement=0.99, max_mismatch_fraction=0.25, arbiter=True),
    # FINN's graph (python executor) after conversion, streamlining and HW conversion vs the QONNX model: FINN's own
    # transformations are exact on integers; float32 order differences as in "export"
    "finn": Tolerance(atol=1e-3, min_agreement=0.99, max_mismatch_fraction=0.25),
}

# The float64 arbiter (``judge_by_arbiter``): against the exact logits the candidate may flip at most
# ARBITER_FACTOR × the reference's top-1 decisions plus ARBITER_SLACK of the images, and its per-image error (max and
# mean over images of max |Δlogit|) may be at most ARBITER_FACTOR × the reference's plus atol.
ARBITER_FACTOR = 2.0
ARBITER_SLACK = 0.005


def check(name: str, stage: str, reference: np.ndarray, candidate: np.ndarray,
          min_agreement: float | None = None,
          exact: Callable[[], np.ndarray] | None = None) -> "GoldenResult":
    """``golden_check`` with the tolerance ``TOLERANCES[name]``; ``stage`` labels the result; ``min_agreement``
    replaces the table's where a profile sets it. ``exact``: returns the logits (N, classes) of the float64
    computation on the same inputs, called only when the float32 comparison fails and the entry has ``arbiter``
    (then ``judge_by_arbiter`` decides). Raises GoldenCheckError if the check fails and the entry raises."""
    tol = TOLERANCES[name]
    agreement = tol.min_agreement if min_agreement is None else min_agreement
    result = golden_check(stage, reference, candidate, atol=tol.atol, min_agreement=agreement,
                          max_mismatch_fraction=tol.max_mismatch_fraction, raise_on_fail=False)
    if not result.passed and tol.arbiter and exact is not None:
        result.arbiter = judge_by_arbiter(reference, candidate, exact(), tol.atol or 0.0)
        result.passed = result.arbiter["passed"]
    if not result.passed and tol.raises:
        raise GoldenCheckError(failure_message(result))
    return result


def _errors(logits: np.ndarray, exact: np.ndarray) -> dict:
    per_image = np.abs(logits.astype(np.float64) - exact).reshape(len(exact), -1).max(1)
    return {"top1_flips": int((logits.argmax(1) != exact.argmax(1)).sum()), "max_abs_diff": float(per_image.max()),
            "mean_abs_diff": float(per_image.mean())}


def judge_by_arbiter(reference: np.ndarray, candidate: np.ndarray, exact: np.ndarray, atol: float) -> dict:
    """Compare the float32 ``reference`` and the ``candidate`` (logits (N, classes)) with ``exact``, the float64
    computation of the same quantized model on the same N inputs. Passes when the candidate flips at most
    ARBITER_FACTOR × the reference's top-1 decisions + ARBITER_SLACK × N (at least one image), and its max and mean
    per-image error are at most ARBITER_FACTOR × the reference's + ``atol``. Returns {"reference": errors,
    "candidate": errors, "passed"}, errors = {top1_flips, max_abs_diff, mean_abs_diff}."""
    ref, cand = _errors(reference, exact), _errors(candidate, exact)
    flips_allowed = ARBITER_FACTOR * ref["top1_flips"] + max(1, math.ceil(ARBITER_SLACK * len(exact)))
    passed = (cand["top1_flips"] <= flips_allowed
              and cand["max_abs_diff"] <= ARBITER_FACTOR * ref["max_abs_diff"] + atol
              and cand["mean_abs_diff"] <= ARBITER_FACTOR * ref["mean_abs_diff"] + atol)
    return {"reference": ref, "candidate": cand, "passed": bool(passed)}


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
    arbiter: dict | None = None   # judge_by_arbiter's verdict when the float32 comparison failed

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
        raise GoldenCheckError(failure_message(result))
    return result


def failure_message(r: GoldenResult) -> str:
    """One line: what a failed check measured against what it allows (and the arbiter's verdict if it ran)."""
    flips = (f"{r.mismatched_images} images differ by more than {r.atol} (allowed {r.max_mismatch_fraction:.0%}), "
             if r.atol is not None else "")
    text = (f"golden check '{r.stage}' failed on {r.images} images: top-1 agreement {r.argmax_agreement:.2%} "
            f"(required {r.min_agreement:.0%}), {flips}max abs diff {r.max_abs_diff:.3g}")
    if r.arbiter:
        ref, cand = r.arbiter["reference"], r.arbiter["candidate"]
        text += (f"; against the float64 computation it flips {cand['top1_flips']} top-1 decisions (the float32 "
                 f"reference {ref['top1_flips']}), max |Δ| {cand['max_abs_diff']:.3g} (reference "
                 f"{ref['max_abs_diff']:.3g}), mean {cand['mean_abs_diff']:.3g} (reference {ref['mean_abs_diff']:.3g})")
    return text
