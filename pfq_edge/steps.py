"""Named compile steps: the ``Step`` contract, the shared front end (load → prune → quantize → finetune) and the
package step that ends every target. A backend's own steps (targets/backends/) follow the same contract.

A step is ``run(c: Compilation) -> StepResult``: it reads the models and earlier results it ``requires`` from
``c``, does one thing, runs the golden checks it declares (tolerances: ``pfq_edge.golden.TOLERANCES``) and returns
its typed result, which the pipeline stores in ``c.results[name]``. ``reads`` names the profile sections its result
depends on: ``--from-step`` reuses a step's result only if these (and the model, weights and data) are unchanged.
``restore`` rebuilds, on resume, the in-memory state the step leaves behind (a model) from its result and the
files it saved under ``steps/``.

A new step: write its function and result here (or in its backend), add a ``Step`` to the list it belongs to
(``FRONT_END`` or a backend's ``steps``), declare its golden checks in ``TOLERANCES``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from pfq_edge.compilation import Compilation, InputSpec, StepResult, front_end_settings
from pfq_edge.errors import ModelError, one_line
from pfq_edge.golden import GoldenResult

CALIBRATION_IMAGES = 1024
GOLDEN_IMAGES = 256


@dataclass(frozen=True)
class Step:
    """One named step (see the module docstring)."""

    name: str
    run: Callable[[Compilation], StepResult]
    requires: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    golden: tuple[str, ...] = ()
    restore: Callable[[Compilation, Path], None] | None = None
    save: Callable[[Compilation, Path], None] | None = None
    saves: tuple[str, ...] = ()   # the files ``save`` may write under steps/ (hashed into state.json)

    @property
    def summary(self) -> str:
        return " ".join((self.run.__doc__ or "").strip().split("\n\n")[0].replace("``", "").split())


# --- load ---------------------------------------------------------------------------------------------------------

@dataclass
class LoadResult(StepResult):
    step: ClassVar[str] = "load"
    model: str
    weights: str | None
    parameters: int
    train_images: int
    validation_images: int
    test_images: int
    float_top1: float
    source_sha256: str = ""            # the float model by content: its state dict (manifest, --from-step)
    weights_sha256: str | None = None  # the --weights file by content
    dataset: dict = field(default_factory=dict)  # the manifest's record (datasets.load_dataset)

    def report(self) -> dict:
        return {"model": self.model, "weights": self.weights, "parameters": self.parameters,
                "train_images": self.train_images, "validation_images": self.validation_images,
                "test_images": self.test_images, **({"dataset": self.dataset} if self.dataset else {})}

    @property
    def accuracy(self) -> dict[str, float]:
        return {"float": self.float_top1}


def load(c: Compilation) -> LoadResult:
    """Load the float model and the data (``--data``; default Fashion-MNIST), hold out the validation images,
    check the model's input and output shapes against the data's and its layers, and measure float top-1 on the
    test split."""
    from pfq_edge.export.package import sha256_file, state_dict_sha256
    from pfq_edge.train import predict, top1

    weights = _load_inputs(c)
    c.float_logits = predict(c.float_model, c.data.test)  # reused by the prune check
    return LoadResult(model=c.config.model, weights=str(weights) if weights else None,
                      parameters=sum(p.numel() for p in c.float_model.parameters()), train_images=len(c.data.train),
                      validation_images=len(c.data.val) if c.data.val is not None else 0,
                      test_images=len(c.data.test), float_top1=top1(c.float_logits, c.data.test),
                      source_sha256=state_dict_sha256(c.float_model),
                      weights_sha256=sha256_file(c.config.weights) if c.config.weights else None,
                      dataset=c.data.record)


def _load_inputs(c: Compilation):
    """Model, dataset and input spec into ``c`` (unless a caller set them); returns the weights file used."""
    from pfq_edge.datasets import load_dataset
    from pfq_edge.datasets.normalize import with_input_normalization
    from pfq_edge.zoo import load_model

    weights = c.config.weights
    if c.data is None:
        c.data = load_dataset(c.config.data_spec, c.profile.finetune.validation_images)
    if c.spec is None:
        c.spec = InputSpec(tuple(c.data.shape), tuple(c.data.classes), c.data.normalization)
    fresh = c.float_model is None  # a caller's model is already checked against its data and normalised
    if fresh:
        loaded = load_model(c.config.model, c.config.weights, c.config.model_args)
        c.float_model, weights = loaded.module, loaded.weights
        if weights is None and ":" in c.config.model:
            c.say(f"warning: no --weights for {c.config.model}: the factory's own (initial) weights are compiled")
    check_layers(c.float_model, c.config.model)
    if fresh:
        check_data_fits(c.float_model, c.config.model, c.spec, c.data)
        if c.spec.normalization is not None:
            c.float_model = with_input_normalization(c.float_model, *c.spec.normalization)
    check_io(c.float_model, c.config.model, c.data.test.take(2).images, c.spec.num_classes)
    return weights


def check_data_fits(model, name: str, spec: InputSpec, data) -> None:
    """The data's images (C, H, W) and classes must be what ``model`` takes and gives; raises DataError naming
    both (the data's side is what the user changes: --channels, --image-size, the class folders)."""
    import torch

    from pfq_edge.datasets.normalize import normalize
    from pfq_edge.errors import DataError

    x = data.test.take(2).images
    x = normalize(x, *spec.normalization) if spec.normalization is not None else x
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as exc:
        if _unquantized_input_layer(model) is not None:
            return  # a model problem, not the data's: check_io names it
        first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        c = spec.shape[0]
        if first is not None and first.in_channels != c:  # the likely cause; a model may convert channels itself
            hint = f"; pass --channels {first.in_channels}" if first.in_channels in (1, 3) else ""
            raise DataError(f"the data gives {c}-channel images {spec.shape}; model {name!r} takes "
                            f"{first.in_channels} channels (its first conv){hint}{_default_data_hint(data)}"
                            ) from None
        raise DataError(f"model {name!r} fails on the data's images of shape {tuple(x.shape)}: {one_line(exc, 140)}"
                        f" (resize them with --image-size H,W){_default_data_hint(data)}") from None
    if isinstance(y, torch.Tensor) and y.ndim == 2 and y.shape[1] != spec.num_classes:
        shown = ", ".join(spec.classes[:6]) + (", ..." if spec.num_classes > 6 else "")
        note = data.record.get("classes_note")
        raise DataError(f"model {name!r} gives {y.shape[1]} logits; the data has {spec.num_classes} classes "
                        f"({shown})" + (f": {note}" if note else "") + _default_data_hint(data))


def _restore_load(c: Compilation, _state: Path) -> None:
    _load_inputs(c)


SUPPORTED_WEIGHT_LAYERS = ("Conv2d", "Linear", "BatchNorm2d")


def check_layers(model, name: str) -> None:
    """Every layer with weights must be one pfq-edge prunes and quantizes (Conv2d, Linear, BatchNorm2d, or a
    Brevitas layer); raises ModelError naming the first other one, before any work."""
    import torch

    for layer, mod in model.named_modules():
        if type(mod).__module__.startswith("brevitas") or isinstance(
                mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            raise ModelError(f"model {name!r}: layer {layer!r} ({type(mod).__name__}) is not supported; pfq-edge "
                             f"prunes and quantizes CNNs built from {', '.join(SUPPORTED_WEIGHT_LAYERS)} (plus "
                             f"activations, pooling, flatten, add)")


def check_io(model, name: str, x, num_classes: int) -> None:
    """The model must map images ``x`` (N, C, H, W) to (N, num_classes) logits; raises ModelError otherwise."""
    import torch

    try:
        with torch.no_grad():
            y = model(x)
    except Exception as exc:
        layer = _unquantized_input_layer(model)
        if layer is not None:  # shared/cases 7: a Brevitas layer with an int32 bias and a float input
            raise ModelError(f"model {name!r}: layer {layer!r} has an int32-quantized bias but its input is not "
                             f"quantized; give pfq-edge the float model (it inserts an 8-bit input quantizer) or "
                             f"put an input quantizer before {layer!r}") from None
        raise ModelError(f"model {name!r} fails on input of shape {tuple(x.shape)}: {one_line(exc, 160)}") from None
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x), num_classes):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelError(f"model {name!r} returns {shape} for input {tuple(x.shape)}; expected ({len(x)}, "
                         f"{num_classes}) logits")


