"""The report of a compile: report.json (machine-readable), report.md and PNG plots (people), rendered from the
Compilation's step results. Nothing reads a report back during a compile; ``pfq-edge report`` re-renders report.md
and the plots from report.json alone. report.json holds what the compile computed, never wall-clock facts, so that
it is reproducible; step times go to run.json beside it (not into the package).

report.json, schema version 2: {schema_version, model, target, kind, summary, stages: {load, accuracy, prune,
quantize, finetune, <the backend's steps>, package}, plots} (docs/package.md, "report.json"). Sections that only
one kind of target has are rendered by its backend (targets/backends/).
"""

from __future__ import annotations

import json

from pfq_edge.pfq import REPLACES
from pfq_edge.targets.profile import wa_label

SCHEMA_VERSION = 2
PLOTS = {"folded_range": "folded-weight range per layer, before and after PfQ",
         "accuracy_size": "accuracy against logical weight size, per stage"}


def report_document(c) -> dict:
    """The report.json document of a Compilation: every finished step's ``report()`` under its name (the top-1
    figures of all steps gathered under "accuracy", right after "load"), and the summary."""
    stages = {}
    for name, result in c.results.items():
        stages[name] = result.report()
        if name == "load":
            stages["accuracy"] = None  # keeps its place in the document
    stages["accuracy"] = c.accuracy
    return {"schema_version": SCHEMA_VERSION, "model": c.config.model, "target": c.profile.name,
            "kind": c.profile.kind, "summary": summary(c), "stages": stages, "plots": []}


def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n"


def summary(c) -> dict:
    """The headline numbers of a compile: the shared front end's, then the backend's (``Backend.summary``)."""
    from pfq_edge.targets.backends import backend_for

    acc, prune, quant = c.accuracy, c.result("prune"), c.result("quantize")
    backend = backend_for(c.profile.kind)
    shared = {"float_top1": acc.get("float"), "pfq_top1": acc.get("pfq_float"),
              "quantized_top1": acc.get("quantized_ptq"), "finetuned_top1": acc.get("finetuned"),
              "deployed_top1": acc.get("deployed"), "bits": backend.bits_label(c.profile.quant),
              "pfq_rule": c.profile.pfq.rule, "filters_removed": prune.filters_removed, "method": method(c),
              "weight_bits": quant.size["weight_bits"], "bias_params": quant.size["bias_params"],
              "zero_weight_fraction": quant.size["zero_weight_fraction"]}
    return {**shared, **backend.summary(c)}


def method(c) -> str:
    """The workflow that ran, in one line: PfQ rule (and channel multiple), scale initialisation, fine-tuning."""
    from pfq_edge.steps import channel_multiple

    p, q, ft = c.profile.pfq, c.profile.quant, c.profile.finetune
    multiple = channel_multiple(c.profile)
    pfq = "no PfQ" if p.rule == "off" else f"PfQ {p.rule}" + (f" (channel multiple {multiple})" if multiple > 1 else "")
    layers = c.result("quantize").size["layers"]  # the bit widths the quantized model has
    first, last = layers[0]["bit_width"], layers[-1]["bit_width"]
    edge = f", first/last layer {first}/{last}-bit" if (first, last) != (q.weight_bit_width,) * 2 else ""
    staged = f"QAT in stages {' → '.join(ft.stages)} ({ft.stage_epochs} epoch{'s' if ft.stage_epochs > 1 else ''} " \
             f"each), then " if ft.stages and ft.epochs else ""
    tune = "no fine-tuning (PTQ)" if ft.epochs == 0 else (
        f"{staged}QAT {ft.epochs} epoch{'s' if ft.epochs > 1 else ''}" + (f", distillation α {ft.distill_alpha:g}" if ft.distill_alpha else ""))
    bn = ", BN kept" + (" (re-estimated)" if q.bn_reestimate else "") if q.resolved_bn() == "keep" else \
        ", BN folded"
    return (f"{pfq} → {q.resolved_scale_init()}-initialised learned scales{edge}{bn}{' + CLE' if q.equalize else ''}"
            f" → {tune}")


def _passed_cell(g: dict) -> str:
    a = g.get("arbiter")
    if not a:
        return str(g["passed"])
    ref, cand = a["reference"], a["candidate"]
    return (f"{g['passed']} by the float64 arbiter: top-1 flips {cand['top1_flips']} (float32 reference "
            f"{ref['top1_flips']}), max |Δ| {cand['max_abs_diff']:.3g} ({ref['max_abs_diff']:.3g}), mean "
            f"{cand['mean_abs_diff']:.3g} ({ref['mean_abs_diff']:.3g})")


