"""The one Report every stage appends to, rendered as report.json (machine-readable) and report.md (people)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SCHEMA_VERSION = 1


@dataclass
class Report:
    """``stages[name]`` holds each stage's results (plain JSON data); ``summary`` the headline numbers."""

    model: str
    target: str
    stages: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)

    def add(self, stage: str, data: dict) -> None:
        self.stages.setdefault(stage, {}).update(data)

    def to_json(self) -> str:
        doc = {"schema_version": SCHEMA_VERSION, "model": self.model, "target": self.target,
               "summary": self.summary, "stages": self.stages, "timings_s": self.timings_s}
        return json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n"

    def to_markdown(self) -> str:
        return render_markdown(json.loads(self.to_json()))


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
        out += ["## PfQ: constant filters removed", "",
                f"Rule: post-BN std ≤ {prune.get('tol')} (design.md §2). Filters removed: "
                f"**{prune.get('filters_removed', 0)}**. Output change on {prune.get('golden', {}).get('images')} "
                f"test images: max |Δlogit| {prune.get('golden', {}).get('max_abs_diff', 0):.3g}, top-1 agreement "
                f"{_pct(prune.get('golden', {}).get('argmax_agreement'))} "
                f"({'exact' if prune.get('exact') else 'approximate at zero-padded borders'}).", ""]
        rows = [[r["layer"], r["kind"], r["channels_before"], r["channels_after"], r["constant_filters"],
                 r["removed_filters"], r["range_inflating_filters"], f"{r['folded_max_abs_before']:.3g}",
                 f"{r['folded_max_abs_after']:.3g}", f"{r['zero_fraction_before']:.1%}",
                 f"{r['zero_fraction_after']:.1%}"] for r in prune.get("layers", [])]
        out += [f"Folded-weight range (max |W'|) and the share of weights that round to 0 with a per-tensor "
                f"{prune.get('bits')}-bit step, before and after PfQ:", "",
                _table(["layer", "kind", "channels before", "after", "constant filters", "filters removed",
                        "σ²≤ε but informative", "folded max|W'| before", "after", "→0 before", "after"], rows), "",
                "Filters removed include depthwise channels fed by a removed filter and filters whose only reader "
                "was a removed depthwise channel.", ""]
        out.append(f"Constant filters: {prune.get('constant_total', 0)} found, {prune.get('constant_removed', 0)} "
                   f"removed; each one left is listed with its reason:")
        for left in prune.get("constant_left", []):
            out.append(f"- `{left['layer']}`: {left['filters']} constant filters left — {left['reason']}")
        for w in prune.get("warnings", []):
            out.append(f"- warning: {w}")
        out.append("")
    acc = st.get("accuracy", {})
    if acc:
        out += ["## Accuracy (top-1, Fashion-MNIST test set)", "",
                _table(["stage", "top-1"], [[k, _pct(v)] for k, v in acc.items()]), ""]
    golden = [g for g in (st.get("prune", {}).get("golden"), st.get("export", {}).get("golden")) if g]
    if golden:
        out += ["## Golden checks", "", _table(
            ["stage", "images", "max abs diff", "top-1 agreement", "images with |Δ| > atol", "passed"],
            [[g["stage"], g["images"], f"{g['max_abs_diff']:.3g}", _pct(g["argmax_agreement"]),
              f"{g['mismatched_images']} (atol {g['atol']}, allowed {g['max_mismatch_fraction']:.0%})", g["passed"]]
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
    if doc.get("timings_s"):
        out += ["## Stage times", "", _table(["stage", "seconds"],
                                              [[k, f"{v:.1f}"] for k, v in doc["timings_s"].items()]), ""]
    return "\n".join(out)


def summary_rows(s: dict) -> list[list]:
    """The summary as (quantity, value) rows, shared by report.md and the terminal table."""
    rows = [
        ["float top-1", _pct(s.get("float_top1"))],
        ["after PfQ (float) top-1", _pct(s.get("pfq_top1"))],
        ["quantized (before fine-tuning) top-1", _pct(s.get("quantized_top1"))],
        ["fine-tuned top-1", _pct(s.get("finetuned_top1"))],
        ["bits (weights/activations/input)", s.get("bits", "—")],
        ["PfQ rule / filters removed", f"{s.get('pfq_rule', 'exact')} / {s.get('filters_removed', '—')}"],
        ["logical weight size", f"{s['weight_bits']:,} bits ({s['weight_bits'] / 8 / 1024:.1f} KiB)"
         if "weight_bits" in s else "—"],
        ["weights quantized to 0", _pct(s.get("zero_weight_fraction"))],
    ]
    if "qonnx_bytes" in s:
        rows += [["biases (float, not in the weight bits)", f"{s['bias_params']:,} parameters"],
                 ["QONNX file (weights stored as float32)", f"{s['qonnx_bytes']:,} bytes"]]
    if "latency_us" in s:
        rows += [
            ["FINN latency", f"{s['latency_us']:.1f} µs"],
            ["FINN throughput", f"{s['throughput_fps']:.0f} fps"],
            ["LUT / BRAM_18K / DSP", f"{s['LUT']:.0f} / {s['BRAM_18K']:.0f} / {s['DSP']:.0f}"],
            ["fit", s.get("fit", "—")],
            ["latency budget", s.get("latency_verdict", "—")],
        ]
    return rows