def _default_data_hint(data) -> str:
    return "; this is the default data, Fashion-MNIST: pass your images with --data" \
        if data.record.get("kind") == "fashion-mnist" else ""


def _unquantized_input_layer(model) -> str | None:
    """The first Brevitas layer whose bias quantizer needs an input scale that nothing provides, if any."""
    for name, mod in model.named_modules():
        bias_quant, input_quant = getattr(mod, "bias_quant", None), getattr(mod, "input_quant", None)
        if getattr(bias_quant, "requires_input_scale", False) and not getattr(input_quant, "is_quant_enabled", True):
            return name
    return None


# --- prune --------------------------------------------------------------------------------------------------------

@dataclass
class PruneResult(StepResult):
    step: ClassVar[str] = "prune"
    rule: str
    filters_removed: int
    constant_total: int
    exact: bool
    analysis: dict = field(default_factory=dict)   # PfqAnalysis.as_dict(): per-layer rows, groups, warnings
    guard: GoldenResult | None = None
    golden: GoldenResult | None = None
    pfq_top1: float | None = None

    def report(self) -> dict:
        if self.rule == "off":
            return {"rule": "off", "filters_removed": 0, "constant_total": 0, "exact": True}
        out = {**self.analysis, "exact": self.exact}
        for key in ("guard", "golden"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).as_dict()
        return out

    @property
    def accuracy(self) -> dict[str, float]:
        return {} if self.pfq_top1 is None else {"pfq_float": self.pfq_top1}