def golden_checks(stages: dict) -> list[dict]:
    """The golden checks recorded in a report.json document's stages, in step order."""
    found = [v[k] for v in stages.values() if isinstance(v, dict) for k in ("golden", "guard") if v.get(k)]
    return [g for item in found for g in (item if isinstance(item, list) else [item])]  # a step may run several


ACCURACY_LABELS = {"float": "float model (as given)", "pfq_float": "after PfQ (float)",
                   "quantized_ptq": "quantized, before fine-tuning (PTQ)", "finetuned": "after QAT fine-tuning",
                   "deployed": "deployed TVM library (fresh process, all test images)"}


def _jsonable(obj):
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _cell(value) -> str:
    return str(value).replace("|", "\\|")  # a bare | would split the Markdown cell


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def preprocessing_text(pre: dict | None) -> str:
    """What is done to an image file before the model (channels, resize / crop), in words; mean/std aside."""
    pre = pre or {}
    steps = [f"convert to {pre['channels']} channel(s)"] if pre.get("channels") else []
    if pre.get("image_size"):
        steps.append(("resize the shorter side and center-crop to " if pre.get("center_crop") else "resize to ")
                     + "×".join(map(str, pre["image_size"])) + " (bilinear)")
    return ", ".join(steps) or "none"


def data_section(d: dict | None) -> list[str]:
    """The data a compile used (``stages.load.dataset``): source, image counts, classes, preprocessing, hash."""
    if not d:
        return []
    n = d["images"]
    names = d.get("class_names") or []
    shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
    pre = d.get("preprocess", {})
    steps = [preprocessing_text(pre)]
    if pre.get("mean") is not None:
        steps.append(f"mean {pre['mean']} / std {pre['std']} inside the model")
    rows = [["source", f"{d.get('source')} ({d.get('kind')})"],
            ["images train / validation / test", f"{n['train']:,} / {n['validation']:,} / {n['test']:,}"],
            ["classes", f"{d.get('classes')}" + (f": {shown}" if shown else "")],
            ["input (C, H, W)", "×".join(map(str, d.get("input_shape", [])))],
            ["preprocessing", "; ".join(steps)],
            ["sha256", f"{d['sha256']} ({d.get('hash_of', 'the files')})" if d.get("sha256") else "not hashed"]]
    return ["## Data", "", table(["", ""], rows), ""]


def render_markdown(doc: dict) -> str:
    """report.md from a report.json document."""
    from pfq_edge.targets.backends import backend_for

    s, st = doc["summary"], doc["stages"]
    backend = backend_for(doc["kind"])
    out = [f"# pfq-edge compile: `{doc['model']}` for `{doc['target']}`", ""]
    out += ["## Summary", "", table(["quantity", "value"], summary_rows(s, doc["kind"])), ""]
    out += data_section(st.get("load", {}).get("dataset"))
    prune = st.get("prune", {})
    if prune:
        out += prune_section(prune)
    out += _settings_section(st.get("quantize", {}), st.get("finetune", {}))
    acc = st.get("accuracy", {})
    if acc:
        name = st.get("load", {}).get("dataset", {}).get("name", "Fashion-MNIST")
        out += [f"## Accuracy (top-1, test split of {name})", "",
                table(["stage", "top-1"], [[ACCURACY_LABELS.get(k, k), pct(v)] for k, v in acc.items()]), ""]
    golden = golden_checks(st)
    if golden:
        out += ["## Golden checks", "", table(
            ["stage", "images", "max abs diff", "top-1 agreement", "images with |Δ| > atol", "passed"],
            [[g["stage"], g["images"], f"{g['max_abs_diff']:.3g}", pct(g["argmax_agreement"]),
              f"{g['mismatched_images']} (atol {g['atol']}, allowed {g['max_mismatch_fraction']:.0%})"
              if g["atol"] is not None else "— (top-1 agreement only)", _passed_cell(g)]
             for g in golden]), "",
                "Images with |Δ| > atol are one-step rounding flips: float32 sums in another order land a value on the "
                "other side of a quantization boundary (see pfq_edge/golden.py)." + (
                    " Where the float32 comparison fails, the check is judged against the quantized model computed in "
                    "float64: the candidate passes when it is no further from it than the float32 reference is."
                    if any(g.get("arbiter") for g in golden) else ""), ""]
    out += backend.markdown(doc)
    titles = {**PLOTS, **backend.plots}
    plots = [k for k in titles if k in doc.get("plots", [])]
    if plots:
        out += ["## Plots", ""] + [f"![{titles[k]}](plots/{k}.png)" for k in plots] + [""]
    return "\n".join(out)


