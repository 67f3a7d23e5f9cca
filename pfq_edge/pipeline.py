"""``pfq-edge compile``: one model object flowing through named stages, each appending to one Report.

    load → prune (PfQ) → quantize → finetune → export (QONNX) → estimate (FINN + fit/budget) → package

Each stage is ``stage(state) -> state``; ``state.report`` collects what each one measured. Output is built in a
staging folder and moved into place only when every stage (and every golden check) has passed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pfq_edge.report import Report

DEFAULT_EPOCHS = 2
DEFAULT_TRAIN_SAMPLES = None    # images per fine-tuning epoch: None = all 60,000 (else the first N)
DEFAULT_LR = 1e-3
CALIBRATION_IMAGES = 1024
GOLDEN_IMAGES = 256
EXPORT_ATOL = 1e-3              # |Δlogit| between Brevitas and qonnx execution when no activation flips (~1e-6)
EXPORT_MIN_AGREEMENT = 0.99     # top-1 agreement, QONNX vs Brevitas
EXPORT_MAX_FLIPPED = 0.25       # share of images allowed a one-step rounding flip (seen: 23/256 = 9% after full QAT)
PRUNE_EXACT_ATOL = 1e-4         # |Δlogit| when PfQ removal is exact (no constant meets zero padding)
PRUNE_APPROX_AGREEMENT = 0.99   # top-1 agreement required when removal is approximate at the borders


@dataclass
class CompileConfig:
    """Inputs of one compile. ``epochs`` 0 skips fine-tuning; ``train_samples`` None uses all 60,000 images."""

    model: str
    target: str
    out: Path
    weights: Path | None = None
    epochs: int = DEFAULT_EPOCHS
    train_samples: int | None = DEFAULT_TRAIN_SAMPLES
    lr: float = DEFAULT_LR
    seed: int = 0
    data_dir: Path | None = None
    force: bool = False


@dataclass
class State:
    """What flows between stages."""

    cfg: CompileConfig
    profile: object
    report: Report
    work: Path
    data: dict = field(default_factory=dict)
    float_model: object = None
    pruned_model: object = None
    qmodel: object = None
    qonnx_path: Path | None = None
    estimate: object = None
    artefacts: dict = field(default_factory=dict)


def stage_load(s: State) -> State:
    """Load the float model and Fashion-MNIST; measure float top-1 on the 10,000 test images."""
    from pfq_edge.data import load_split
    from pfq_edge.train import accuracy
    from pfq_edge.zoo import load_model

    loaded = load_model(s.cfg.model, s.cfg.weights)
    s.float_model = loaded.module
    s.data = {"train": load_split("train", s.cfg.data_dir), "test": load_split("test", s.cfg.data_dir)}
    _check_io(s.float_model, s.cfg.model, s.data["test"].images[:2], num_classes=10)
    s.report.add("load", {"model": s.cfg.model, "weights": str(loaded.weights) if loaded.weights else None,
                          "parameters": sum(p.numel() for p in s.float_model.parameters()),
                          "train_images": len(s.data["train"]), "test_images": len(s.data["test"])})
    s.report.add("accuracy", {"float": accuracy(s.float_model, s.data["test"])})
    return s


def _check_io(model, name: str, x, num_classes: int) -> None:
    """The model must map (N, 1, 28, 28) images to (N, num_classes) logits; raises ModelError otherwise."""
    import torch

    from pfq_edge.errors import ModelError

    try:
        with torch.no_grad():
            y = model(x)
    except Exception as exc:
        layer = _unquantized_input_layer(model)
        if layer is not None:  # shared/cases 7: a Brevitas layer with an int32 bias and a float input
            raise ModelError(f"model {name!r}: layer {layer!r} has an int32-quantized bias but its input is not "
                             f"quantized; give pfq-edge the float model (it inserts an 8-bit input quantizer) or "
                             f"put an input quantizer before {layer!r}") from None
        msg = " ".join(str(exc).split())[:160]
        raise ModelError(f"model {name!r} fails on input of shape {tuple(x.shape)}: {msg}") from None
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x), num_classes):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelError(f"model {name!r} returns {shape} for input {tuple(x.shape)}; expected ({len(x)}, "
                         f"{num_classes}) logits")


def _unquantized_input_layer(model) -> str | None:
    """The first Brevitas layer whose bias quantizer needs an input scale that nothing provides, if any."""
    for name, mod in model.named_modules():
        bias_quant, input_quant = getattr(mod, "bias_quant", None), getattr(mod, "input_quant", None)
        if getattr(bias_quant, "requires_input_scale", False) and not getattr(input_quant, "is_quant_enabled", True):
            return name
    return None


def prune_golden_check(stage: str, reference, candidate, exact: bool):
    """Pruned vs original float logits: every image within 1e-4 when the removal is exact, else ≥ 99% top-1
    agreement (the zero-padded borders differ). Raises GoldenCheckError; used by compile and `prune --check`."""
    from pfq_edge.golden import golden_check

    return golden_check(stage, reference, candidate, atol=PRUNE_EXACT_ATOL if exact else None,
                        min_agreement=1.0 if exact else PRUNE_APPROX_AGREEMENT)


def stage_prune(s: State) -> State:
    """PfQ: find constant filters, remove them with compensation, golden-check the pruned float model."""
    from pfq_edge.analysis import analyze_pfq
    from pfq_edge.train import accuracy, predict

    test = s.data["test"]
    s.pruned_model, analysis = analyze_pfq(s.float_model, test.images[:1], bits=s.profile.quant.weight_bit_width)
    exact = all(g.exact for g in analysis.plan.groups)
    ref, out = predict(s.float_model, test.images).numpy(), predict(s.pruned_model, test.images).numpy()
    golden = prune_golden_check("prune (PfQ float vs original float)", ref, out, exact)
    s.report.add("prune", {**analysis.as_dict(), "exact": exact, "golden": golden.as_dict()})
    s.report.add("accuracy", {"pfq_float": accuracy(s.pruned_model, test)})
    return s


def stage_quantize(s: State) -> State:
    """Fold BN, insert Brevitas quantizers at the profile's bit widths, calibrate, measure PTQ top-1."""
    from pfq_edge.quantize import calibrate, quantize_model, weight_bits
    from pfq_edge.train import accuracy

    spec = s.profile.quant
    s.qmodel = quantize_model(s.pruned_model, spec)
    calibrate(s.qmodel, s.data["train"].images[:CALIBRATION_IMAGES])
    size = weight_bits(s.qmodel)
    s.report.add("quantize", {**spec.model_dump(), "calibration_images": CALIBRATION_IMAGES, **size})
    s.report.add("accuracy", {"quantized_ptq": accuracy(s.qmodel, s.data["test"])})
    return s


