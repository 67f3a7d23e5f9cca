"""The one Report every stage appends to, rendered as report.json (machine-readable), report.md and PNG plots
(people). report.json holds what the compile computed, never wall-clock facts, so that it is reproducible; stage
times go to run.json beside it (not into the package).

report.json, schema version 2: {schema_version, model, target, kind, summary, stages: {load, accuracy, prune,
quantize, finetune, export, estimate | build + measure, package}} (README, "report.json").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SCHEMA_VERSION = 2
PLOTS = {"folded_range": "folded-weight range per layer, before and after PfQ",
         "accuracy_size": "accuracy against logical weight size, per stage",
         "finn_layers": "FINN per-layer cycles and resources",
         "latency": "latency per engine"}


@dataclass
class Report:
    """``stages[name]`` holds each stage's results (plain JSON data); ``summary`` the headline numbers."""

    model: str
    target: str
    kind: str = "fpga"
    stages: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)  # wall times: written to run.json, not report.json
    plots: list = field(default_factory=list)

    def add(self, stage: str, data: dict) -> None:
        self.stages.setdefault(stage, {}).update(data)

    def to_json(self) -> str:
        doc = {"schema_version": SCHEMA_VERSION, "model": self.model, "target": self.target, "kind": self.kind,
               "summary": self.summary, "stages": self.stages, "plots": self.plots}
        return json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n"

    def to_markdown(self) -> str:
        return render_markdown(json.loads(self.to_json()))


ACCURACY_LABELS = {"float": "float model (as given)", "pfq_float": "after PfQ (float)",
                   "quantized_ptq": "quantized, before fine-tuning (PTQ)", "finetuned": "after QAT fine-tuning",
                   "deployed": "deployed TVM library (fresh process, all test images)"}


def _jsonable(obj):
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _cell(value) -> str:
    return str(value).replace("|", "\\|")  # a bare | would split the Markdown cell


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(doc: dict) -> str:
    """report.md from a report.json document."""
    s, st = doc["summary"], doc["stages"]
    out = [f"# pfq-edge compile: `{doc['model']}` for `{doc['target']}`", ""]
    out += ["## Summary", "", _table(["quantity", "value"], summary_rows(s)), ""]
    prune = st.get("prune", {})
    if prune:
        out += _prune_section(prune)
    out += _settings_section(st.get("quantize", {}), st.get("finetune", {}))
    acc = st.get("accuracy", {})
    if acc:
        out += ["## Accuracy (top-1, Fashion-MNIST test set)", "",
                _table(["stage", "top-1"], [[ACCURACY_LABELS.get(k, k), _pct(v)] for k, v in acc.items()]), ""]
    golden = [g for g in (prune.get("golden"), prune.get("guard"), st.get("export", {}).get("golden"),
                          st.get("build", {}).get("golden")) if g]
    if golden:
        out += ["## Golden checks", "", _table(
            ["stage", "images", "max abs diff", "top-1 agreement", "images with |Δ| > atol", "passed"],
            [[g["stage"], g["images"], f"{g['max_abs_diff']:.3g}", _pct(g["argmax_agreement"]),
              f"{g['mismatched_images']} (atol {g['atol']}, allowed {g['max_mismatch_fraction']:.0%})"
              if g["atol"] is not None else "— (top-1 agreement only)", g["passed"]]
             for g in golden]), "",
                "Images with |Δ| > atol are one-step rounding flips: float32 sums in another order land a value on the "
                "other side of a quantization boundary (see pfq_edge/golden.py).", ""]
    fpga = st.get("estimate", {})
    if fpga:
        fit, lat = fpga["verdicts"]["fit"], fpga["verdicts"]["latency"]
        out += ["## FPGA estimate (FINN, no synthesis)", "",
                f"Part {fpga['part']} at {fpga['clock_mhz']} MHz: latency **{fpga['latency_us']:.1f} µs**, throughput "
                f"**{fpga['throughput_fps']:.0f} fps** (bottleneck {fpga['bottleneck']}).", "",
                f"- Fit ({fit['board']}, ≤ {fit['max_utilization']:.0%} of each resource): **{fit['verdict']}** — " +
                ", ".join(f"{r} {fpga['totals'][r]:.0f}/{fit['capacity'][r]} ({u:.1%})"
                          for r, u in fit["utilization"].items()),
                f"- Latency budget {lat['budget_ms']} ms: **{lat['verdict']}** ({lat['latency_ms']:.3f} ms)", "",
                "FINN's estimates undercount some LUTs (pooling and float element-wise nodes report 0).", "",
                _table(["layer", "cycles", "LUT", "BRAM_18K", "URAM", "DSP"],
                       [[r["layer"], r["cycles"], f"{r['LUT']:.0f}", f"{r['BRAM_18K']:.0f}", f"{r['URAM']:.0f}",
                         f"{r['DSP']:.0f}"] for r in fpga["layers"]]), ""]
    if st.get("build"):
        out += _runtime_section(st.get("export", {}), st["build"], st.get("measure", {}))
    plots = [k for k in PLOTS if k in doc.get("plots", [])]
    if plots:
        out += ["## Plots", ""] + [f"![{PLOTS[k]}](plots/{k}.png)" for k in plots] + [""]
    return "\n".join(out)


