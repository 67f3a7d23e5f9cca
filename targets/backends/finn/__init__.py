"""FPGA targets through FINN (finn-plus): QONNX export, FINN's estimate-only dataflow build, fit and latency
verdicts. No Vivado is needed; the package carries FINN's build configuration to continue where it exists.

    driver.py    the FINN driver (in-process builder session, estimate reports)
    fit.py       the checks FINN does not make (board capacity, fit, latency budget)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pfq_edge.compilation import Compilation, StepResult
from pfq_edge.golden import GoldenResult
from pfq_edge.steps import GOLDEN_IMAGES, Step
from pfq_edge.targets.backends import Backend

QONNX_FILE = "model.qonnx.onnx"
MVAU_WWIDTH_MAX = 36  # FINN SetFolding's default cap on an MVAU's weight stream per PE (SIMD × weight bits)


@dataclass
class QonnxExportResult(StepResult):
    step: ClassVar[str] = "export"
    format: str
    file: str
    bytes: int
    golden: GoldenResult

    @property
    def artefacts(self) -> dict[str, str]:
        return {self.file: self.file}


def export(c: Compilation) -> QonnxExportResult:
    """QONNX export (Brevitas + qonnx clean-up) and golden check of qonnx execution against Brevitas."""
    from pfq_edge.export.qonnx import export_qonnx
    from pfq_edge.golden import check
    from pfq_edge.runners.onnx import run_qonnx
    from pfq_edge.train import predict, predict_float64

    images = c.data.test.take(GOLDEN_IMAGES).images
    path = export_qonnx(c.qmodel, images[:1], c.work / QONNX_FILE)
    golden = check("export", "export (QONNX vs Brevitas)", predict(c.qmodel, images).numpy(),
                   run_qonnx(path, images.numpy()), exact=lambda: predict_float64(c.qmodel, images))
    return QonnxExportResult(format="QONNX", file=path.name, bytes=path.stat().st_size, golden=golden)


@dataclass
class EstimateResult(StepResult):
    step: ClassVar[str] = "estimate"
    estimate: dict                 # FinnEstimate.as_dict()
    verdicts: dict                 # fit.fpga_verdicts()
    files: list = field(default_factory=list)      # packaged: finn_reports/*, finn_build/*
    run_files: list = field(default_factory=list)  # kept beside the package (wall times, FINN's log)
    golden: list = field(default_factory=list)     # GoldenResult.as_dict() of FINN's graphs (finn_golden_checks)
    unpruned: dict | None = None                   # the unpruned architecture's design (``unpruned_design``)

    def report(self) -> dict:
        out = {**self.estimate, "report_dir": "finn_reports", "verdicts": self.verdicts, "golden": self.golden}
        return out | ({"unpruned": self.unpruned} if self.unpruned else {})

    @property
    def artefacts(self) -> dict[str, str]:
        return {f: f for f in self.files}

    @property
    def kept(self) -> list[str]:
        return list(self.run_files)


def estimate(c: Compilation) -> EstimateResult:
    """FINN estimate-only build for the profile's part, clock and folding goal, then the fit and latency-budget
    verdicts; FINN's reports and the build configuration that continues it where Vivado exists are saved."""
    import shutil

    from pfq_edge.export.finn_build import write_finn_build_config, write_finn_reports
    from pfq_edge.runners.onnx import run_qonnx
    from pfq_edge.targets.backends.finn.driver import (FINN_GOLDEN_IMAGES, FinnGoldenChecks, finn_estimate,
                                                       finn_session, is_branchy)
    from pfq_edge.targets.backends.finn.fit import fpga_verdicts

    fpga, bits = c.profile.fpga, pixel_bits(c)
    build, qonnx = c.work / ".finn_build", c.work / QONNX_FILE
    clip, branchy = c.spec.normalization is not None, is_branchy(qonnx)
    images = c.data.test.take(FINN_GOLDEN_IMAGES).images.numpy()
    checks = FinnGoldenChecks(run_qonnx(qonnx, images), images, bits)
    # The pruned design is built (and checked) first: a divergence or an unmappable layer stops the compile before
    # the unpruned architecture's build, which only informs the folding goal.
    result = finn_estimate(qonnx, fpga, bits, build, clip_thresholds=clip, branchy=branchy, golden=checks)
    reference = unpruned_design(c, build / "unpruned") \
        if c.result("prune").filters_removed and fpga.compare_unpruned else None
    goal, tried = _folding_goal(fpga, reference), None
    if goal is not fpga:  # the unpruned design is faster than the profile's goal: fold PfQ's for its throughput
        first = result
        first.report_dir = str(shutil.copytree(result.report_dir, build / "report_at_profile_goal"))
        result = finn_estimate(qonnx, goal, bits, build, clip_thresholds=clip, branchy=branchy, refold=True,
                               description="FINN folding for the unpruned design's fps")
        if _larger(result, reference):  # the faster folding costs more: keep the profile's goal
            tried = {"target_fps": goal.target_fps, "totals": result.totals, "throughput_fps": result.throughput_fps}
            goal, result = fpga, first
    golden = [g.as_dict() for g in checks.results]
    verdicts = fpga_verdicts(result, c.profile)
    unpruned = _compare(result, reference, goal, c.profile, tried) if reference is not None else \
        {"not_built": "fpga.compare_unpruned is off"} if c.result("prune").filters_removed else \
        {"not_built": "PfQ removed no filter, so this design has the unpruned architecture", "same": True}
    packaged, run_files = write_finn_reports(result.report_dir, build / "finn" / "build.log", c.work / "finn_reports")
    shutil.rmtree(build)
    with finn_session(c.work / ".finn_config") as _:
        packaged += write_finn_build_config(qonnx, goal, bits, result.folding, c.work / "finn_build",
                                            clip_thresholds=clip, branchy=branchy)
    shutil.rmtree(c.work / ".finn_config")
    rel = [str(p.relative_to(c.work)) for p in packaged]
    return EstimateResult(estimate=result.as_dict(), verdicts=verdicts, files=rel,
                          run_files=[str(p.relative_to(c.work)) for p in run_files], golden=golden,
                          unpruned=unpruned)