def stage_finetune(s: State) -> State:
    """Quantization-aware fine-tuning (Adam, cosine LR) for ``epochs`` passes over ``train_samples`` images."""
    from pfq_edge.train import TrainConfig, accuracy, set_seed, train

    cfg = s.cfg
    if cfg.epochs == 0:
        s.report.add("finetune", {"skipped": True, "epochs": 0})
        return s
    set_seed(cfg.seed)
    tc = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=128, seed=cfg.seed, max_samples=cfg.train_samples)
    losses = train(s.qmodel, s.data["train"], tc, description="QAT fine-tuning")
    s.report.add("finetune", {"epochs": cfg.epochs, "lr": cfg.lr, "seed": cfg.seed, "optimizer": "Adam, cosine LR",
                              "images_per_epoch": min(cfg.train_samples or len(s.data["train"]),
                                                      len(s.data["train"])), "loss": losses})
    s.report.add("accuracy", {"finetuned": accuracy(s.qmodel, s.data["test"])})
    return s


def stage_export(s: State) -> State:
    """QONNX export (Brevitas + qonnx clean-up) and golden check of qonnx execution against Brevitas."""
    from pfq_edge.export.qonnx import export_qonnx, run_qonnx
    from pfq_edge.golden import golden_check
    from pfq_edge.train import predict

    images = s.data["test"].images[:GOLDEN_IMAGES]
    s.qonnx_path = export_qonnx(s.qmodel, images[:1], s.work / "model.qonnx.onnx")
    golden = golden_check("export (QONNX vs Brevitas)", predict(s.qmodel, images).numpy(),
                          run_qonnx(s.qonnx_path, images.numpy()), atol=EXPORT_ATOL,
                          min_agreement=EXPORT_MIN_AGREEMENT, max_mismatch_fraction=EXPORT_MAX_FLIPPED)
    s.artefacts["model.qonnx.onnx"] = s.qonnx_path
    s.report.add("export", {"format": "QONNX", "file": s.qonnx_path.name, "bytes": s.qonnx_path.stat().st_size,
                            "golden": golden.as_dict()})
    return s