def prune_golden_check(stage: str, reference, candidate, rule: str, min_agreement: float | None = None) -> GoldenResult:
    """Pruned vs original float logits, judged alike by compile and ``prune --check``: rule "exact" — every image
    within 1e-4 (the removal keeps the function: constants that meet zero padding are neutralized, not removed);
    rules "bn-epsilon" and "near-constant" (approximations) — top-1 agreement ≥ ``min_agreement`` (the profile's
    pfq.min_agreement; default the table's). Raises GoldenCheckError."""
    from pfq_edge.golden import check

    if rule == "exact":
        return check("prune exact", stage, reference, candidate)
    return check(f"{rule} guard", stage, reference, candidate, min_agreement=min_agreement)


def prune(c: Compilation) -> PruneResult:
    """PfQ with the profile's rule: find constant filters, remove them with compensation, check the pruned float
    model — rule "exact": golden check on the test images; rules "bn-epsilon", "near-constant": the data guard on
    the calibration images (top-1 agreement ≥ pfq.min_agreement); rule "off": nothing removed."""
    from pfq_edge.train import predict, top1

    pfq, test = c.profile.pfq, c.data.test
    analysis = _apply_pfq(c)
    if analysis is None:
        return PruneResult(rule="off", filters_removed=0, constant_total=0, exact=True)
    exact = analysis.plan.exact
    result = PruneResult(rule=pfq.rule, filters_removed=analysis.plan.filters_removed,
                         constant_total=analysis.constant_total, exact=exact, analysis=analysis.as_dict())
    if pfq.rule != "exact":
        calib = c.data.train.take(CALIBRATION_IMAGES).images
        result.guard = prune_golden_check(f"PfQ rule {pfq.rule} data guard (pruned vs original float on {len(calib)} "
                                          f"calibration images)", predict(c.float_model, calib).numpy(),
                                          predict(c.pruned_model, calib).numpy(), pfq.rule, pfq.min_agreement)
    pruned_logits = predict(c.pruned_model, test)
    if pfq.rule == "exact":
        ref = c.float_logits if c.float_logits is not None else predict(c.float_model, test)
        result.golden = prune_golden_check("prune (PfQ float vs original float)", ref.numpy(), pruned_logits.numpy(),
                                           "exact")
    result.pfq_top1 = top1(pruned_logits, test)
    return result


def _apply_pfq(c: Compilation):
    """c.pruned_model = PfQ of c.float_model with the profile's rule (deterministic: BN statistics only); returns
    the PfqAnalysis, or None for rule "off" (the float model itself)."""
    from pfq_edge.pfq.analyze import analyze_pfq

    pfq = c.profile.pfq
    if pfq.rule == "off":
        c.pruned_model = c.float_model
        return None
    c.pruned_model, analysis = analyze_pfq(c.float_model, c.data.test.take(1).images,
                                           bits=c.profile.quant.weight_bit_width, tol=pfq.tol, rule=pfq.rule,
                                           act_bits=c.profile.quant.act_bit_width,
                                           channel_multiple=channel_multiple(c.profile))
    return analysis


