"""Target profile schema (pydantic) and loading from built-in names or TOML files.

A profile is data: bit widths and granularity, export format, FPGA board/part/clock and folding goal, and the
budgets the compile is judged against. Nothing else in pfq-edge hard-codes a part number or a bit width.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pfq_edge.errors import ProfileError
from pfq_edge.pfq import DEFAULT_TOL, PROFILE_RULES

PROFILE_DIR = Path(__file__).parent / "profiles"


def wa_label(weight_bits: int, act_bits: int) -> str:
    """The field's short name of a bit-width pair: weights W, activations A, e.g. ``W4A4``."""
    return f"W{weight_bits}A{act_bits}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


LOW_BIT_EDGE_LAYER_BITS = 8  # first conv and classifier below 4-bit weights (QuantSpec.edge_layer_bits)
MSE_MAX_BITS = 4              # scale_init "auto" chooses MSE-initialised scales at or below these bits
KEEP_BN_BELOW_BITS = 4        # bn "auto" keeps BN unfolded below these weight bits


class QuantSpec(_Strict):
    """Bit widths (2–8), weight-scale granularity, BN handling and the PTQ aids of the quantized network.

    ``first_layer_weight_bit_width`` / ``last_layer_weight_bit_width`` set the first conv and the last compute layer
    (the classifier); None: 8 when ``weight_bit_width`` < 4 and the network has ≥ 3 compute layers (as FINN's and
    Brevitas' 2-bit examples keep them:
    measured on fashion-dscnn-adam W2A2 63.0 → 71.4 %, docs/workflow.md), else ``weight_bit_width``.
    ``bn``: "fold" BN into the conv before fine-tuning (the paper's order), "keep" it float during fine-tuning
    (quantized weights are then the unfolded ones; FINN absorbs BN into its thresholds afterwards) or "auto"
    (default): "keep" when weights have fewer than 4 bits, else "fold" — below 4 bits keeping BN measured best
    (fashion-dscnn, 1-epoch QAT, 3 seeds: W3A3 89.72 → 90.38 %, W2A2 68.41 → 84.92 % with PfQ), at 4 bits and
    above it changed nothing beyond the seed noise (W4A4 91.19 vs 91.28 %; docs/benchmarks.md).
    ``bn_reestimate``: with BN kept, re-estimate the BN running mean/var on the calibration images after the
    quantizers are inserted (the statistics the float network gathered no longer describe the quantized convs'
    outputs; fashion-dscnn W3A3, no PfQ, PTQ on 2,000 test images: 85.3 → 90.4 %); ignored when BN is folded.
    ``equalize``: Brevitas cross-layer equalization before quantization; ``bias_correction``: Brevitas bias
    correction after calibration. ``bias``: "float" keeps biases float (FINN absorbs them into its thresholds) or
    "int32" quantizes them on the accumulator grid, input scale × weight scale (Brevitas ``Int32Bias``), as integer
    runtimes compute them: onnxruntime's QDQ fusions round a float bias to that grid themselves, which moved up to
    20% of top-1 decisions at W4A4 (docs/cpu-gpu.md, "onnxruntime's optimization levels"). The CPU/GPU profiles set "int32".
    ``scale_init``: how the learned weight and activation scales start — "mse" (the scale that minimises the local
    quantization MSE, Brevitas' ``*MSE`` quantizers), "stats" (Brevitas' defaults: the weights' max |w|, the
    activations' 99.999th percentile, ReLU6 at 6) or "auto" (default): "mse" when weights or activations have ≤ 4
    bits, where a max-based scale rounds most weights to 0, else "stats" (at 8 bits MSE gained nothing on
    fashion-dscnn and cost EfficientNet-Lite0 per-channel W8A8 54 pt of PTQ top-1; docs/workflow.md).
    """

    weight_bit_width: int = Field(4, ge=2, le=8)
    act_bit_width: int = Field(4, ge=2, le=8)
    input_bit_width: int = Field(8, ge=2, le=8)
    weight_granularity: Literal["per-tensor", "per-channel"] = "per-tensor"
    first_layer_weight_bit_width: int | None = Field(None, ge=2, le=8)
    last_layer_weight_bit_width: int | None = Field(None, ge=2, le=8)
    bn: Literal["auto", "fold", "keep"] = "auto"
    bn_reestimate: bool = True
    equalize: bool = False
    bias_correction: bool = False
    bias: Literal["float", "int32"] = "float"
    scale_init: Literal["auto", "stats", "mse"] = "auto"

    def resolved_scale_init(self) -> str:
        """"stats" or "mse": ``scale_init`` with "auto" decided by the bit widths (see the class docstring)."""
        if self.scale_init != "auto":
            return self.scale_init
        return "mse" if min(self.weight_bit_width, self.act_bit_width) <= MSE_MAX_BITS else "stats"

    def resolved_bn(self) -> str:
        """"fold" or "keep": ``bn`` with "auto" decided by the weight bit width (see the class docstring)."""
        if self.bn != "auto":
            return self.bn
        return "keep" if self.weight_bit_width < KEEP_BN_BELOW_BITS else "fold"

    def edge_layer_bits(self, compute_layers: int) -> tuple[int, int]:
        """Weight bit widths of the first conv and the last compute layer (see the class docstring) of a network
        with ``compute_layers`` conv/linear layers; with fewer than 3 the 8-bit default would leave no layer at the
        asked bit width, so there it is ``weight_bit_width`` too."""
        low = self.weight_bit_width < 4 and compute_layers >= 3
        default = LOW_BIT_EDGE_LAYER_BITS if low else self.weight_bit_width
        first, last = self.first_layer_weight_bit_width, self.last_layer_weight_bit_width
        return (default if first is None else first), (default if last is None else last)

    def label(self) -> str:
        """Short name, e.g. ``W4A4`` or ``W4A4 per-channel``."""
        text = wa_label(self.weight_bit_width, self.act_bit_width)
        return text if self.weight_granularity == "per-tensor" else f"{text} per-channel"

    def describe(self) -> str:
        """The bit widths as reports state them, e.g. ``W4A4 input 8-bit, per-tensor``."""
        return (f"{wa_label(self.weight_bit_width, self.act_bit_width)} input {self.input_bit_width}-bit, "
                f"{self.weight_granularity}")


