"""The CPU/GPU section of report.md: the QCDQ model, the TVM build and what was checked, latency per engine."""

from __future__ import annotations

import json

from pfq_edge.report import pct, table

NOISY_SPREAD = 3.0  # median ÷ min above this marks an engine's timing as noisy in report.md


def runtime_section(export: dict, build: dict, measured: dict) -> list[str]:
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
               f"QCDQ model {pct(golden['argmax_agreement'])}, max |Δlogit| {golden['max_abs_diff']:.3g}."
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
                table(["optimization level", "top-1 agreement", "max |Δlogit|", "images off by > 1e-3",
                        "computes the model? (≥ 99% top-1 agreement)"],
                       [[k, pct(v["argmax_agreement"]), f"{v['max_abs_diff']:.3g}",
                         f"{v['mismatched_images']}/{v['images']}", "yes" if v["passed"] else "no"]
                        for k, v in levels.items()]), ""]
    engines = measured.get("engines") or []
    verdict = measured.get("verdict", {})
    if engines:
        tvm_ms = engines[0]["median_ms"]
        out += [f"Latency per call, batch {measured['batch_size']}, {measured['threads']} threads, each engine in its "
                f"own process, {engines[0]['warmup']} warm-up calls dropped, ≥ 1 s of timed calls:", "",
                table(["engine", "median ms", "p90 ms", "min ms", "max ms", "calls", "TVM median ÷ engine median"],
                       [[e["label"], f"{e['median_ms']:.4f}", f"{e['p90_ms']:.4f}", f"{e['min_ms']:.4f}",
                         f"{e.get('max_ms', float('nan')):.4f}", e["repeats"], f"{tvm_ms / e['median_ms']:.3g}"]
                        for e in engines]), "",
                "A ratio below 1 means TVM is faster than that engine."]
        # A median far above the minimum means the calls were slowed by something else on the machine (the
        # minimum is what the engine can do); its ratio then says more about the machine than the engine.
        noisy = [e for e in engines if e["min_ms"] > 0 and e["median_ms"] / e["min_ms"] > NOISY_SPREAD]
        if noisy:
            out += ["", "**Noisy timing**: " + "; ".join(
                f"{e['label']} median {e['median_ms'] / e['min_ms']:.0f}× its minimum" for e in noisy)
                + f" (more than {NOISY_SPREAD:g}×): another process was probably using the cores; re-measure on "
                  "an idle machine before comparing engines."]
    if verdict:
        out.append(f"Latency budget {verdict['budget_ms']} ms: **{verdict['verdict']}**" +
                   (f" (TVM {verdict['latency_ms']:.3f} ms)." if verdict.get("latency_ms") is not None
                    else f" — {verdict.get('reason')}."))
    return out + [""]