def plot_points(doc: dict) -> list[dict]:
    """Accuracy-vs-size points of one report: float and PfQ float at 32 bits per weight, PTQ and fine-tuned at the
    quantized logical size."""
    s, st = doc["summary"], doc["stages"]
    params = st.get("load", {}).get("parameters")
    kept = sum(r["params"] for r in st.get("quantize", {}).get("layers", []))  # conv/linear weights after PfQ
    label = s.get("bits", "").split(" ")[0]
    return [{"label": "float (all parameters)", "top1": s.get("float_top1"), "weight_bits": params and 32 * params},
            {"label": "PfQ float (weights)", "top1": s.get("pfq_top1"), "weight_bits": 32 * kept},
            {"label": f"{label} PTQ", "top1": s.get("quantized_top1"), "weight_bits": s.get("weight_bits")},
            {"label": f"{label} fine-tuned", "top1": s.get("finetuned_top1"), "weight_bits": s.get("weight_bits")}]


def render_plots(doc: dict, folder) -> list[str]:
    """Write the PNG plots a report.json document has data for into ``folder``; returns their keys (PLOTS)."""
    from pathlib import Path

    from pfq_edge import plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st, name = doc["stages"], f"{doc['model']} → {doc['target']}"
    done = []
    layers = st.get("prune", {}).get("layers")
    if layers:
        plots.plot_folded_ranges(layers, f"{name}: folded weight range before/after PfQ", folder / "folded_range.png")
        done.append("folded_range")
    plots.plot_accuracy_vs_size(plot_points(doc), f"{name}: top-1 vs logical weight size", folder / "accuracy_size.png")
    done.append("accuracy_size")
    if st.get("estimate", {}).get("layers"):
        plots.plot_finn_layers(st["estimate"]["layers"], f"{name}: FINN estimate per layer", folder / "finn_layers.png")
        done.append("finn_layers")
    engines = st.get("measure", {}).get("engines")
    if engines:
        plots.plot_latency(engines, st["measure"]["verdict"].get("budget_ms"), f"{name}: latency per call",
                           folder / "latency.png")
        done.append("latency")
    return done


