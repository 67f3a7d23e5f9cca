"""CPU and GPU targets through TVM (Relax): QCDQ export checked in onnxruntime, a TVM library for the profile's
LLVM or CUDA target (MetaSchedule-tuned if asked), reloaded in a fresh process and checked where it runs, and its
latency against onnxruntime and torch on this machine.

    driver.py  the TVM driver (ONNX import, MetaSchedule tuning, compile, export_library, cross-build checks)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pfq_edge.compilation import Compilation, StepResult
from pfq_edge.golden import GoldenResult
from pfq_edge.steps import GOLDEN_IMAGES, Step
from pfq_edge.targets.backends import Backend

QCDQ_FILE = "model.qcdq.onnx"
DEPLOYED_CHUNK_BYTES = 512 << 20  # test images per fresh-process run of the library (Fashion-MNIST's: one run)


def _golden_images(c: Compilation):
    """≥ GOLDEN_IMAGES test images, a whole number of the runtime's batches."""
    batch = c.profile.runtime.batch_size
    batches = -(-GOLDEN_IMAGES // batch)  # ceil
    return c.data.test.take(batches * batch).images


@dataclass
class QcdqExportResult(StepResult):
    step: ClassVar[str] = "export"
    format: str
    file: str
    bytes: int
    batch_size: int
    golden: GoldenResult
    onnxruntime_levels: dict
    onnxruntime_level: str

    @property
    def artefacts(self) -> dict[str, str]:
        return {self.file: self.file}


def _exact_logits(c: Compilation, images):
    """The golden checks' float64 arbiter (pfq_edge.golden): Brevitas in float64 on ``images``, computed once and
    only if a float32 comparison fails; None when the quantized model is not in memory."""
    import functools

    from pfq_edge.train import predict_float64

    return functools.cache(lambda: predict_float64(c.qmodel, images)) if c.qmodel is not None else None


def export(c: Compilation) -> QcdqExportResult:
    """Standard ONNX Q/DQ (QCDQ) export at the profile's batch size; golden check of the graph's own semantics
    (onnxruntime, optimizations off) against Brevitas; then onnxruntime at "all" (integer kernels) and "basic"
    against that graph: the first level that computes the model is the one timed — measured, not assumed."""
    from pfq_edge.export.qcdq import export_qcdq
    from pfq_edge.golden import check
    from pfq_edge.runners.onnx import onnxruntime_levels, run_onnxruntime
    from pfq_edge.train import predict

    images = _golden_images(c)
    batch = c.profile.runtime.batch_size
    path = export_qcdq(c.qmodel, images[:batch], c.work / QCDQ_FILE)
    written = run_onnxruntime(path, images.numpy())
    exact = _exact_logits(c, images)
    golden = check("export", "export (QCDQ in onnxruntime vs Brevitas)", predict(c.qmodel, images).numpy(), written,
                   exact=exact)
    levels, chosen = onnxruntime_levels(path, images.numpy(), written, exact=exact)
    return QcdqExportResult(format="QCDQ", file=path.name, bytes=path.stat().st_size, batch_size=batch,
                            golden=golden, onnxruntime_levels=levels, onnxruntime_level=chosen)


@dataclass
class BuildResult(StepResult):
    step: ClassVar[str] = "build"
    library: str
    target: dict
    runs_here: bool
    elf: dict
    tuning: dict = field(default_factory=dict)
    device_code: dict | None = None
    extra_files: list = field(default_factory=list)
    golden: GoldenResult | None = None
    deployed_images: int | None = None
    deployed_top1: float | None = None
    not_run: str | None = None
    tuning_db: bool = False      # tvm_tuning/ (measured records) stays in the output folder, not the package

    def report(self) -> dict:
        out = {k: getattr(self, k) for k in ("library", "target", "runs_here", "elf", "tuning", "device_code",
                                             "extra_files")}
        if self.runs_here:
            out.update(golden=self.golden.as_dict(), deployed_images=self.deployed_images)
        else:
            out["not_run"] = self.not_run
        return out

    @property
    def accuracy(self) -> dict[str, float]:
        return {} if self.deployed_top1 is None else {"deployed": self.deployed_top1}

    @property
    def artefacts(self) -> dict[str, str]:
        return {f: f for f in [self.library, *self.extra_files]}

    @property
    def kept(self) -> list[str]:
        return ["tvm_tuning"] if self.tuning_db else []


def build(c: Compilation) -> BuildResult:
    """TVM Relax build for the profile's target (tuned with MetaSchedule if asked), ``export_library``; a host
    library is reloaded in a fresh process, run on every test image and golden-checked against the QCDQ model; a
    cross-compiled one has its ELF header checked (and CUDA device code compiled with nvcc if it is here)."""
    from pfq_edge.golden import check
    from pfq_edge.runners.latency import resolve_threads, run_outputs
    from pfq_edge.runners.onnx import run_onnxruntime
    from pfq_edge.targets.backends.tvm.driver import build_tvm

    spec = c.profile.runtime
    db = c.work / "tvm_tuning"
    previous = c.config.tuning_db or (c.final / "tvm_tuning")
    if spec.runs_here and Path(previous).is_dir():  # schedules are measured on this machine: never a cross target
        shutil.copytree(previous, db)
    built = build_tvm(c.work / QCDQ_FILE, spec, c.work, tuning_db=db, log=c.log)
    if db.is_dir() and not any(db.iterdir()):
        db.rmdir()
    c.timings_s["tvm_build"] = built.seconds  # wall times go to run.json, not the report
    tuning = dict(built.tuning)
    if tuning:
        c.timings_s["tvm_tuning"] = tuning.pop("seconds")
    result = BuildResult(library=built.library.name, target=built.target, runs_here=built.runs_here, elf=built.elf,
                         tuning=tuning, device_code=built.device_code,
                         extra_files=[p.name for p in built.extra_files], tuning_db=db.is_dir())
    if built.runs_here:  # the deployed artefact on every test image, loaded from disk by a fresh process
        import numpy as np

        test = c.data.test
        n = len(test) // spec.batch_size * spec.batch_size
        per_image = 4 * int(np.prod(c.spec.shape))
        chunk = max(spec.batch_size, DEPLOYED_CHUNK_BYTES // per_image // spec.batch_size * spec.batch_size)
        parts = []  # chunks of the test split: a large one is never in memory at once
        for start in range(0, n, chunk):
            images = test.part(start, min(start + chunk, n)).take(chunk).images
            parts.append(run_outputs("tvm", built.library, images.numpy(), spec.batch_size,
                                     resolve_threads(spec.threads)))
        out = np.concatenate(parts)
        golden_images = _golden_images(c)
        reference = run_onnxruntime(c.work / QCDQ_FILE, golden_images.numpy())
        result.golden = check("tvm build", "build (TVM library in a fresh process vs QCDQ in onnxruntime)",
                              reference, out[:len(reference)], exact=_exact_logits(c, golden_images))
        result.deployed_top1 = float((out.argmax(1) == test.labels[:n].numpy()).mean())
        result.deployed_images = n
    else:
        elf = built.elf
        result.not_run = (f"cross-compiled for {spec.mtriple or spec.tvm_target}: the library cannot be loaded on "
                          f"this machine; checked: its ELF header ({elf.get('class')} {elf.get('type')}, "
                          f"{elf.get('machine')})")
    return result


@dataclass
class MeasureResult(StepResult):
    step: ClassVar[str] = "measure"
    engines: list
    verdict: dict
    batch_size: int | None = None
    threads: int | None = None

    def report(self) -> dict:
        if self.batch_size is None:
            return {"engines": self.engines, "verdict": self.verdict}
        return {"engines": self.engines, "batch_size": self.batch_size, "threads": self.threads,
                "verdict": self.verdict}


def measure(c: Compilation) -> MeasureResult:
    """Latency of the TVM library, onnxruntime (the QCDQ model at the level the export step chose) and torch eager
    (the pruned float model, ``torch.export``) on the same test images, each in its own process, and the verdict
    against the profile's latency budget. Cross-compiled targets: nothing is measured or claimed."""
    import tempfile

    from pfq_edge.runners.latency import measure as time_engine
    from pfq_edge.runners.latency import resolve_threads, torch_export_archive

    spec, built = c.profile.runtime, c.result("build")
    budget = c.profile.budget.latency_ms
    if not built.runs_here:
        return MeasureResult(engines=[], verdict={"verdict": "not measured", "budget_ms": budget,
                                                  "reason": "no such device on this machine"})
    threads = resolve_threads(spec.threads)
    x = c.data.test.take(spec.batch_size).images.numpy()
    level = c.result("export").onnxruntime_level
    results = []
    with tempfile.TemporaryDirectory(prefix="pfq-edge-torch") as tmp:
        engines = [("tvm", c.work / built.library, "TVM (this build)"),
                   ("onnxruntime", c.work / QCDQ_FILE, f"onnxruntime (QCDQ, optimization level {level})"),
                   ("torch", torch_export_archive(c.pruned_model, x, Path(tmp)), "torch eager (float)")]
        for engine, model, label in engines:
            c.say(f"measuring {label} …")
            results.append({"label": label, **time_engine(engine, model, x, threads, ort_level=level)})
    tvm_ms = results[0]["median_ms"]
    return MeasureResult(engines=results, batch_size=spec.batch_size, threads=threads,
                         verdict={"verdict": "meets" if tvm_ms <= budget else "misses", "latency_ms": tvm_ms,
                                  "budget_ms": budget})


class TvmBackend(Backend):
    """kinds "cpu" and "gpu": QCDQ → TVM (see the module docstring)."""

    name = "tvm"
    section = "runtime"
    export_format = "qcdq"
    engines = ("tvm", "onnxruntime")
    plots = {"latency": "latency per engine"}

    @property
    def steps(self) -> list[Step]:
        return [Step("export", export, requires=("finetune",), reads=("quant", "runtime.batch_size"),
                     golden=("export", "onnxruntime level")),
                Step("build", build, requires=("export",), reads=("runtime",), golden=("tvm build",)),
                Step("measure", measure, requires=("build",), reads=("runtime", "budget"))]

    def validate_profile(self, profile) -> str | None:
        if (profile.kind == "gpu") != (profile.runtime.tvm_target == "cuda"):
            return f"a {profile.kind} profile cannot use runtime.tvm_target {profile.runtime.tvm_target!r}"
        return None

    def check_tools(self, profile) -> None:
        from pfq_edge.errors import ToolchainError

        cc = profile.runtime.cc
        if cc and shutil.which(cc) is None:
            hint = " (Debian package gcc-aarch64-linux-gnu; setup.sh installs it)" if "aarch64" in cc else ""
            raise ToolchainError(f"target {profile.name!r} links with {cc!r}, which is not installed{hint}")

    def check_config(self, profile, config, several: bool) -> None:
        from pfq_edge.errors import PfqError

        if config.tuning_db is not None and (several or not self.runs_here(profile)):
            raise PfqError("--tuning-db applies to one target measured on this machine (cpu-x86); " + (
                "several targets given" if several else f"{profile.name!r} is cross-compiled and cannot use it"))

    def runs_here(self, profile) -> bool:
        return profile.runtime.runs_here

    def bits_label(self, quant) -> str:
        return f"{quant.describe()}, {quant.bias} bias"

    def profile_facts(self, profile) -> dict:
        r = profile.runtime
        return {"tvm_target": r.tvm_target, "mcpu": r.mcpu, "mtriple": r.mtriple, "arch": r.arch,
                "batch_size": r.batch_size, "threads": r.threads, "tune_trials": r.tune_trials}

    def device_and_goal(self, r: dict) -> tuple[str, str]:
        cpu = r["mcpu"] + (f", {r['mtriple']}" if r["mtriple"] else "")
        device = f"TVM cuda {r['arch']} (host {cpu})" if r["tvm_target"] == "cuda" else f"TVM llvm {cpu}"
        goal = f"batch {r['batch_size']}" + ("" if r["tvm_target"] == "cuda" else f", {r['threads'] or 'all'} threads")
        return device, goal

    def summary(self, c) -> dict:
        built, measured = c.result("build"), c.result("measure")
        verdict = measured.verdict
        return {"qcdq_bytes": c.result("export").bytes, "tvm_target": built.target, "library": built.library,
                "tvm_golden": built.golden.passed if built.golden is not None else None,
                "device_code_compiled": (built.device_code or {}).get("compiled"),
                "latency_ms": verdict.get("latency_ms"), "latency_budget_ms": verdict["budget_ms"],
                "latency_verdict": verdict["verdict"],
                **{f"latency_ms_{e['engine']}": e["median_ms"] for e in measured.engines}}

    def summary_rows(self, s: dict) -> list[list]:
        rows = []
        if "qcdq_bytes" in s:
            rows += [["QCDQ ONNX file", f"{s['qcdq_bytes']:,} bytes"],
                     ["TVM library", f"{s.get('library')} (" + {True: "golden check passed in a fresh process",
                                                                False: "golden check failed",
                                                                None: "cross-compiled: not run here"}[
                         s.get("tvm_golden")] + ")"]]
        if "latency_ms_tvm" in s:
            rows += [["latency TVM / onnxruntime / torch (median)", " / ".join(
                f"{s.get('latency_ms_' + e, float('nan')):.3f}" for e in ("tvm", "onnxruntime", "torch")) + " ms"]]
        if s.get("latency_verdict"):
            rows += [["latency budget", f"{s['latency_verdict']} ({s.get('latency_budget_ms')} ms)"]]
        return rows

    def latency_cell(self, row: dict) -> str:
        if row.get("latency_ms") is not None:
            return f"{row['latency_ms']:.3f} ms (TVM, measured)"
        return "not measured (cross-compiled)"

    def budget_missed(self, s: dict) -> str | None:
        if s.get("latency_verdict") == "misses":
            return (f"TVM latency {s['latency_ms']:.3f} ms exceeds the latency budget of "
                    f"{s['latency_budget_ms']} ms")
        return None

    def markdown(self, doc: dict) -> list[str]:
        from pfq_edge.targets.backends.tvm.report import runtime_section

        st = doc["stages"]
        return runtime_section(st.get("export", {}), st["build"], st.get("measure", {})) if st.get("build") else []

    def render_plots(self, doc: dict, folder, title: str) -> list[str]:
        from pfq_edge import plots

        measured = doc["stages"].get("measure", {})
        if not measured.get("engines"):
            return []
        plots.plot_latency(measured["engines"], measured["verdict"].get("budget_ms"), f"{title}: latency per call",
                           folder / "latency.png")
        return ["latency"]

    def manifest(self, c) -> dict:
        from pfq_edge.runners.onnx import ORT_LEVELS

        measured, built, spec = c.result("measure"), c.result("build"), c.profile.runtime
        engines = {e["engine"]: {k: e[k] for k in ("median_ms", "p90_ms", "min_ms")} for e in measured.engines}
        return {"latency": {"source": "measured on the build machine" if engines else "not measured",
                            "engines": engines, "batch_size": measured.batch_size, "threads": measured.threads,
                            "budget_ms": c.profile.budget.latency_ms, "verdict": measured.verdict["verdict"]},
                "runtime": {"engine": "tvm", "onnx": QCDQ_FILE, "library": built.library,
                            "device": "cuda" if spec.tvm_target == "cuda" else "cpu",
                            "onnxruntime_level": ORT_LEVELS[c.result("export").onnxruntime_level],
                            "batch_size": spec.batch_size},
                "size": {"library_bytes": (c.work / built.library).stat().st_size}}

    def device_readme(self, info: dict) -> list[str]:
        lat, rt = info["latency"], info["runtime"]
        device = "the CUDA GPU (tvm.cuda(0))" if rt["device"] == "cuda" else "the CPU"
        lines = [f"`run.py` loads `{rt['library']}` with the TVM runtime (`pip install apache-tvm numpy`, same "
                 f"version as in manifest.json) on {device}, batch {rt['batch_size']}:", "",
                 "    python run.py images/                        # image files, a folder of them, or an .npz",
                 "    python run.py images.npz --engine onnxruntime   # the QCDQ model instead", "",
                 f"Latency: {lat['source']}" + (", median ms per call: " + ", ".join(
                     f"{k} {v['median_ms']:.3f}" for k, v in lat["engines"].items()) if lat.get("engines") else "")
                 + f"; budget {lat['budget_ms']} ms: {lat['verdict']}."]
        if info["kind"] == "gpu":
            lines += ["", "The CUDA module was compiled here but not run: no GPU figure is claimed."]
        return lines