class PfqSpec(_Strict):
    """Which filters PfQ removes before quantization (method from arXiv:2011.06751 as read in design.md §2).

    rule "exact" (default): post-BN std ≤ ``tol`` — the output is constant, removal changes nothing but borders.
    rule "bn-epsilon": every filter with running_var ≤ BN ε is replaced by its mean β (an approximation); guarded:
    the float model's top-1 agreement with the original on the calibration images must stay ≥ ``min_agreement``,
    else the compile stops. rule "near-constant": filters whose BN output band is under half an activation step
    at the target's activation bits (criterion.py), guarded alike. rule "off": no PfQ (the plain-QAT baseline).
    ``channel_multiple`` (hardware-aware PfQ): a layer that loses filters keeps a channel count that is a multiple
    of gcd(its count, N); the constant filters that would break that are neutralized (weights 0, output β: the same
    range gain) instead of removed. None: the target kind's backend chooses (FPGA: the largest power of two ≤
    36 bits / weight bits — FINN's MVAU weight-stream cap on SIMD — so W4 → 8; CPU/GPU: 1, remove all).
    """

    rule: Literal[PROFILE_RULES] = "exact"
    tol: float = Field(DEFAULT_TOL, ge=0)
    min_agreement: float = Field(0.98, gt=0, le=1.0)
    channel_multiple: int | None = Field(None, ge=1, le=1024)


class FinetuneSpec(_Strict):
    """Quantization-aware fine-tuning: Adam (+ coupled L2 ``weight_decay``), LR ``schedule`` over all steps.

    ``train_samples`` 0 uses the whole training split (60,000 images, less ``validation_images``).
    ``distill_alpha`` > 0 mixes knowledge distillation from the float model into the loss:
    (1 − α)·CE + α·T²·KL(teacher_T ‖ student_T). ``validation_images`` > 0 holds out the last N training images,
    evaluates them after every epoch, keeps the best epoch and stops after ``patience`` epochs without gain.
    ``stages``: staged fine-tuning, e.g. ``["W4A4"]`` before a W2A2 target — QAT first at each of these bit widths
    in turn, ``stage_epochs`` each, every stage a freshly quantized model that starts from the previous stage's
    trained weights (scales calibrated anew), then the target's own ``epochs``; empty (default): the target's bit
    widths from the start. The paper's third contribution is a fine-tuning workflow around PfQ; this is our
    reading of it as progressive quantization (docs/workflow.md, "Staged fine-tuning", says what it measured).
    """

    epochs: int = Field(2, ge=0)
    train_samples: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    distill_alpha: float = Field(0.0, ge=0, le=1.0)
    distill_temperature: float = Field(4.0, gt=0)
    validation_images: int = Field(0, ge=0)
    patience: int = Field(2, ge=1)
    stages: list[str] = Field(default_factory=list)
    stage_epochs: int = Field(1, ge=1)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: list[str]) -> list[str]:
        for stage in stages:  # "w4a4" is W4A4, on the command line and in a profile alike
            if not STAGE.fullmatch(stage.strip().upper()):
                raise ValueError(f"stage {stage!r} is not a bit-width pair W<2-8>A<2-8> such as W4A4")
        return [s.strip().upper() for s in stages]

    def stage_bits(self) -> list[tuple[int, int]]:
        """(weight bits, activation bits) of each of ``stages``, in order."""
        return [tuple(int(b) for b in STAGE.fullmatch(s).groups()) for s in self.stages]