def channel_multiple(profile) -> int:
    """The profile's ``pfq.channel_multiple``, or its kind's backend's choice when unset."""
    from pfq_edge.targets.backends import backend_for

    given = profile.pfq.channel_multiple
    return given if given is not None else backend_for(profile.kind).channel_multiple(profile)


def _restore_prune(c: Compilation, _state: Path) -> None:
    _apply_pfq(c)


# --- quantize -----------------------------------------------------------------------------------------------------

@dataclass
class QuantizeResult(StepResult):
    step: ClassVar[str] = "quantize"
    settings: dict
    calibration_images: int
    size: dict          # quantize.weight_bits(): weight_bits, bias_params, zero_weight_fraction, layers
    ptq_top1: float

    def report(self) -> dict:
        return {**self.settings, "calibration_images": self.calibration_images, **self.size}

    @property
    def accuracy(self) -> dict[str, float]:
        return {"quantized_ptq": self.ptq_top1}


def quantize(c: Compilation) -> QuantizeResult:
    """Fold BN (or keep it), optionally equalize, insert Brevitas quantizers at the profile's bit widths,
    calibrate, optionally correct biases, measure PTQ top-1."""
    from pfq_edge.quantize import correct_bias, weight_bits
    from pfq_edge.train import accuracy

    spec = c.profile.quant
    c.qmodel, reestimated = calibrated_qmodel(c, spec)
    calib = c.data.train.take(CALIBRATION_IMAGES).images
    if spec.bias_correction:
        correct_bias(c.qmodel, calib)
    return QuantizeResult(settings={**spec.model_dump(), "scale_init_used": spec.resolved_scale_init(),
                                    "bn_reestimated_layers": reestimated},
                          calibration_images=len(calib),
                          size=weight_bits(c.qmodel), ptq_top1=accuracy(c.qmodel, c.data.test))


def calibrated_qmodel(c: Compilation, spec, start=None):
    """The pruned model quantized at ``spec`` (a QuantSpec), optionally carrying the trained weights of ``start``
    (another quantized model of it: staged fine-tuning), calibrated on the calibration images, its BN statistics
    re-estimated when BN is kept. Returns (model, number of BN layers re-estimated)."""
    from pfq_edge.quantize import calibrate, quantize_model, reestimate_bn, transfer_weights

    model = quantize_model(c.pruned_model, spec)
    if start is not None:
        transfer_weights(start, model)
    calib = c.data.train.take(CALIBRATION_IMAGES).images
    calibrate(model, calib)
    reestimated = reestimate_bn(model, calib) if spec.resolved_bn() == "keep" and spec.bn_reestimate else 0
    return model, reestimated


QUANTIZED_STATE = "quantized.safetensors"
FINETUNED_STATE = "finetuned.safetensors"


def _save_qmodel(name: str):
    def save(c: Compilation, state: Path) -> None:
        from safetensors.torch import save

        from pfq_edge.io import atomic_write_bytes

        atomic_write_bytes(state / name, save({k: v.detach().contiguous().clone()
                                               for k, v in c.qmodel.state_dict().items()}))
    return save