def stage_estimate(s: State) -> State:
    """FINN estimate-only build for the profile's part/clock/folding goal, then fit and latency-budget verdicts."""
    from pfq_edge.export.finn import finn_estimate
    from pfq_edge.targets.fit import fpga_verdicts

    build = s.work / ".finn_build"
    s.estimate = finn_estimate(s.qonnx_path, s.profile.fpga, s.profile.quant.input_bit_width, build)
    verdicts = fpga_verdicts(s.estimate, s.profile)
    reports = s.work / "finn_reports"
    shutil.copytree(s.estimate.report_dir, reports)
    shutil.copy(build / "finn" / "build.log", reports / "build.log")
    shutil.rmtree(build)
    for f in sorted(reports.iterdir()):
        s.artefacts[f"finn_reports/{f.name}"] = f
    s.report.add("estimate", {**s.estimate.as_dict(), "report_dir": "finn_reports", "verdicts": verdicts})
    return s


def stage_package(s: State) -> State:
    """report.json, report.md and the deployment archive (model, FINN reports, report, manifest with sha256)."""
    from pfq_edge.export.package import build_manifest, write_archive

    _summarise(s)
    (s.work / "report.json").write_text(s.report.to_json())
    (s.work / "report.md").write_text(s.report.to_markdown())
    files = {**s.artefacts, "report.json": s.work / "report.json", "report.md": s.work / "report.md"}
    info = {"model": s.cfg.model, "target": s.profile.name, "profile": s.profile.model_dump(exclude={"source"}),
            "bits": s.report.summary["bits"], "accuracy": s.report.stages["accuracy"],
            "pfq": {"filters_removed": s.report.stages["prune"]["filters_removed"]},
            "estimates": {k: s.report.summary.get(k) for k in ("latency_us", "throughput_fps", "LUT", "BRAM_18K",
                                                              "URAM", "DSP", "fit", "latency_verdict")},
            "weight_bits": s.report.summary["weight_bits"]}
    manifest = build_manifest(files, info)
    name = f"pfq-edge-{_slug(s.cfg.model)}-{s.profile.name}.tar.gz"
    write_archive(s.work / name, files, manifest)
    (s.work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    s.report.add("package", {"archive": name})
    return s


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _summarise(s: State) -> None:
    acc = s.report.stages["accuracy"]
    q = s.profile.quant
    summary = {
        "float_top1": acc.get("float"), "pfq_top1": acc.get("pfq_float"), "quantized_top1": acc.get("quantized_ptq"),
        "finetuned_top1": acc.get("finetuned"),
        "bits": f"W{q.weight_bit_width}A{q.act_bit_width} input {q.input_bit_width}-bit, {q.weight_granularity}",
        "filters_removed": s.report.stages["prune"]["filters_removed"],
        "weight_bits": s.report.stages["quantize"]["weight_bits"],
        "bias_params": s.report.stages["quantize"]["bias_params"],
        "qonnx_bytes": s.report.stages["export"]["bytes"],
    }
    if s.estimate is not None:
        v = s.report.stages["estimate"]["verdicts"]
        summary.update({"latency_us": s.estimate.latency_us, "throughput_fps": s.estimate.throughput_fps,
                        **{r: s.estimate.totals[r] for r in ("LUT", "BRAM_18K", "URAM", "DSP")},
                        "fit": v["fit"]["verdict"], "latency_verdict": v["latency"]["verdict"]})
    s.report.summary = summary


STAGES = [stage_load, stage_prune, stage_quantize, stage_finetune, stage_export, stage_estimate, stage_package]


def compile_model(cfg: CompileConfig, log=None) -> Report:
    """Run every stage for ``cfg``; the output folder ``cfg.out`` appears only when all of them succeed.

    Raises PfqError subclasses (ProfileError, DataError, ModelError, GoldenCheckError, ToolchainError, OutputError)
    with one-line messages; nothing is left in ``cfg.out`` on failure.
    """
    from pfq_edge.io import staged_dir
    from pfq_edge.targets.fit import check_fpga_profile
    from pfq_edge.targets.profile import load_profile
    from pfq_edge.train import set_seed

    profile = load_profile(cfg.target)
    check_fpga_profile(profile)
    set_seed(cfg.seed)
    with staged_dir(Path(cfg.out), force=cfg.force) as work:
        state = State(cfg=cfg, profile=profile, report=Report(cfg.model, profile.name), work=work)
        for stage in STAGES:
            name = stage.__name__.removeprefix("stage_")
            if log is not None:
                log(f"stage {name} …")
            t0 = time.perf_counter()
            state = stage(state)
            state.report.timings_s[name] = round(time.perf_counter() - t0, 2)
    return state.report