def _prune_section(prune: dict) -> list[str]:
    rule = prune.get("rule", "exact")
    if rule == "off":
        return ["## PfQ", "", "Rule `off`: no filter removed (plain quantization-aware fine-tuning).", ""]
    check = prune.get("golden") or prune.get("guard") or {}
    where = "calibration" if rule == "bn-epsilon" else "test"
    text = ("post-BN std ≤ %g (exact; design.md §2)" % prune.get("tol") if rule == "exact" else
            "bn-epsilon: running_var ≤ ε treated as constant and replaced by β (approximate; guarded by top-1 "
            f"agreement ≥ {_pct(check.get('min_agreement'))} on the calibration images)")
    out = ["## PfQ: constant filters removed", "",
           f"Rule: {text}. Filters removed: **{prune.get('filters_removed', 0)}**. Output change on "
           f"{check.get('images')} {where} images: max |Δlogit| {check.get('max_abs_diff', 0):.3g}, top-1 agreement "
           f"{_pct(check.get('argmax_agreement'))} "
           f"({'exact' if prune.get('exact') else 'approximate'}).", ""]
    rows = [[r["layer"], r["kind"], r["channels_before"], r["channels_after"], r["constant_filters"],
             r["removed_filters"], r["range_inflating_filters"], f"{r['folded_max_abs_before']:.3g}",
             f"{r['folded_max_abs_after']:.3g}", f"{r['zero_fraction_before']:.1%}",
             f"{r['zero_fraction_after']:.1%}"] for r in prune.get("layers", [])]
    out += [f"Folded-weight range (max |W'|) and the share of weights that round to 0 with a per-tensor "
            f"{prune.get('bits')}-bit step, before and after PfQ:", "",
            _table(["layer", "kind", "channels before", "after", "constant filters", "filters removed",
                    "σ²≤ε kept", "folded max|W'| before", "after", "→0 before", "after"], rows), "",
            "Filters removed include depthwise channels fed by a removed filter and filters whose only reader "
            "was a removed depthwise channel.", ""]
    left = prune.get("constant_left", [])
    out.append(f"Constant filters (by this rule): {prune.get('constant_total', 0)} found, "
               f"{prune.get('constant_removed', 0)} removed" + ("; left, with the reason:" if left else "."))
    out += [f"- `{x['layer']}`: {x['filters']} constant filters left — {x['reason']}" for x in left]
    out += [f"- warning: {w}" for w in prune.get("warnings", [])]
    return out + [""]


def _runtime_section(export: dict, build: dict, measured: dict) -> list[str]:
    """CPU/GPU targets: the QCDQ model, the TVM build and what was checked, latency per engine, the verdict."""
    target = build["target"]
    out = ["## CPU/GPU build (QCDQ → TVM)", "",
           f"- QCDQ ONNX `{export.get('file')}` ({export.get('bytes', 0):,} bytes, batch {export.get('batch_size')}).",
           f"- TVM target `{json.dumps(target)}`; library `{build['library']}` ({build['elf'].get('class')} "
           f"{build['elf'].get('type')}, {build['elf'].get('machine')}) (build and tuning times: run.json)."]
    tuning = build.get("tuning") or {}
    if tuning:
        out.append(f"- MetaSchedule: {tuning['trials_run']} trials run over {tuning['tasks']} tasks "
                   f"({tuning['reused_trials']} reused from a previous run), {tuning['records']} records in `tvm_tuning/` "
                   f"(kept in the output folder, not the package).")
    else:
        out.append("- Schedules: TVM defaults (untuned; `--tune-trials N` tunes with MetaSchedule).")
    golden = build.get("golden")
    out.append(f"- Reloaded in a fresh process and run on {golden['images']} test images: top-1 agreement with the "
               f"QCDQ model {_pct(golden['argmax_agreement'])}, max |Δlogit| {golden['max_abs_diff']:.3g}."
               if golden else f"- **Not run here**: {build.get('not_run')}.")
    device = build.get("device_code")
    if device is not None:
        out.append(f"- CUDA device code for {device['arch']}: " +
                   (f"compiled with {device['compiler']} (`{device['file']}`, {device['bytes']:,} bytes)."
                    if device["compiled"] else f"not compiled ({device['reason']}).") +
                   " The library carries CUDA C that TVM's runtime compiles when it loads on the device; no GPU "
                   "figure is claimed.")
    levels = export.get("onnxruntime_levels") or {}
    if levels:
        out += ["", "onnxruntime against the QCDQ graph as written (optimizations off) on the same images — from "
                "level extended on it fuses Q/DQ into integer kernels, which round differently (images move by a step) "
                "and must not change the classification:", "",
                _table(["optimization level", "top-1 agreement", "max |Δlogit|", "images off by > 1e-3",
                        "computes the model? (≥ 99% top-1 agreement)"],
                       [[k, _pct(v["argmax_agreement"]), f"{v['max_abs_diff']:.3g}",
                         f"{v['mismatched_images']}/{v['images']}", "yes" if v["passed"] else "no"]
                        for k, v in levels.items()]), ""]
    engines = measured.get("engines") or []
    verdict = measured.get("verdict", {})
    if engines:
        tvm_ms = engines[0]["median_ms"]
        out += [f"Latency per call, batch {measured['batch_size']}, {measured['threads']} threads, each engine in its "
                f"own process, {engines[0]['warmup']} warm-up calls dropped, ≥ 1 s of timed calls:", "",
                _table(["engine", "median ms", "p90 ms", "min ms", "max ms", "calls", "TVM median ÷ engine median"],
                       [[e["label"], f"{e['median_ms']:.4f}", f"{e['p90_ms']:.4f}", f"{e['min_ms']:.4f}",
                         f"{e.get('max_ms', float('nan')):.4f}", e["repeats"], f"{tvm_ms / e['median_ms']:.3g}"]
                        for e in engines]), "",
                "A ratio below 1 means TVM is faster than that engine."]
    if verdict:
        out.append(f"Latency budget {verdict['budget_ms']} ms: **{verdict['verdict']}**" +
                   (f" (TVM {verdict['latency_ms']:.3f} ms)." if verdict.get("latency_ms") is not None
                    else f" — {verdict.get('reason')}."))
    return out + [""]