def _load_qmodel(c: Compilation, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        c.qmodel.load_state_dict(load_file(str(path)), strict=True)
    except Exception as exc:  # a truncated or foreign file: the saved steps cannot be reused
        shown = c.final / path.parent.name / path.name  # the user's folder, not the staging copy
        raise ModelError(f"cannot restore the quantized model from {shown}: {one_line(exc, 160)}") from None
    c.qmodel.eval()


def _restore_quantize(c: Compilation, state: Path) -> None:
    from pfq_edge.quantize import quantize_model

    c.qmodel = quantize_model(c.pruned_model, c.profile.quant)
    _load_qmodel(c, state / QUANTIZED_STATE)


# --- finetune -----------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult(StepResult):
    step: ClassVar[str] = "finetune"
    skipped: bool
    settings: dict = field(default_factory=dict)
    images_per_epoch: int = 0
    processes: int = 1
    loss: list = field(default_factory=list)
    validation_top1: list = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    resumed_after_epoch: int = 0
    finetuned_top1: float | None = None
    staged: dict = field(default_factory=dict)  # staged fine-tuning, as ``_staged`` returns it

    def report(self) -> dict:
        if self.skipped:
            return {"skipped": True, "epochs": 0}
        s = self.settings
        return {**s, "staged": self.staged or None, "optimizer": f"Adam, {s['schedule']} LR",
                "images_per_epoch": self.images_per_epoch,
                "processes": self.processes, "loss": self.loss, "validation_top1": self.validation_top1,
                "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
                "resumed_after_epoch": self.resumed_after_epoch}

    @property
    def accuracy(self) -> dict[str, float]:
        return {} if self.finetuned_top1 is None else {"finetuned": self.finetuned_top1}


def finetune(c: Compilation) -> FinetuneResult:
    """Quantization-aware fine-tuning with the profile's ``finetune`` settings (Adam, LR schedule, optional
    distillation from the float model, early stop on the validation images, checkpoint/resume)."""
    from pfq_edge import dist
    from pfq_edge.train import TrainConfig, accuracy, set_seed, train

    ft = c.profile.finetune
    if ft.epochs == 0:
        return FinetuneResult(skipped=True)
    set_seed(ft.seed)
    tc = TrainConfig(epochs=ft.epochs, lr=ft.lr, weight_decay=ft.weight_decay, batch_size=ft.batch_size,
                     seed=ft.seed, max_samples=ft.train_samples or None, schedule=ft.schedule,
                     distill_alpha=ft.distill_alpha, distill_temperature=ft.distill_temperature, patience=ft.patience)
    resuming = c.config.resume and c.config.checkpoint is not None and c.config.checkpoint.is_file()
    staged = _staged(c, tc) if ft.stages and not resuming else {}  # resuming: the checkpoint holds the target model
    run = train(c.qmodel, c.data.train, tc, description="QAT fine-tuning", teacher=c.float_model,
                validation=c.data.val, checkpoint=c.config.checkpoint, checkpoint_key=run_key(c),
                resume=c.config.resume)
    return FinetuneResult(skipped=False, settings=ft.model_dump(),
                          images_per_epoch=min(ft.train_samples or len(c.data.train), len(c.data.train)),
                          processes=dist.rank_and_world()[1], loss=run.losses, validation_top1=run.val_top1,
                          best_epoch=run.best_epoch, stopped_early=run.stopped_early,
                          resumed_after_epoch=run.resumed_after_epoch, finetuned_top1=accuracy(c.qmodel, c.data.test),
                          staged=staged)


def _staged(c: Compilation, tc) -> dict:
    """Staged fine-tuning (``FinetuneSpec.stages``): QAT at each stage's bit widths in turn, ``stage_epochs`` each,
    every stage a model quantized afresh from the pruned network, started from the previous stage's weights and
    calibrated anew; ``c.qmodel`` is then rebuilt the same way at the target's bit widths. Returns {"stages": one
    {"bits", "epochs", "ptq_top1" (its start), "top1" (its end)} per stage, "target_start_top1": the target model's
    top-1 before its own fine-tuning}."""
    from dataclasses import replace

    from pfq_edge.train import accuracy, set_seed, train

    spec, ft = c.profile.quant, c.profile.finetune
    records, previous = [], None
    for name, (w, a) in zip(ft.stages, ft.stage_bits()):
        # every stage keeps or folds BN as the target does: the weights carried over must mean the same thing
        stage = spec.model_copy(update={"weight_bit_width": w, "act_bit_width": a, "bn": spec.resolved_bn()})
        model, _ = calibrated_qmodel(c, stage, previous)
        start = accuracy(model, c.data.test)
        train(model, c.data.train, replace(tc, epochs=ft.stage_epochs), description=f"QAT stage {name}",
              teacher=c.float_model, validation=c.data.val)
        records.append({"bits": name, "epochs": ft.stage_epochs, "ptq_top1": start,
                        "top1": accuracy(model, c.data.test)})
        previous = model
    c.qmodel, _ = calibrated_qmodel(c, spec, previous)
    set_seed(ft.seed)  # the target's fine-tuning shuffles as it would without stages
    return {"stages": records, "target_start_top1": accuracy(c.qmodel, c.data.test)}


def training_facts(c: Compilation) -> dict:
    """What the fine-tuned model depends on: model, weights, training-set size and the front end's settings."""
    facts = {"model": c.config.model, "weights": str(c.config.weights), "train": len(c.data.train),
             **front_end_settings(c.profile)}
    if not c.config.data_spec.is_default or c.config.model_args:  # the default run keeps its earlier key
        facts.update(data=c.config.data_spec.facts(), data_sha256=c.data.record.get("sha256"),
                     model_args=c.config.model_args)
    return facts


def run_key(c: Compilation) -> str:
    """Identity of a fine-tuning run for its checkpoint (``training_facts``, hashed)."""
    return hashlib.sha256(json.dumps(training_facts(c), sort_keys=True).encode()).hexdigest()


def _restore_finetune(c: Compilation, state: Path) -> None:
    if not c.result("finetune").skipped:
        _load_qmodel(c, state / FINETUNED_STATE)


def _save_finetuned(c: Compilation, state: Path) -> None:
    if not c.result("finetune").skipped:
        _save_qmodel(FINETUNED_STATE)(c, state)


FRONT_END = [
    Step("load", load, reads=("finetune.validation_images",), restore=_restore_load),
    Step("prune", prune, requires=("load",), reads=("pfq", "quant.weight_bit_width", "quant.act_bit_width"),
         golden=("prune exact", "bn-epsilon guard", "near-constant guard"), restore=_restore_prune),
    Step("quantize", quantize, requires=("prune",), reads=("quant",), restore=_restore_quantize,
         save=_save_qmodel(QUANTIZED_STATE), saves=(QUANTIZED_STATE,)),
    Step("finetune", finetune, requires=("quantize",), reads=("finetune",), restore=_restore_finetune,
         save=_save_finetuned, saves=(FINETUNED_STATE,)),
]


# --- package ------------------------------------------------------------------------------------------------------

@dataclass
class PackageResult(StepResult):
    step: ClassVar[str] = "package"
    archive: str


def package(c: Compilation) -> PackageResult:
    """report.json, report.md, plots/, and the deterministic deployment archive: the model artefacts, the report,
    a device README, run.py, SHA256SUMS and manifest.json (export/package.py, export/outputs.py)."""
    from pfq_edge.export.outputs import write_report
    from pfq_edge.export.package import write_package
    from pfq_edge.report import report_document
    from pfq_edge.targets.backends import backend_for

    backend = backend_for(c.profile.kind)
    result = PackageResult(archive=f"pfq-edge-{_slug(c.config.model)}-{c.profile.name}.tar.gz")
    c.results["package"] = result  # report.json lists the archive
    doc = report_document(c)
    files = write_report(doc, c.work)
    write_package(c.work, result.archive, {**c.artefacts, **files}, manifest_info(c, backend, doc),
                  backend.device_readme)
    return result


def manifest_info(c: Compilation, backend, doc: dict) -> dict:
    """The manifest fields that describe this compile (export/package.py, ``Manifest``); the backend adds its
    latency, runtime and size entries; the golden checks are those of the report document ``doc``."""
    from pfq_edge.report import golden_checks

    prune_result, quant = c.result("prune"), c.result("quantize")
    size = {"weight_bits": quant.size["weight_bits"], "bias_params": quant.size["bias_params"],
            "onnx_bytes": c.result("export").bytes}
    target = backend.manifest(c)
    dataset = c.result("load").dataset
    runtime = {**target["runtime"], "input_shape": list(c.spec.shape),
               "preprocess": {k: dataset.get("preprocess", {}).get(k) for k in ("channels", "image_size",
                                                                                 "center_crop")}}
    model = {"name": c.config.model, "weights": Path(c.config.weights).name if c.config.weights else None,
             "source_sha256": c.result("load").source_sha256}
    if c.config.model_args:
        model["model_args"] = c.config.model_args
    if c.spec.normalization is not None:
        model["input_normalization"] = {"mean": list(c.spec.normalization[0]), "std": list(c.spec.normalization[1]),
                                        "where": "inside the model, before its input quantizer"}
    return {"model": model,
            "target": c.profile.name, "kind": c.profile.kind,
            "profile": c.profile.model_dump(exclude={"source"}), "bits": backend.bits_label(c.profile.quant),
            "pfq": {k: getattr(prune_result, k) for k in ("rule", "filters_removed", "constant_total", "exact")},
            "accuracy": c.accuracy, "golden": golden_checks(doc["stages"]), "latency": target["latency"],
            "size": {**size, **target.get("size", {})}, "runtime": runtime, "classes": list(c.spec.classes), "dataset": dataset}


def _slug(text: str) -> str:
    """A file-name part for the model: a model file (.pt2, a pruned .safetensors) by its stem, not its whole path."""
    if text.endswith((".pt2", ".safetensors")):
        text = Path(text).stem
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


PACKAGE = Step("package", package, requires=("export",))