def _folding_goal(fpga, reference):
    """The folding goal of PfQ's design: the profile's, raised to the unpruned design's throughput where FINN's
    folding of the unpruned architecture overshoots the profile's target_fps (its PE/SIMD steps are divisors), so
    that the pruned design is compared at the same speed, not slower. A folding file is used as given."""
    import math

    if reference is None or fpga.target_fps is None or reference.throughput_fps <= fpga.target_fps:
        return fpga
    return fpga.model_copy(update={"target_fps": math.ceil(reference.throughput_fps)})


def _larger(pruned, reference) -> list[str]:
    from pfq_edge.targets.backends.finn.driver import RESOURCES

    return [r for r in RESOURCES if pruned.totals.get(r, 0) > reference.totals.get(r, 0)]


def _compare(pruned, reference, goal, profile, tried=None) -> dict:
    """The unpruned design beside PfQ's: {"totals", "throughput_fps", "latency_us", "fit", "folding_goal_fps",
    "raised_goal_tried" (PfQ's design folded for the unpruned throughput, when that cost more and was dropped),
    "pfq_vs_unpruned": {"LUT_ratio", "fps_ratio", "larger", "verdict": "no larger" | "larger" | "slower"}}."""
    from pfq_edge.targets.backends.finn.fit import fpga_verdicts

    larger = _larger(pruned, reference)
    slower = pruned.throughput_fps < reference.throughput_fps
    lut = pruned.totals["LUT"] / reference.totals["LUT"] if reference.totals.get("LUT") else float("nan")
    return {"totals": reference.totals, "throughput_fps": reference.throughput_fps,
            "latency_us": reference.latency_us, "fit": fpga_verdicts(reference, profile)["fit"]["verdict"],
            "folding_goal_fps": goal.target_fps, "profile_target_fps": profile.fpga.target_fps,
            "raised_goal_tried": tried,
            "pfq_vs_unpruned": {"LUT_ratio": lut, "fps_ratio": pruned.throughput_fps / reference.throughput_fps,
                                "larger": larger,
                                "verdict": "larger" if larger else "slower" if slower else "no larger"}}


UNPRUNED_CALIBRATION_IMAGES = 64  # FINN's resource estimate depends on shapes and bit widths, not on scale values