def _settings_section(quant: dict, ft: dict) -> list[str]:
    """What the quantize and finetune stages were asked to do, and what fine-tuning did."""
    if not quant:
        return []
    layers = quant.get("layers", [])
    edge = f"first layer {layers[0]['bit_width']}-bit, last layer {layers[-1]['bit_width']}-bit" if layers else ""
    rows = [["weights / activations / input", f"{quant.get('weight_bit_width')} / {quant.get('act_bit_width')} / "
                                                f"{quant.get('input_bit_width')} bits ({edge})"],
            ["weight scales", quant.get("weight_granularity")], ["BatchNorm", quant.get("bn")],
            ["cross-layer equalization / bias correction", f"{quant.get('equalize')} / {quant.get('bias_correction')}"],
            ["calibration images", quant.get("calibration_images")]]
    if ft.get("skipped"):
        rows.append(["fine-tuning", "skipped (0 epochs)"])
    elif ft:
        rows += [["fine-tuning", f"{ft['epochs']} epochs × {ft['images_per_epoch']:,} images, {ft['optimizer']}, "
                                 f"lr {ft['lr']:g}, batch {ft['batch_size']}, seed {ft['seed']}, "
                                 f"{ft['processes']} process(es)"],
                 ["distillation α / T", f"{ft['distill_alpha']:g} / {ft['distill_temperature']:g}"],
                 ["loss per epoch", ", ".join(f"{x:.4f}" for x in ft["loss"])]]
        if ft.get("validation_top1"):
            rows += [["validation top-1 per epoch", ", ".join(_pct(x) for x in ft["validation_top1"])],
                     ["kept epoch", f"{ft['best_epoch']} (early stop: {ft['stopped_early']})"]]
        if ft.get("resumed_after_epoch"):
            rows.append(["resumed after epoch", ft["resumed_after_epoch"]])
    return ["## Quantization and fine-tuning", "", _table(["setting", "value"], rows), ""]


def summary_rows(s: dict) -> list[list]:
    """The summary as (quantity, value) rows, shared by report.md and the terminal table."""
    rows = [
        ["float top-1", _pct(s.get("float_top1"))],
        ["after PfQ (float) top-1", _pct(s.get("pfq_top1"))],
        ["quantized (before fine-tuning) top-1", _pct(s.get("quantized_top1"))],
        ["fine-tuned top-1", _pct(s.get("finetuned_top1"))],
        *([["deployed top-1 (TVM library, all test images)", _pct(s["deployed_top1"])]]
          if s.get("deployed_top1") is not None else []),
        ["bits (weights/activations/input)", s.get("bits", "—")],
        ["PfQ rule / filters removed", f"{s.get('pfq_rule', 'exact')} / {s.get('filters_removed', '—')}"],
        ["logical weight size", f"{s['weight_bits']:,} bits ({s['weight_bits'] / 8 / 1024:.1f} KiB)"
         if "weight_bits" in s else "—"],
        ["weights quantized to 0", _pct(s.get("zero_weight_fraction"))],
    ]
    if "qonnx_bytes" in s:
        rows += [["biases (float, not in the weight bits)", f"{s['bias_params']:,} parameters"],
                 ["QONNX file (weights stored as float32)", f"{s['qonnx_bytes']:,} bytes"]]
    if "qcdq_bytes" in s:
        rows += [["QCDQ ONNX file", f"{s['qcdq_bytes']:,} bytes"],
                 ["TVM library", f"{s.get('library')} (" + {True: "golden check passed in a fresh process",
                                                            False: "golden check failed",
                                                            None: "cross-compiled: not run here"}[
                     s.get("tvm_golden")] + ")"]]
    if "latency_ms_tvm" in s:
        rows += [["latency TVM / onnxruntime / torch (median)", " / ".join(
            f"{s.get('latency_ms_' + e, float('nan')):.3f}" for e in ("tvm", "onnxruntime", "torch")) + " ms"]]
    if s.get("latency_verdict") and "latency_us" not in s:
        rows += [["latency budget", f"{s['latency_verdict']} ({s.get('latency_budget_ms')} ms)"]]
    if "latency_us" in s:
        rows += [
            ["FINN latency", f"{s['latency_us']:.1f} µs"],
            ["FINN throughput", f"{s['throughput_fps']:.0f} fps"],
            ["LUT / BRAM_18K / DSP", f"{s['LUT']:.0f} / {s['BRAM_18K']:.0f} / {s['DSP']:.0f}"],
            ["fit", s.get("fit", "—")],
            ["latency budget", s.get("latency_verdict", "—")],
        ]
    return rows