def plot_points(doc: dict) -> list[dict]:
    """Accuracy-vs-size points of one report: float and PfQ float at 32 bits per weight, PTQ and fine-tuned at the
    quantized logical size."""
    s, st = doc["summary"], doc["stages"]
    params = st.get("load", {}).get("parameters")
    kept = sum(r["params"] for r in st.get("quantize", {}).get("layers", []))  # conv/linear weights after PfQ
    q = st.get("quantize", {})
    label = wa_label(q.get("weight_bit_width"), q.get("act_bit_width"))
    return [{"label": "float (all parameters)", "top1": s.get("float_top1"), "weight_bits": params and 32 * params},
            {"label": "PfQ float (weights)", "top1": s.get("pfq_top1"), "weight_bits": 32 * kept},
            {"label": f"{label} PTQ", "top1": s.get("quantized_top1"), "weight_bits": s.get("weight_bits")},
            {"label": f"{label} fine-tuned", "top1": s.get("finetuned_top1"), "weight_bits": s.get("weight_bits")}]


def render_plots(doc: dict, folder) -> list[str]:
    """Write the PNG plots a report.json document has data for into ``folder``; returns their keys (PLOTS)."""
    from pathlib import Path

    from pfq_edge import plots
    from pfq_edge.targets.backends import backend_for

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
    done += backend_for(doc["kind"]).render_plots(doc, folder, name)
    return done


def prune_section(prune: dict) -> list[str]:
    rule = prune.get("rule", "exact")
    if rule == "off":
        return ["## PfQ", "", "Rule `off`: no filter removed (plain quantization-aware fine-tuning).", ""]
    check = prune.get("golden") or prune.get("guard") or {}
    where = "test" if rule == "exact" else "calibration"
    text = ("post-BN std ≤ %g (exact; docs/workflow.md, \"The PfQ rules\")" % prune.get("tol") if rule == "exact" else
            f"{rule}: {REPLACES.get(rule, rule)} (approximate; guarded by top-1 agreement ≥ "
            f"{pct(check.get('min_agreement'))} on the calibration images)")
    multiple = prune.get("channel_multiple", 1)
    aware = (f" Hardware-aware: layers that lose filters keep channel counts that are multiples of {multiple} "
             f"(the others are neutralized)." if multiple > 1 else "")
    out = ["## PfQ: constant filters removed", "",
           f"Rule: {text}.{aware} Filters removed: **{prune.get('filters_removed', 0)}**. Output change on "
           f"{check.get('images')} {where} images: max |Δlogit| {check.get('max_abs_diff', 0):.3g}, top-1 agreement "
           f"{pct(check.get('argmax_agreement'))} "
           f"({'exact' if prune.get('exact') else 'approximate'}).", ""]
    rows = [[r["layer"], r["kind"], r["channels_before"], r["channels_after"], r["constant_filters"],
             r["removed_filters"], r["range_inflating_filters"], f"{r['folded_max_abs_before']:.3g}",
             f"{r['folded_max_abs_after']:.3g}", f"{r['zero_fraction_before']:.1%}",
             f"{r['zero_fraction_after']:.1%}"] for r in prune.get("layers", [])]
    out += [f"Folded-weight range (max |W'|) and the share of weights that round to 0 with a per-tensor "
            f"{prune.get('bits')}-bit step, before and after PfQ:", "",
            table(["layer", "kind", "channels before", "after", "constant filters", "filters removed",
                    "σ²≤ε kept", "folded max|W'| before", "after", "→0 before", "after"], rows), "",
            "Filters removed include depthwise channels fed by a removed filter and filters whose only reader "
            "was a removed depthwise channel.", ""]
    left = prune.get("constant_left", [])
    out.append(f"Constant filters (by this rule): {prune.get('constant_total', 0)} found, "
               f"{prune.get('constant_removed', 0)} removed" + ("; left, with the reason:" if left else "."))
    out += [f"- `{x['layer']}`: {x['filters']} constant filters left — {x['reason']}" for x in left]
    out += [f"- warning: {w}" for w in prune.get("warnings", [])]
    return out + [""]