STAGE = re.compile(r"W([2-8])A([2-8])")


class FpgaSpec(_Strict):
    """FINN dataflow build settings: board (for its capacity), part, clock, and folding goal."""

    board: str
    part: str
    clock_mhz: float = Field(gt=0, le=1000)
    target_fps: int | None = Field(None, gt=0)
    folding_file: str | None = None
    max_utilization: float = Field(0.85, gt=0, le=1.0)
    # Also build the unpruned architecture with FINN when PfQ removed filters, to report both designs and fold
    # PfQ's for the unpruned design's fps where that is faster than target_fps. A second FINN build: on
    # EfficientNet-Lite0 it doubles the estimate step (~16 → ~32 min here), hence the switch.
    compare_unpruned: bool = True

    @model_validator(mode="after")
    def _one_folding_goal(self):
        if (self.target_fps is None) == (self.folding_file is None):
            raise ValueError("set exactly one of target_fps or folding_file")
        return self


class RuntimeSpec(_Strict):
    """TVM (Relax) build and measurement settings of a CPU/GPU target.

    ``tvm_target`` "llvm" (CPU) or "cuda"; ``mcpu`` an LLVM CPU name, "host" = this machine's CPU; ``mtriple``
    set = cross-compile (the library is linked with ``cc``, e.g. aarch64-linux-gnu-gcc, and cannot run here);
    ``arch`` the CUDA compute capability (sm_87 = Jetson Orin). ``batch_size`` images per call of the compiled
    module; ``threads`` for measurement (0 = every core of this machine); ``tune_trials`` MetaSchedule trials
    (0 = untuned).
    """

    tvm_target: Literal["llvm", "cuda"]
    mcpu: str = "host"
    mtriple: str | None = None
    mattr: list[str] = []
    arch: str | None = Field(None, pattern=r"^sm_\d+$")
    cc: str | None = None
    batch_size: int = Field(1, ge=1, le=1024)
    threads: int = Field(0, ge=0, le=1024)
    tune_trials: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.tvm_target == "cuda" and self.arch is None:
            raise ValueError("a cuda target needs arch, e.g. \"sm_87\"")
        if self.mtriple is not None and self.cc is None:
            raise ValueError("a cross-compiled target (mtriple set) needs cc, the C compiler that links it")
        if self.tune_trials and not self.runs_here:
            raise ValueError("tune_trials needs the device to measure on; this target is cross-compiled and "
                             "cannot be tuned on this machine")
        return self

    @property
    def runs_here(self) -> bool:
        """Whether the compiled module can be loaded and run on this machine (a host-CPU build)."""
        return self.tvm_target == "llvm" and self.mtriple is None


class BudgetSpec(_Strict):
    """What the compiled model must meet: latency per image in milliseconds (per batch for a batch > 1)."""

    latency_ms: float = Field(gt=0)


class Profile(_Strict):
    """One deployment target. Load with ``load_profile``; raises ProfileError on unknown keys or bad values."""

    name: str
    description: str = ""
    kind: str  # a kind registered in targets/backends (fpga, cpu, gpu)
    aliases: list[str] = []
    export_format: str = "qonnx"  # the kind's backend names the one it writes
    quant: QuantSpec = QuantSpec()
    pfq: PfqSpec = PfqSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    fpga: FpgaSpec | None = None
    runtime: RuntimeSpec | None = None
    budget: BudgetSpec
    source: str = ""

    @model_validator(mode="after")
    def _sections_of_kind(self):
        """The kind's backend names its section and export format; the other kinds' sections must be absent."""
        from pfq_edge.targets.backends import backend_for, backends, kinds

        if self.kind not in kinds():
            raise ValueError(f"unknown kind {self.kind!r}; known: {', '.join(kinds())}")
        own = backend_for(self.kind)
        others = [b.section for b in backends() if b.section != own.section]
        if getattr(self, own.section) is None or any(getattr(self, o) is not None for o in others) \
                or self.export_format != own.export_format:
            absent = ", ".join(f"[{o}]" for o in others)
            raise ValueError(f"a profile of kind {self.kind!r} has a [{own.section}] section, no {absent} section "
                             f"and export_format \"{own.export_format}\"")
        reason = own.validate_profile(self)
        if reason:
            raise ValueError(reason)
        target, bits = (self.quant.weight_bit_width, self.quant.act_bit_width), self.finetune.stage_bits()
        for name, (w, a) in zip(self.finetune.stages, bits):
            if w < target[0] or a < target[1] or (w, a) == target:
                raise ValueError(f"finetune.stages: stage {name} must be above the target's "
                                 f"{wa_label(*target)} (more weight or activation bits, none fewer)")
        for name, (w, a), (w0, a0) in zip(self.finetune.stages[1:], bits[1:], bits):
            if w > w0 or a > a0 or (w, a) == (w0, a0):  # stages step down towards the target
                raise ValueError(f"finetune.stages: stage {name} must step down from the stage before it "
                                 f"({wa_label(w0, a0)}): fewer weight or activation bits, none more")
        if self.finetune.stages and self.finetune.epochs == 0:
            raise ValueError("finetune.stages run before the target's fine-tuning, but finetune.epochs is 0 "
                             "(no fine-tuning); give epochs ≥ 1, or no stages (--stages none)")
        return self

    def summary(self) -> dict:
        """Key facts for ``pfq-edge targets``."""
        facts = {
            "name": self.name, "kind": self.kind, "aliases": self.aliases, "description": self.description,
            "bits": f"W{self.quant.weight_bit_width}A{self.quant.act_bit_width} (input {self.quant.input_bit_width})",
            "pfq_rule": self.pfq.rule,
            "granularity": self.quant.weight_granularity, "bias": self.quant.bias, "export": self.export_format,
            "latency_budget_ms": self.budget.latency_ms,
        }
        from pfq_edge.targets.backends import backend_for

        return {**facts, **backend_for(self.kind).profile_facts(self)}


