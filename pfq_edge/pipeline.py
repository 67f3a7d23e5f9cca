"""``pfq-edge compile``: one model object flowing through named stages, each appending to one Report.

    FPGA:    load → prune (PfQ) → quantize → finetune → export (QONNX) → estimate (FINN + fit/budget) → package
    CPU/GPU: load → prune (PfQ) → quantize → finetune → export_qcdq → build (TVM) → measure (latency) → package

Each stage is ``stage(state) -> state``; ``state.report`` collects what each one measured. Output is built in a
staging folder and moved into place only when every stage (and every golden check) has passed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pfq_edge import interrupt
from pfq_edge.errors import PfqError
from pfq_edge.report import Report

CALIBRATION_IMAGES = 1024
GOLDEN_IMAGES = 256
EXPORT_ATOL = 1e-3              # |Δlogit| between Brevitas and qonnx execution when no activation flips (~1e-6)
EXPORT_MIN_AGREEMENT = 0.99     # top-1 agreement, QONNX vs Brevitas
EXPORT_MAX_FLIPPED = 0.25       # share of images allowed a one-step rounding flip (seen: 23/256 = 9% after full QAT)
PRUNE_EXACT_ATOL = 1e-4         # |Δlogit| when PfQ removal is exact (no constant meets zero padding)
PRUNE_APPROX_AGREEMENT = 0.99   # top-1 agreement required when removal is approximate at the borders
TVM_MIN_AGREEMENT = 1.0         # top-1 agreement, TVM library (fresh process) vs the QCDQ model in onnxruntime


@dataclass
class CompileConfig:
    """Inputs of one compile. ``overrides`` replace profile keys per section, e.g. {"quant": {"weight_bit_width":
    3}, "finetune": {"epochs": 0}} (None values are ignored). ``checkpoint``: fine-tuning checkpoint file, written
    after every epoch; ``resume`` continues from it. ``tuning_db``: a TVM MetaSchedule database folder to reuse
    (CPU targets; by default the ``tvm_tuning/`` of an existing ``out`` is reused)."""

    model: str
    target: str
    out: Path
    weights: Path | None = None
    overrides: dict = field(default_factory=dict)
    data_dir: Path | None = None
    force: bool = False
    checkpoint: Path | None = None
    resume: bool = False
    tuning_db: Path | None = None


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
    log: object = None
    final: Path | None = None  # where this target's output lands (cfg.out, or cfg.out/<target> for several)


def stage_load(s: State) -> State:
    """Load the float model and Fashion-MNIST (unless the caller passed them in ``s``); hold out the validation
    images (the last ``finetune.validation_images`` of the training split); measure float top-1 on the test set."""
    from pfq_edge.data import Split, load_split
    from pfq_edge.train import predict, top1
    from pfq_edge.zoo import load_model

    weights = s.cfg.weights
    if s.float_model is None:
        loaded = load_model(s.cfg.model, s.cfg.weights)
        s.float_model, weights = loaded.module, loaded.weights
    if not s.data:
        s.data = {"train": load_split("train", s.cfg.data_dir), "test": load_split("test", s.cfg.data_dir)}
    n_val = s.profile.finetune.validation_images
    if n_val:
        train = s.data["train"]
        if n_val >= len(train):
            from pfq_edge.errors import ProfileError

            raise ProfileError(f"finetune.validation_images = {n_val} leaves no training images (split has "
                               f"{len(train)})")
        keep = len(train) - n_val
        s.data["train"], s.data["val"] = Split(train.images[:keep], train.labels[:keep]), \
            Split(train.images[keep:], train.labels[keep:])
    _check_layers(s.float_model, s.cfg.model)
    _check_io(s.float_model, s.cfg.model, s.data["test"].images[:2], num_classes=10)
    s.report.add("load", {"model": s.cfg.model, "weights": str(weights) if weights else None,
                          "parameters": sum(p.numel() for p in s.float_model.parameters()),
                          "train_images": len(s.data["train"]), "validation_images": n_val,
                          "test_images": len(s.data["test"])})
    if "float_logits" not in s.data:  # a caller running many configurations of one model passes them in
        s.data["float_logits"] = predict(s.float_model, s.data["test"].images)  # reused by the prune checks
    s.report.add("accuracy", {"float": top1(s.data["float_logits"], s.data["test"])})
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


SUPPORTED_WEIGHT_LAYERS = ("Conv2d", "Linear", "BatchNorm2d")


def _check_layers(model, name: str) -> None:
    """Every layer with weights must be one pfq-edge prunes and quantizes (Conv2d, Linear, BatchNorm2d, or a
    Brevitas layer); raises ModelError naming the first other one, before any work."""
    import torch

    from pfq_edge.errors import ModelError

    for layer, mod in model.named_modules():
        if type(mod).__module__.startswith("brevitas") or isinstance(
                mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            raise ModelError(f"model {name!r}: layer {layer!r} ({type(mod).__name__}) is not supported; pfq-edge "
                             f"prunes and quantizes CNNs built from {', '.join(SUPPORTED_WEIGHT_LAYERS)} (plus "
                             f"activations, pooling, flatten, add)")


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
    """PfQ with the profile's rule: find constant filters, remove them with compensation, check the pruned float
    model — rule "exact": golden check on the test images; rule "bn-epsilon": the data guard on the calibration
    images (top-1 agreement ≥ pfq.min_agreement, else GoldenCheckError); rule "off": nothing removed."""
    from pfq_edge.analysis import analyze_pfq
    from pfq_edge.golden import golden_check
    from pfq_edge.train import predict, top1

    pfq, test = s.profile.pfq, s.data["test"]
    if pfq.rule == "off":
        s.pruned_model = s.float_model
        s.report.add("prune", {"rule": "off", "filters_removed": 0, "constant_total": 0, "exact": True})
        return s
    s.pruned_model, analysis = analyze_pfq(s.float_model, test.images[:1], bits=s.profile.quant.weight_bit_width,
                                           tol=pfq.tol, rule=pfq.rule)
    exact = all(g.exact for g in analysis.plan.groups)
    record = {**analysis.as_dict(), "exact": exact}
    if pfq.rule == "bn-epsilon":
        calib = s.data["train"].images[:CALIBRATION_IMAGES]
        guard = golden_check(f"PfQ rule bn-epsilon data guard (pruned vs original float on {len(calib)} "
                             f"calibration images)", predict(s.float_model, calib).numpy(),
                             predict(s.pruned_model, calib).numpy(), atol=None, min_agreement=pfq.min_agreement)
        record["guard"] = guard.as_dict()
    pruned_logits = predict(s.pruned_model, test.images)
    if pfq.rule == "exact":
        ref = s.data.get("float_logits")
        ref = predict(s.float_model, test.images) if ref is None else ref
        record["golden"] = prune_golden_check("prune (PfQ float vs original float)", ref.numpy(),
                                              pruned_logits.numpy(), exact).as_dict()
    s.report.add("prune", record)
    s.report.add("accuracy", {"pfq_float": top1(pruned_logits, test)})
    return s


def stage_quantize(s: State) -> State:
    """Fold BN (or keep it), optionally equalize, insert Brevitas quantizers at the profile's bit widths,
    calibrate, optionally correct biases, measure PTQ top-1."""
    from pfq_edge.quantize import calibrate, correct_bias, quantize_model, weight_bits
    from pfq_edge.train import accuracy

    spec = s.profile.quant
    s.qmodel = quantize_model(s.pruned_model, spec)
    calib = s.data["train"].images[:CALIBRATION_IMAGES]
    calibrate(s.qmodel, calib)
    if spec.bias_correction:
        correct_bias(s.qmodel, calib)
    size = weight_bits(s.qmodel)
    s.report.add("quantize", {**spec.model_dump(), "calibration_images": CALIBRATION_IMAGES, **size})
    s.report.add("accuracy", {"quantized_ptq": accuracy(s.qmodel, s.data["test"])})
    return s


def stage_finetune(s: State) -> State:
    """Quantization-aware fine-tuning with the profile's ``finetune`` settings (Adam, LR schedule, optional
    distillation from the float model, early stop on the validation images, checkpoint/resume)."""
    from pfq_edge import dist
    from pfq_edge.train import TrainConfig, accuracy, set_seed, train

    ft = s.profile.finetune
    if ft.epochs == 0:
        s.report.add("finetune", {"skipped": True, "epochs": 0})
        return s
    set_seed(ft.seed)
    tc = TrainConfig(epochs=ft.epochs, lr=ft.lr, weight_decay=ft.weight_decay, batch_size=ft.batch_size,
                     seed=ft.seed, max_samples=ft.train_samples or None, schedule=ft.schedule,
                     distill_alpha=ft.distill_alpha, distill_temperature=ft.distill_temperature, patience=ft.patience)
    result = train(s.qmodel, s.data["train"], tc, description="QAT fine-tuning", teacher=s.float_model,
                   validation=s.data.get("val"), checkpoint=s.cfg.checkpoint, checkpoint_key=_run_key(s),
                   resume=s.cfg.resume)
    s.report.add("finetune", {**ft.model_dump(), "optimizer": f"Adam, {ft.schedule} LR",
                              "images_per_epoch": min(ft.train_samples or len(s.data["train"]),
                                                      len(s.data["train"])),
                              "processes": dist.rank_and_world()[1], "loss": result.losses,
                              "validation_top1": result.val_top1, "best_epoch": result.best_epoch,
                              "stopped_early": result.stopped_early,
                              "resumed_after_epoch": result.resumed_after_epoch})
    s.report.add("accuracy", {"finetuned": accuracy(s.qmodel, s.data["test"])})
    return s


def _run_key(s: State) -> str:
    """Identity of a fine-tuning run for its checkpoint: model, weights, settings, training set size."""
    import hashlib

    facts = {"model": s.cfg.model, "weights": str(s.cfg.weights), "train": len(s.data["train"]),
             **{k: getattr(s.profile, k).model_dump() for k in ("quant", "pfq", "finetune")}}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


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
    for f in sorted(reports.iterdir()):
        if f.name != "time_per_step.json":  # wall times: in the folder, not the package
            s.artefacts[f"finn_reports/{f.name}"] = f
    shutil.copy(build / "finn" / "build.log", reports / "build.log")  # timestamps: likewise
    shutil.rmtree(build)
    from pfq_edge.export.finn import write_finn_build_config

    for f in write_finn_build_config(s.qonnx_path, s.profile.fpga, s.profile.quant.input_bit_width,
                                     s.estimate.folding, s.work / "finn_build"):
        s.artefacts[f"finn_build/{f.name}"] = f
    s.report.add("estimate", {**s.estimate.as_dict(), "report_dir": "finn_reports", "verdicts": verdicts})
    return s


def _golden_images(s: State):
    """≥ GOLDEN_IMAGES test images, a whole number of the runtime's batches."""
    batch = s.profile.runtime.batch_size
    n = -(-GOLDEN_IMAGES // batch) * batch
    return s.data["test"].images[:n]


def stage_export_qcdq(s: State) -> State:
    """Standard ONNX Q/DQ (QCDQ) export at the profile's batch size; golden check of the graph's own semantics
    (onnxruntime, optimizations off) against Brevitas; then onnxruntime at its default level ("all", integer
    kernels) and at "basic" against that graph: the first that computes the model (onnxruntime_level_check) is the
    one timed — measured, not assumed."""
    from pfq_edge.export.qcdq import export_qcdq, run_onnxruntime
    from pfq_edge.golden import golden_check
    from pfq_edge.train import predict

    images = _golden_images(s)
    path = export_qcdq(s.qmodel, images[:s.profile.runtime.batch_size], s.work / "model.qcdq.onnx")
    reference = predict(s.qmodel, images).numpy()
    s.data["qcdq_outputs"] = run_onnxruntime(path, images.numpy())
    golden = golden_check("export (QCDQ in onnxruntime vs Brevitas)", reference, s.data["qcdq_outputs"],
                          atol=EXPORT_ATOL, min_agreement=EXPORT_MIN_AGREEMENT, max_mismatch_fraction=EXPORT_MAX_FLIPPED)
    levels, chosen = onnxruntime_levels(path, images.numpy(), s.data["qcdq_outputs"])
    s.artefacts["model.qcdq.onnx"] = path
    s.report.add("export", {"format": "QCDQ", "file": path.name, "bytes": path.stat().st_size,
                            "batch_size": s.profile.runtime.batch_size, "golden": golden.as_dict(),
                            "onnxruntime_levels": levels, "onnxruntime_level": chosen})
    return s


def onnxruntime_levels(path: Path, images, reference) -> tuple[dict, str]:
    """onnxruntime at level "all" (what a deployment runs) and "basic" (the last before QDQ fusion) on ``images``
    (N, C, H, W) float32, each checked against ``reference``, the logits (N, classes) of the graph as written (level
    off). Returns ({level: onnxruntime_level_check(...)}, the first level that passed, else "off")."""
    from pfq_edge.export.qcdq import run_onnxruntime

    levels = {level: onnxruntime_level_check(level, reference, run_onnxruntime(path, images, level=level))
              for level in ("all", "basic")}
    return levels, next((k for k, v in levels.items() if v["passed"]), "off")


def onnxruntime_level_check(level: str, reference, candidate) -> dict:
    """onnxruntime at an optimization ``level`` vs the QCDQ graph as written (level off), logits (N, classes) on the
    same images; recorded, never raised. Returns GoldenResult.as_dict(); "passed" means the level computes the model.

    From level extended on, onnxruntime fuses Q/DQ into integer kernels that requantize exact int32 sums, where the
    graph as written rounds float32 sums: activations on a rounding boundary land one step apart, so most images
    move a little (counted, not bounded). What a level must not do is change the classification: ≥ 99% top-1
    agreement (EXPORT_MIN_AGREEMENT), which caught onnxruntime 1.25.1 dropping run-time biases (16.8%).
    """
    from pfq_edge.golden import golden_check

    return golden_check(f"onnxruntime, optimization level {level}, vs the QCDQ graph", reference, candidate,
                        atol=EXPORT_ATOL, min_agreement=EXPORT_MIN_AGREEMENT, max_mismatch_fraction=1.0,
                        raise_on_fail=False).as_dict()


def stage_build(s: State) -> State:
    """TVM Relax build for the profile's target (tuned with MetaSchedule if asked), ``export_library``; a host
    library is reloaded in a fresh process and golden-checked against the QCDQ model; a cross-compiled one has its
    ELF header checked (and CUDA device code compiled with nvcc if the toolkit is here)."""
    from pfq_edge.export.tvm import build_tvm
    from pfq_edge.golden import golden_check
    from pfq_edge.latency import resolve_threads, run_outputs

    spec = s.profile.runtime
    db = s.work / "tvm_tuning"
    previous = s.cfg.tuning_db or (Path(s.final or s.cfg.out) / "tvm_tuning")
    if spec.runs_here and previous.is_dir():  # schedules are measured on this machine: never for a cross target
        shutil.copytree(previous, db)
    build = build_tvm(s.work / "model.qcdq.onnx", spec, s.work, tuning_db=db, log=s.log)
    if db.is_dir() and not any(db.iterdir()):
        db.rmdir()
    data = build.as_dict()
    s.report.timings_s["tvm_build"] = data.pop("seconds")  # wall times go to run.json, not the report
    if data.get("tuning"):
        s.report.timings_s["tvm_tuning"] = data["tuning"].pop("seconds")
    if build.runs_here:  # the deployed artefact on every test image, loaded from disk by a fresh process
        test = s.data["test"]
        n = len(test) // spec.batch_size * spec.batch_size
        out = run_outputs("tvm", build.library, test.images[:n].numpy(), spec.batch_size,
                          resolve_threads(spec.threads))
        golden = len(s.data["qcdq_outputs"])
        data["golden"] = golden_check("build (TVM library in a fresh process vs QCDQ in onnxruntime)",
                                      s.data["qcdq_outputs"], out[:golden], atol=EXPORT_ATOL,
                                      min_agreement=TVM_MIN_AGREEMENT,
                                      max_mismatch_fraction=EXPORT_MAX_FLIPPED).as_dict()
        s.report.add("accuracy", {"deployed": float((out.argmax(1) == test.labels[:n].numpy()).mean())})
        data["deployed_images"] = n
    else:
        elf = build.elf
        data["not_run"] = (f"cross-compiled for {spec.mtriple or spec.tvm_target}: the library cannot be loaded on "
                           f"this machine; checked: its ELF header ({elf.get('class')} {elf.get('type')}, "
                           f"{elf.get('machine')})")
    s.artefacts[build.library.name] = build.library
    for f in build.extra_files:
        s.artefacts[f.name] = f
    s.data["tvm_build"] = build  # tvm_tuning/ (measured records) stays in the output folder, not the package
    s.report.add("build", data)
    return s


def stage_measure(s: State) -> State:
    """Latency of the TVM library, onnxruntime (the QCDQ model at the highest optimization level that computes it
    correctly, see stage_export_qcdq) and torch eager (the pruned float model, ``torch.export``) on the same test
    images, each in its own process (pfq_edge.latency), and the verdict against the profile's latency budget.
    Cross-compiled targets: nothing is measured or claimed."""
    import tempfile

    from pfq_edge.latency import measure, resolve_threads

    spec, build = s.profile.runtime, s.data["tvm_build"]
    budget = s.profile.budget.latency_ms
    if not build.runs_here:
        s.report.add("measure", {"engines": [], "verdict": {"verdict": "not measured", "budget_ms": budget,
                                                            "reason": "no such device on this machine"}})
        return s
    threads = resolve_threads(spec.threads)
    x = s.data["test"].images[:spec.batch_size].numpy()
    log = s.log
    results = []
    with tempfile.TemporaryDirectory(prefix="pfq-edge-torch") as tmp:
        level = s.report.stages["export"]["onnxruntime_level"]
        engines = [("tvm", build.library, "TVM (this build)"),
                   ("onnxruntime", s.work / "model.qcdq.onnx", f"onnxruntime (QCDQ, optimization level {level})"),
                   ("torch", _torch_export(s.pruned_model or s.float_model, x, Path(tmp)), "torch eager (float)")]
        for engine, model, label in engines:
            if log:
                log(f"measuring {label} …")
            results.append({"label": label, **measure(engine, model, x, threads, ort_level=level)})
    tvm_ms = results[0]["median_ms"]
    s.report.add("measure", {"engines": results, "batch_size": spec.batch_size, "threads": threads,
                             "verdict": {"verdict": "meets" if tvm_ms <= budget else "misses", "latency_ms": tvm_ms,
                                         "budget_ms": budget}})
    return s


def _torch_export(model, x, folder: Path) -> Path:
    import torch

    path = folder / "model.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(model.eval(), (torch.from_numpy(x),)), str(path))
    return path


def stage_package(s: State) -> State:
    """report.json, report.md, plots/, and the deterministic deployment archive: the model artefacts, the report,
    a device README, run.py, SHA256SUMS and manifest.json (export/package.py)."""
    from pfq_edge.export.package import RUNNER, build_manifest, device_readme, write_archive
    from pfq_edge.report import render_plots

    _summarise(s)
    name = f"pfq-edge-{_slug(s.cfg.model)}-{s.profile.name}.tar.gz"
    s.report.add("package", {"archive": name})
    doc = json.loads(s.report.to_json())
    doc["plots"] = render_plots(doc, s.work / "plots")
    s.report.plots = doc["plots"]
    (s.work / "report.json").write_text(s.report.to_json())
    (s.work / "report.md").write_text(s.report.to_markdown())
    info = _manifest_info(s)
    (s.work / "README.md").write_text(device_readme(info, name))
    shutil.copy(RUNNER, s.work / "run.py")
    files = {**s.artefacts, **{f"plots/{k}.png": s.work / "plots" / f"{k}.png" for k in doc["plots"]},
             **{f: s.work / f for f in ("report.json", "report.md", "README.md", "run.py")}}
    manifest = build_manifest(files, info)
    write_archive(s.work / name, files, manifest)
    (s.work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return s


def _manifest_info(s: State) -> dict:
    """The manifest fields that describe this compile (export/package.py, ``Manifest``)."""
    from pfq_edge.export.package import FASHION_MNIST_CLASSES, state_dict_sha256
    from pfq_edge.export.qcdq import ORT_LEVELS

    st, summary = s.report.stages, s.report.summary
    prune = st["prune"]
    golden = [g for g in (prune.get("golden"), prune.get("guard"), st["export"].get("golden"),
                          st.get("build", {}).get("golden")) if g]
    if s.profile.kind == "fpga":
        est = st["estimate"]
        latency = {"source": "FINN estimate (no synthesis)", "latency_ms": est["latency_us"] / 1000,
                   "throughput_fps": est["throughput_fps"], "budget_ms": s.profile.budget.latency_ms,
                   "verdict": est["verdicts"]["latency"]["verdict"], "fit": est["verdicts"]["fit"]["verdict"],
                   "resources": est["totals"]}
        runtime = {"engine": "qonnx", "onnx": "model.qonnx.onnx", "batch_size": 1}
    else:
        measured, build = st["measure"], st["build"]
        engines = {e["engine"]: {k: e[k] for k in ("median_ms", "p90_ms", "min_ms")} for e in measured["engines"]}
        latency = {"source": "measured on the build machine" if engines else "not measured",
                   "engines": engines, "batch_size": measured.get("batch_size"), "threads": measured.get("threads"),
                   "budget_ms": s.profile.budget.latency_ms, "verdict": measured["verdict"]["verdict"]}
        runtime = {"engine": "tvm", "onnx": "model.qcdq.onnx", "library": build["library"],
                   "device": "cuda" if s.profile.runtime.tvm_target == "cuda" else "cpu",
                   "onnxruntime_level": ORT_LEVELS[st["export"]["onnxruntime_level"]],
                   "batch_size": s.profile.runtime.batch_size}
    runtime["input_shape"] = list(s.data["test"].images.shape[1:])
    size = {"weight_bits": summary["weight_bits"], "bias_params": summary["bias_params"],
            "onnx_bytes": st["export"]["bytes"]}
    if "build" in st:
        size["library_bytes"] = (s.work / st["build"]["library"]).stat().st_size
    return {"model": {"name": s.cfg.model, "weights": Path(s.cfg.weights).name if s.cfg.weights else None,
                      "source_sha256": state_dict_sha256(s.float_model)},
            "target": s.profile.name, "kind": s.profile.kind,
            "profile": s.profile.model_dump(exclude={"source"}), "bits": summary["bits"],
            "pfq": {k: prune.get(k) for k in ("rule", "filters_removed", "constant_total", "exact")},
            "accuracy": st["accuracy"], "golden": golden, "latency": latency, "size": size, "runtime": runtime,
            "classes": FASHION_MNIST_CLASSES}


def write_run_facts(path: Path, report: Report) -> None:
    """run.json: what changes from run to run and is therefore kept out of report.json and the package — stage
    wall times, the date, this machine."""
    import datetime
    import os
    import platform

    facts = {"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
             "timings_s": report.timings_s}
    path.write_text(json.dumps(facts, indent=2) + "\n")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _summarise(s: State) -> None:
    acc = s.report.stages["accuracy"]
    q = s.profile.quant
    summary = {
        "float_top1": acc.get("float"), "pfq_top1": acc.get("pfq_float"), "quantized_top1": acc.get("quantized_ptq"),
        "finetuned_top1": acc.get("finetuned"), "deployed_top1": acc.get("deployed"),
        "bits": f"W{q.weight_bit_width}A{q.act_bit_width} input {q.input_bit_width}-bit, {q.weight_granularity}"
                + ("" if s.profile.kind == "fpga" else f", {q.bias} bias"),
        "pfq_rule": s.profile.pfq.rule,
        "filters_removed": s.report.stages["prune"]["filters_removed"],
        "weight_bits": s.report.stages["quantize"]["weight_bits"],
        "bias_params": s.report.stages["quantize"]["bias_params"],
        "zero_weight_fraction": s.report.stages["quantize"]["zero_weight_fraction"],
        f"{s.report.stages['export']['format'].lower()}_bytes": s.report.stages["export"]["bytes"],
    }
    if s.estimate is not None:
        v = s.report.stages["estimate"]["verdicts"]
        summary.update({"latency_us": s.estimate.latency_us, "throughput_fps": s.estimate.throughput_fps,
                        **{r: s.estimate.totals[r] for r in ("LUT", "BRAM_18K", "URAM", "DSP")},
                        "fit": v["fit"]["verdict"], "latency_verdict": v["latency"]["verdict"]})
    build, measured = s.report.stages.get("build"), s.report.stages.get("measure")
    if build is not None:
        summary.update({"tvm_target": build["target"], "library": build["library"],
                        "tvm_golden": (build.get("golden") or {}).get("passed"),
                        "device_code_compiled": (build.get("device_code") or {}).get("compiled")})
    if measured is not None:
        verdict = measured["verdict"]
        summary.update({"latency_ms": verdict.get("latency_ms"), "latency_budget_ms": verdict["budget_ms"],
                        "latency_verdict": verdict["verdict"]})
        summary.update({f"latency_ms_{e['engine']}": e["median_ms"] for e in measured["engines"]})
    s.report.summary = summary


def budget_missed(summary: dict) -> str | None:
    """A one-line reason if the compiled model misses its profile's budget (fit or latency), else None."""
    if summary.get("fit") == "does not fit":
        return "the FINN estimate does not fit the board (report.md, 'FPGA estimate')"
    if summary.get("latency_verdict") == "misses":
        if "latency_us" in summary:
            return f"FINN latency {summary['latency_us'] / 1000:.3f} ms exceeds the profile's latency budget"
        return (f"TVM latency {summary['latency_ms']:.3f} ms exceeds the latency budget of "
                f"{summary['latency_budget_ms']} ms")
    return None


ACCURACY_STAGES = [stage_load, stage_prune, stage_quantize, stage_finetune]  # benchmarks/pfq_accuracy.py runs these
STAGES = ACCURACY_STAGES + [stage_export, stage_estimate, stage_package]      # FPGA targets
RUNTIME_STAGES = ACCURACY_STAGES + [stage_export_qcdq, stage_build, stage_measure, stage_package]  # CPU/GPU


def stages_for(profile) -> list:
    """The stages of a compile for ``profile``'s kind."""
    return STAGES if profile.kind == "fpga" else RUNTIME_STAGES


def run_stages(state: State, stages, log=None) -> State:
    """Run ``stages`` in order on ``state``, timing each into ``state.report.timings_s``."""
    state.log = log
    for stage in stages:
        name = stage.__name__.removeprefix("stage_")
        if log is not None:
            log(f"stage {name} …")
        t0 = time.perf_counter()
        try:
            state = stage(state)
        except PfqError:
            interrupt.check()  # a tool that caught Ctrl-C reports a failure: it is the interruption
            raise
        interrupt.check()  # ... or carries on as if nothing happened
        state.report.timings_s[name] = round(time.perf_counter() - t0, 2)
    return state


def check_target_tools(profile) -> None:
    """Before any work: an FPGA profile's board/part must be FINN's; a cross-compiling profile's C compiler
    (``runtime.cc``) must be installed. Raises ProfileError / ToolchainError."""
    if profile.kind == "fpga":
        from pfq_edge.targets.fit import check_fpga_profile

        check_fpga_profile(profile)
    elif profile.runtime.cc and shutil.which(profile.runtime.cc) is None:
        from pfq_edge.errors import ToolchainError

        hint = " (Debian package gcc-aarch64-linux-gnu; setup.sh installs it)" if "aarch64" in profile.runtime.cc else ""
        raise ToolchainError(f"target {profile.name!r} links with {profile.runtime.cc!r}, which is not installed{hint}")


def effective_profile(cfg: CompileConfig):
    """The profile named by ``cfg.target`` with ``cfg.overrides`` applied; raises ProfileError."""
    from pfq_edge.targets.profile import load_profile, with_overrides

    return with_overrides(load_profile(cfg.target), cfg.overrides)


def effective_profiles(cfg: CompileConfig, targets: list[str]) -> list:
    """The profile of each target with ``cfg.overrides`` applied. With several targets, runtime options (e.g.
    --tune-trials) apply to the targets measured on this machine and are ignored for FPGA and cross-compiled ones.
    Raises ProfileError (also for a target named twice)."""
    import dataclasses

    from pfq_edge.errors import ProfileError
    from pfq_edge.targets.profile import load_profile

    profiles = []
    for t in targets:
        one = dataclasses.replace(cfg, target=t)
        runtime = load_profile(t).runtime
        if len(targets) > 1 and (runtime is None or not runtime.runs_here):
            one = dataclasses.replace(one, overrides={k: v for k, v in cfg.overrides.items() if k != "runtime"})
        profiles.append(effective_profile(one))
    names = [p.name for p in profiles]
    if len(set(names)) < len(names):
        raise ProfileError(f"target {next(n for n in names if names.count(n) > 1)!r} is named twice")
    return profiles


def compile_model(cfg: CompileConfig, log=None) -> Report:
    """Run every stage for ``cfg``; the output folder ``cfg.out`` appears only when all of them succeed.

    Raises PfqError subclasses (ProfileError, DataError, ModelError, GoldenCheckError, ToolchainError, OutputError)
    with one-line messages; nothing is left in ``cfg.out`` on failure.
    Under ``torchrun`` every process fine-tunes its share; only rank 0 exports, estimates and writes ``cfg.out``.
    """
    return compile_targets(cfg, [cfg.target], log)[0]


def _training_key(profile) -> str:
    """Targets with equal quant, pfq and finetune settings share one fine-tuned model."""
    return json.dumps({k: getattr(profile, k).model_dump() for k in ("quant", "pfq", "finetune")}, sort_keys=True)


def compile_targets(cfg: CompileConfig, targets: list[str], log=None) -> list[Report]:
    """Compile ``cfg.model`` for every target in ``targets``, fine-tuning once per distinct (quant, pfq,
    finetune) setting. One target writes its output into ``cfg.out``; several write ``cfg.out``/<profile name>/
    each plus ``summary.json``, ``summary.md`` and ``accuracy_size.png`` across targets. All of it appears only
    when every target succeeds (one staged folder). Returns the reports in ``targets`` order; raises PfqError."""
    import copy
    import tempfile

    from pfq_edge import dist
    from pfq_edge.errors import ProfileError
    from pfq_edge.io import staged_dir
    from pfq_edge.train import set_seed

    profiles = effective_profiles(cfg, targets)
    for profile in profiles:
        check_target_tools(profile)
    groups: dict[str, list[int]] = {}
    for i, profile in enumerate(profiles):
        groups.setdefault(_training_key(profile), []).append(i)
    if cfg.checkpoint is not None and len(groups) > 1:
        raise ProfileError(f"--checkpoint holds one fine-tuning run; these targets need {len(groups)} (different "
                           f"quant/pfq/finetune settings): compile them separately")
    rank, _ = dist.init_from_env()
    single = len(profiles) == 1
    reports: list[Report | None] = [None] * len(profiles)
    try:
        with (staged_dir(Path(cfg.out), force=cfg.force) if rank == 0 else
              tempfile.TemporaryDirectory(prefix="pfq-edge-rank")) as work:
            work = Path(work)
            for members in groups.values():
                first = profiles[members[0]]
                set_seed(first.finetune.seed)
                base = State(cfg=cfg, profile=first, report=Report(cfg.model, first.name, first.kind), work=work)
                base = run_stages(base, ACCURACY_STAGES, log)
                if rank != 0:
                    continue
                for i in members:
                    profile = profiles[i]
                    folder = work if single else work / profile.name
                    folder.mkdir(exist_ok=True)
                    report = copy.deepcopy(base.report)
                    report.target, report.kind = profile.name, profile.kind
                    state = State(cfg=cfg, profile=profile, report=report, work=folder, data=base.data,
                                  float_model=base.float_model, pruned_model=base.pruned_model,
                                  qmodel=copy.deepcopy(base.qmodel) if len(members) > 1 else base.qmodel,
                                  final=Path(cfg.out) if single else Path(cfg.out) / profile.name)
                    reports[i] = run_stages(state, stages_for(profile)[len(ACCURACY_STAGES):], log).report
                    write_run_facts(folder / "run.json", reports[i])
            if rank == 0 and not single:
                write_summary(work, reports)
    finally:
        dist.barrier()  # the other ranks pass it once rank 0's output is in place
    return reports if rank == 0 else [base.report]


def write_summary(folder: Path, reports: list[Report]) -> dict:
    """summary.json, summary.md and accuracy_size.png of a multi-target compile (one row per target)."""
    from pfq_edge.plots import plot_accuracy_vs_size
    from pfq_edge.report import summary_table

    rows = [{"target": r.target, "kind": r.kind, "folder": r.target, "archive": f"{r.target}/"
             f"{r.stages['package']['archive']}", **r.summary} for r in reports]
    doc = {"model": reports[0].model, "targets": rows}
    (folder / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    (folder / "summary.md").write_text(summary_table(doc))
    plot_accuracy_vs_size([{"label": r["target"], "top1": r.get("finetuned_top1") or r.get("quantized_top1"),
                            "weight_bits": r.get("weight_bits")} for r in rows],
                          f"{doc['model']}: top-1 vs logical weight size per target", folder / "accuracy_size.png")
    return doc