def unpruned_design(c: Compilation, build):
    """FINN's design (FinnEstimate) of the *unpruned* architecture at the same bits, clock and folding goal: what
    hardware-aware PfQ (``pfq.channel_multiple``) must not exceed. The float model is quantized like the compiled
    one, calibrated on a few images (FINN's resources depend on shapes and bit widths) and estimated by FINN,
    without golden checks."""
    import copy

    from pfq_edge.export.qonnx import export_qonnx
    from pfq_edge.quantize import calibrate, quantize_model
    from pfq_edge.targets.backends.finn.driver import finn_estimate, is_branchy

    build.mkdir(parents=True, exist_ok=True)
    model = quantize_model(copy.deepcopy(c.float_model), c.profile.quant)
    calibrate(model, c.data.train.take(UNPRUNED_CALIBRATION_IMAGES).images)
    qonnx = export_qonnx(model, c.data.test.take(1).images, build / QONNX_FILE)
    return finn_estimate(qonnx, c.profile.fpga, pixel_bits(c), build, clip_thresholds=c.spec.normalization is not None,
                         branchy=is_branchy(qonnx), description="FINN estimate, unpruned architecture")


def _zero_note(fpga: dict, fit: dict) -> str:
    bounded = [r for r in fpga["layers"] if r.get("bounded")]
    text = ""
    if bounded:
        finn = fpga.get("finn_totals", {}).get("LUT", fpga["totals"]["LUT"])
        text = (f"\\* FINN estimated {len(bounded)} layer(s) at 0 LUT, 0 BRAM/URAM, 0 DSP (its estimate counts only "
                f"stored parameters for them); pfq-edge bounds each from its stream widths "
                f"(targets/backends/finn/zero_estimates.py): +{fpga['totals']['LUT'] - finn:.0f} LUT over FINN's "
                f"{finn:.0f}, included in the fit verdict.")
    if fit.get("incomplete"):
        text += (" " if text else "") + (f"**Estimate incomplete**: FINN gives 0 resources for the compute layer(s) "
                                          f"{', '.join(fit['incomplete'])}; no fit verdict rests on that.")
    return text or "FINN estimated every layer (no zero estimates)."


def _vs_unpruned(ref: dict | None) -> str | None:
    """One summary cell: "no larger (LUT 0.93×, 1.05× fps)", or why there is no comparison."""
    if not ref:
        return None
    if "not_built" in ref:
        return "same architecture (nothing removed)" if ref.get("same") else "not built"
    cmp = ref["pfq_vs_unpruned"]
    return f"{cmp['verdict']} (LUT {cmp['LUT_ratio']:.2f}×, {cmp['fps_ratio']:.2f}× fps)"


def _unpruned_lines(fpga: dict) -> list[str]:
    ref = fpga.get("unpruned")
    if not ref:
        return []
    if "not_built" in ref:
        if ref.get("same"):
            return [f"- No separate unpruned design: {ref['not_built']}."]
        return [f"- The unpruned architecture was not built for comparison ({ref['not_built']}; "
                f"`--compare-unpruned` builds it)."]
    cmp, res = ref["pfq_vs_unpruned"], ("LUT", "BRAM_18K", "DSP")
    goal, tried = ref.get("folding_goal_fps"), ref.get("raised_goal_tried")
    if tried:
        raised = (f"; folded for {tried['target_fps']} fps PfQ's design needed {tried['totals']['LUT']:.0f} LUT / "
                  f"{tried['totals']['BRAM_18K']:.0f} BRAM_18K, more than the unpruned design: the profile's goal "
                  f"was used")
    elif goal and goal != ref.get("profile_target_fps"):
        raised = (f"; PfQ's design folded for {goal} fps, the unpruned design's throughput (FINN's folding of it "
                  f"overshoots the profile's target)")
    else:
        raised = ""
    return [f"- PfQ's design vs the unpruned architecture (same bits): **{cmp['verdict']}** — "
            + ", ".join(f"{r} {fpga['totals'][r]:.0f} vs {ref['totals'][r]:.0f}" for r in res)
            + f", {fpga['throughput_fps']:.0f} vs {ref['throughput_fps']:.0f} fps (unpruned: {ref['fit']}{raised})"]