def _errors(exc: ValidationError) -> str:
    def one(e) -> str:  # a whole-profile check names its keys in the message itself
        msg, key = e["msg"].removeprefix("Value error, "), ".".join(str(p) for p in e["loc"])
        return f"key {key!r}: {msg}" if key else msg

    return "; ".join(one(e) for e in exc.errors()[:3])


def with_overrides(profile: Profile, overrides: dict[str, dict]) -> Profile:
    """``profile`` with sections replaced key by key, e.g. {"quant": {"weight_bit_width": 3}}; values set to None
    are ignored (an option the user did not give). Validated like a file; raises ProfileError naming the key."""
    data = profile.model_dump()
    for section, values in overrides.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given and data.get(section) is None:
            raise ProfileError(f"option {', '.join(given)} does not apply to {profile.kind} target {profile.name!r} "
                               f"(it has no [{section}] section)")
        if given:
            data[section] = {**data[section], **given}
    try:
        return Profile(**data)
    except ValidationError as exc:
        raise ProfileError(f"option for profile {profile.name!r}: {_errors(exc)}") from None


# A user's profile file of kind "cpu" / "gpu" that leaves these [quant] keys out gets what the built-in CPU/GPU
# profiles state (QCDQ carries 8-bit integers; integer runtimes add int32 biases), not the schema's FPGA-minded
# defaults (W4A4, float bias).
KIND_QUANT_DEFAULTS = {kind: {"weight_bit_width": 8, "act_bit_width": 8, "bias": "int32"} for kind in ("cpu", "gpu")}


def _parse(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    quant = data.get("quant", {})
    if data.get("kind") in KIND_QUANT_DEFAULTS and isinstance(quant, dict):  # keys the file leaves out
        data["quant"] = {**KIND_QUANT_DEFAULTS[data["kind"]], **quant}
    folding = data.get("fpga", {}).get("folding_file") if isinstance(data.get("fpga"), dict) else None
    if isinstance(folding, str):  # relative to the profile file, not to wherever the command runs
        data["fpga"]["folding_file"] = str((path.parent / folding).resolve())
    try:
        return Profile(**data, source=str(path))
    except ValidationError as exc:
        raise ProfileError(f"{path}: {_errors(exc)}") from None
    except TypeError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def builtin_profiles() -> dict[str, Profile]:
    """Built-in profiles by name, from ``targets/profiles/*.toml``."""
    profiles = [_parse(p) for p in sorted(PROFILE_DIR.glob("*.toml"))]
    return {p.name: p for p in profiles}


def load_profile(spec: str) -> Profile:
    """A built-in profile by name or alias (``fpga`` → ``fpga-pynq-z1``), or a TOML file path.

    Raises ProfileError naming the known targets if ``spec`` is neither.
    """
    profiles = builtin_profiles()
    if spec in profiles:
        return profiles[spec]
    for p in profiles.values():
        if spec in p.aliases:
            return p
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ProfileError(f"profile file not found: {path}")
        return _parse(path)
    known = sorted(list(profiles) + [a for p in profiles.values() for a in p.aliases])
    raise ProfileError(f"unknown target {spec!r}; known targets: {', '.join(known)}")