def rerender(folder) -> dict:
    """Rewrite ``folder``/report.md and ``folder``/plots/*.png from ``folder``/report.json; returns the document.
    Everything is rendered first and swapped in at the end, so a failure changes nothing. Raises PfqError (exit 2)
    if the folder has no readable report.json of this schema version, OutputError if it cannot be written."""
    import shutil
    import tempfile
    from pathlib import Path

    from pfq_edge.errors import OutputError, PfqError
    from pfq_edge.io import atomic_write_text

    folder = Path(folder)
    path = folder / "report.json"
    if not path.is_file():
        raise PfqError(f"{folder} has no report.json (is it an output folder of `pfq-edge compile`?)")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
            found = doc.get("schema_version") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"schema_version {found!r}; this pfq-edge reads version {SCHEMA_VERSION}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise PfqError(f"{path} is not a report.json of this version: {exc}") from None
    try:
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".plots."))
    except OSError as exc:
        raise OutputError(f"cannot write into {folder}: {exc.strerror}") from None
    try:
        doc["plots"] = render_plots(doc, staging)
        text = render_markdown(doc)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PfqError(f"{path} does not hold what a report needs ({type(exc).__name__}: {exc})") from None
    try:
        shutil.rmtree(folder / "plots", ignore_errors=True)
        staging.rename(folder / "plots")
        atomic_write_text(folder / "report.md", text)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot write into {folder}: {exc.strerror}") from None
    return doc


def summary_rows_multi(doc: dict) -> tuple[list[str], list[list]]:
    """Header and rows of the multi-target summary: one row per target (summary.md and the terminal table)."""
    head = ["target", "kind", "bits", "PfQ filters removed", "quantized top-1", "deployed top-1", "weight size",
            "latency", "budget", "fit", "package"]
    rows = []
    for r in doc["targets"]:
        if "latency_us" in r:
            latency = f"{r['latency_us'] / 1000:.3f} ms (FINN estimate)"
        elif r.get("latency_ms") is not None:
            latency = f"{r['latency_ms']:.3f} ms (TVM, measured)"
        else:
            latency = "not measured (cross-compiled)"
        rows.append([r["target"], r["kind"], r.get("bits", "—").split(",")[0], r.get("filters_removed", "—"),
                     _pct(r.get("finetuned_top1") if r.get("finetuned_top1") is not None else r.get("quantized_top1")),
                     _pct(r.get("deployed_top1")), f"{r['weight_bits'] / 8 / 1024:.1f} KiB",
                     latency, r.get("latency_verdict", "—"), r.get("fit", "—"), r["archive"]])
    return head, rows


def summary_table(doc: dict) -> str:
    """summary.md of a multi-target compile."""
    head, rows = summary_rows_multi(doc)
    return "\n".join([f"# pfq-edge compile: `{doc['model']}` for {len(rows)} targets", "",
                      "Targets with the same bit widths and fine-tuning settings share one fine-tuned model; each "
                      "folder holds that target's report.md. Quantized top-1: after fine-tuning, or before it (PTQ) "
                      "with --epochs 0; deployed top-1: the TVM library in a fresh process (targets run here).", "",
                      _table(head, rows), "",
                      "![top-1 vs logical weight size per target](accuracy_size.png)", ""])