def _settings_section(quant: dict, ft: dict) -> list[str]:
    """What the quantize and finetune stages were asked to do, and what fine-tuning did."""
    if not quant:
        return []
    layers = quant.get("layers", [])
    edge = f"first layer {layers[0]['bit_width']}-bit, last layer {layers[-1]['bit_width']}-bit" if layers else ""
    rows = [["weights / activations / input", f"{quant.get('weight_bit_width')} / {quant.get('act_bit_width')} / "
                                                f"{quant.get('input_bit_width')} bits ({edge})"],
            ["weight scales", f"{quant.get('weight_granularity')}, "
                              f"{quant.get('scale_init_used', quant.get('scale_init', 'stats'))}-initialised"],
            ["BatchNorm", quant.get("bn")],
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
        if ft.get("staged"):
            st = ft["staged"]
            rows.append(["stages (top-1 at start → end)", "; ".join(
                f"{r['bits']} × {r['epochs']}: {pct(r['ptq_top1'])} → {pct(r['top1'])}" for r in st["stages"])
                + f"; target at start {pct(st['target_start_top1'])}"])
        if ft.get("validation_top1"):
            rows += [["validation top-1 per epoch", ", ".join(pct(x) for x in ft["validation_top1"])],
                     ["kept epoch", f"{ft['best_epoch']} (early stop: {ft['stopped_early']})"]]
        if ft.get("resumed_after_epoch"):
            rows.append(["resumed after epoch", ft["resumed_after_epoch"]])
    return ["## Quantization and fine-tuning", "", table(["setting", "value"], rows), ""]


def summary_rows(s: dict, kind: str) -> list[list]:
    """The summary of a ``kind`` target as (quantity, value) rows, shared by report.md and the terminal table."""
    from pfq_edge.targets.backends import backend_for

    rows = [
        ["float top-1", pct(s.get("float_top1"))],
        ["after PfQ (float) top-1", pct(s.get("pfq_top1"))],
        ["quantized (before fine-tuning) top-1", pct(s.get("quantized_top1"))],
        ["fine-tuned top-1", pct(s.get("finetuned_top1"))],
        *([["deployed top-1 (TVM library, all test images)", pct(s["deployed_top1"])]]
          if s.get("deployed_top1") is not None else []),
        ["bits (weights/activations/input)", s.get("bits", "—")],
        ["method", s.get("method", "—")],
        ["PfQ rule / filters removed", f"{s.get('pfq_rule', 'exact')} / {s.get('filters_removed', '—')}"],
        ["logical weight size", f"{s['weight_bits']:,} bits ({s['weight_bits'] / 8 / 1024:.1f} KiB)"
         if "weight_bits" in s else "—"],
        ["weights quantized to 0", pct(s.get("zero_weight_fraction"))],
    ]
    return rows + backend_for(kind).summary_rows(s)


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
    from pfq_edge.targets.backends import backend_for

    rows = []
    for r in doc["targets"]:
        latency = backend_for(r["kind"]).latency_cell(r)
        rows.append([r["target"], r["kind"], r.get("bits", "—").split(",")[0], r.get("filters_removed", "—"),
                     pct(r.get("finetuned_top1") if r.get("finetuned_top1") is not None else r.get("quantized_top1")),
                     pct(r.get("deployed_top1")), f"{r['weight_bits'] / 8 / 1024:.1f} KiB",
                     latency, r.get("latency_verdict", "—"), r.get("fit", "—"), r["archive"]])
    return head, rows


def summary_table(doc: dict) -> str:
    """summary.md of a multi-target compile."""
    head, rows = summary_rows_multi(doc)
    return "\n".join([f"# pfq-edge compile: `{doc['model']}` for {len(rows)} targets", "",
                      "Targets with the same bit widths and fine-tuning settings share one fine-tuned model; each "
                      "folder holds that target's report.md. Quantized top-1: after fine-tuning, or before it (PTQ) "
                      "with --epochs 0; deployed top-1: the TVM library in a fresh process (targets run here).", "",
                      table(head, rows), "",
                      "![top-1 vs logical weight size per target](accuracy_size.png)", ""])