def pixel_bits(c: Compilation) -> int:
    """Bits of the integer pixels FINN's accelerator takes: the input quantizer's, or 8 (UINT8 pixels) when the
    model normalises its input (the normalised values are quantized after the absorbed Sub/Div)."""
    return 8 if c.spec.normalization is not None else c.profile.quant.input_bit_width


class FinnBackend(Backend):
    """kind "fpga": QONNX → FINN estimate (see the module docstring)."""

    name = "finn"
    section = "fpga"
    export_format = "qonnx"
    engines = ("qonnx",)
    plots = {"finn_layers": "FINN per-layer cycles and resources"}

    @property
    def steps(self) -> list[Step]:
        return [Step("export", export, requires=("finetune",), reads=("quant",), golden=("export",)),
                Step("estimate", estimate, requires=("export",), reads=("fpga", "budget", "quant"),
                     golden=("finn",))]

    def validate_profile(self, profile) -> str | None:
        if profile.quant.bias != "float":
            return ("quant.bias must stay \"float\" in an fpga profile (FINN absorbs biases into its thresholds; its "
                    "QONNX import rejects int32 bias quantizers)")
        return None

    def channel_multiple(self, profile) -> int:
        # FINN folds an MVAU by SIMD (a divisor of its input channels, SIMD × weight bits ≤ SetFolding's
        # mvau_wwidth_max, 36) and PE (a divisor of its output channels): channel counts that stay multiples of
        # the largest power of two under that cap keep every fold FINN chose for the unpruned layer available.
        cap = max(1, MVAU_WWIDTH_MAX // profile.quant.weight_bit_width)
        return 1 << (cap.bit_length() - 1)

    def check_tools(self, profile) -> None:
        from pfq_edge.targets.backends.finn.fit import check_fpga_profile

        check_fpga_profile(profile)

    def check_config(self, profile, config, several: bool) -> None:
        from pfq_edge.errors import PfqError

        if config.tuning_db is not None:
            raise PfqError("--tuning-db applies to one target measured on this machine (cpu-x86); " + (
                "several targets given" if several else f"{profile.name!r} is an FPGA target"))

    def profile_facts(self, profile) -> dict:
        f = profile.fpga
        return {"part": f.part, "board": f.board, "clock_mhz": f.clock_mhz, "target_fps": f.target_fps}

    def device_and_goal(self, facts: dict) -> tuple[str, str]:
        return f"{facts['part']} @ {facts['clock_mhz']:g} MHz (FINN)", f"{facts['target_fps']} fps"

    def summary(self, c) -> dict:
        export, est = c.result("export"), c.result("estimate")
        e, v = est.estimate, est.verdicts
        return {"qonnx_bytes": export.bytes, "latency_us": e["latency_us"], "throughput_fps": e["throughput_fps"],
                **{r: e["totals"][r] for r in ("LUT", "BRAM_18K", "URAM", "DSP")},
                "fit": v["fit"]["verdict"], "latency_verdict": v["latency"]["verdict"],
                "latency_budget_ms": v["latency"]["budget_ms"],
                "vs_unpruned": _vs_unpruned(getattr(est, "unpruned", None))}

    def summary_rows(self, s: dict) -> list[list]:
        rows = [["biases (float, not in the weight bits)", f"{s['bias_params']:,} parameters"],
                ["QONNX file (weights stored as float32)", f"{s['qonnx_bytes']:,} bytes"]] if "qonnx_bytes" in s else []
        if "latency_us" in s:
            budget = s.get("latency_verdict", "—") + (f" ({s['latency_budget_ms']} ms)" if "latency_budget_ms" in s
                                                      else "")  # reports written before it was recorded lack it
            rows += [["FINN latency", f"{s['latency_us']:.1f} µs"],
                     ["FINN throughput", f"{s['throughput_fps']:.0f} fps"],
                     ["LUT / BRAM_18K / DSP", f"{s['LUT']:.0f} / {s['BRAM_18K']:.0f} / {s['DSP']:.0f}"],
                     ["fit", s.get("fit", "—")], ["latency budget", budget]]
            if s.get("vs_unpruned"):
                rows.append(["PfQ's design vs unpruned", s["vs_unpruned"]])
        return rows

    def latency_cell(self, row: dict) -> str:
        return f"{row['latency_us'] / 1000:.3f} ms (FINN estimate)"

    def budget_missed(self, s: dict) -> str | None:
        if s.get("fit") == "does not fit":
            return "the FINN estimate does not fit the board (report.md, 'FPGA estimate')"
        if s.get("fit") == "estimate incomplete":
            return "FINN estimated a compute layer at 0 resources: no fit verdict (report.md, 'FPGA estimate')"
        if s.get("latency_verdict") == "misses":
            return (f"FINN latency {s['latency_us'] / 1000:.3f} ms exceeds the latency budget of "
                    f"{s.get('latency_budget_ms', '?')} ms")
        return None

    def markdown(self, doc: dict) -> list[str]:
        from pfq_edge.report import table

        fpga = doc["stages"].get("estimate", {})
        if not fpga:
            return []
        fit, lat = fpga["verdicts"]["fit"], fpga["verdicts"]["latency"]
        return ["## FPGA estimate (FINN, no synthesis)", "",
                f"Part {fpga['part']} at {fpga['clock_mhz']} MHz: latency **{fpga['latency_us']:.1f} µs**, throughput "
                f"**{fpga['throughput_fps']:.0f} fps** (bottleneck {fpga['bottleneck']}).", "",
                f"- Fit ({fit['board']}, ≤ {fit['max_utilization']:.0%} of each resource): **{fit['verdict']}** — " +
                ", ".join(f"{r} {fpga['totals'][r]:.0f}/{fit['capacity'][r]} ({u:.1%})"
                          for r, u in fit["utilization"].items()),
                f"- Latency budget {lat['budget_ms']} ms: **{lat['verdict']}** ({lat['latency_ms']:.3f} ms)",
                *_unpruned_lines(fpga), "",
                _zero_note(fpga, fit), "",
                table(["layer", "cycles", "LUT", "BRAM_18K", "URAM", "DSP"],
                      [[r["layer"], r["cycles"], f"{r['LUT']:.0f}" + (" *" if r.get("bounded") else ""),
                        f"{r['BRAM_18K']:.0f}", f"{r['URAM']:.0f}", f"{r['DSP']:.0f}"] for r in fpga["layers"]]), ""]

    def render_plots(self, doc: dict, folder, title: str) -> list[str]:
        from pfq_edge import plots

        layers = doc["stages"].get("estimate", {}).get("layers")
        if not layers:
            return []
        plots.plot_finn_layers(layers, f"{title}: FINN estimate per layer", folder / "finn_layers.png")
        return ["finn_layers"]

    def manifest(self, c) -> dict:
        est = c.result("estimate")
        e, v = est.estimate, est.verdicts
        return {"latency": {"source": "FINN estimate (no synthesis)", "latency_ms": e["latency_us"] / 1000,
                            "throughput_fps": e["throughput_fps"], "budget_ms": c.profile.budget.latency_ms,
                            "verdict": v["latency"]["verdict"], "fit": v["fit"]["verdict"], "resources": e["totals"]},
                "runtime": {"engine": "qonnx", "onnx": QONNX_FILE, "batch_size": 1,
                            "accelerator_input": f"UINT{pixel_bits(c)} pixels (N, {', '.join(map(str, c.spec.shape))})"
                            " after the recorded preprocessing" + (", mean/std absorbed into the first thresholds"
                                                                   if c.spec.normalization else "")}}

    def device_readme(self, info: dict) -> list[str]:
        lat = info["latency"]
        return ["`run.py` executes `model.qonnx.onnx` with qonnx (`pip install qonnx numpy`) on a CPU — the "
                "model FINN verifies its hardware against:", "", "    python run.py images/   # image files, a folder of them, or an .npz", "",
                f"The accelerator takes {info['runtime']['accelerator_input']}.", "",
                "To build the bitfile and PYNQ driver where Vivado is installed (FINN, finn-plus):", "",
                "    cd finn_build && PYTHONPATH=. finn build dataflow_build_config.json model.onnx", "",
                f"It uses the folding of `folding_config.json` (the estimate: {lat['latency_ms']:.3f} ms, "
                f"{lat['throughput_fps']:.0f} fps on {info['profile']['fpga']['part']} at "
                f"{info['profile']['fpga']['clock_mhz']:g} MHz; fit: {lat['fit']}). `finn_reports/` holds FINN's "
                "per-layer estimates."]
