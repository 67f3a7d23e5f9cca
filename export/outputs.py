"""The files of a compile's output folder besides the model artefacts and the package: report.json, report.md
and plots/ (rendered by pfq_edge/report.py), run.json (what changes from run to run) and, for several targets,
summary.json / summary.md / accuracy_size.png."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(doc: dict, folder: Path) -> dict[str, Path]:
    """Render ``doc`` (report.report_document) into ``folder``: plots/*.png, report.json (listing the plots) and
    report.md. Returns {name in the package: path} of the files written."""
    from pfq_edge.report import render_markdown, render_plots, to_json

    doc = json.loads(to_json(doc))  # plain JSON values, as `pfq-edge report` reads them back
    doc["plots"] = render_plots(doc, folder / "plots")
    (folder / "report.json").write_text(to_json(doc))
    (folder / "report.md").write_text(render_markdown(doc))
    return {**{f"plots/{k}.png": folder / "plots" / f"{k}.png" for k in doc["plots"]},
            "report.json": folder / "report.json", "report.md": folder / "report.md"}


def write_run_facts(path: Path, timings_s: dict) -> None:
    """run.json: what changes from run to run and is therefore kept out of report.json and the package — step wall
    times (s), the date, this machine."""
    import datetime
    import os
    import platform

    facts = {"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
             "timings_s": timings_s}
    path.write_text(json.dumps(facts, indent=2) + "\n")


def write_summary(folder: Path, model: str, rows: list[dict]) -> dict:
    """summary.json, summary.md and accuracy_size.png of a multi-target compile: ``rows``, one per target (its
    target, kind, folder, archive and report summary). Returns the summary.json document."""
    from pfq_edge.plots import plot_accuracy_vs_size
    from pfq_edge.report import summary_table

    doc = {"model": model, "targets": rows}
    (folder / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    (folder / "summary.md").write_text(summary_table(doc))
    plot_accuracy_vs_size([{"label": r["target"], "top1": r.get("finetuned_top1") or r.get("quantized_top1"),
                            "weight_bits": r.get("weight_bits")} for r in rows],
                          f"{model}: top-1 vs logical weight size per target", folder / "accuracy_size.png")
    return doc
