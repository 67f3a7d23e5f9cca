"""Measure the product budgets: `pfq-edge compile` wall time and peak RSS, and CLI import time for --help.

    .venv/bin/python benchmarks/compile_budget.py [--target fpga] [--repeats-help 5]

Each measurement runs in its own process (peak RSS from getrusage of that child). Writes
benchmarks/results/compile_budget.{json,md}. Budgets (docs/benchmarks.md): compile ≤ 300 s (5 min) and ≤ 4 GiB on 2 cores;
``--help`` ≤ 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BUDGET_S, BUDGET_RSS_GIB, BUDGET_HELP_S = 300.0, 4.0, 2.0  # the product budgets: 5 min, 4 GiB, 2 s


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process; wall seconds, peak RSS (GiB) and exit code."""
    script = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
              "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
              "wall = time.perf_counter() - t; "
              "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20; "
              "print(json.dumps({'rc': p.returncode, 'wall_s': wall, 'peak_rss_gib': rss, "
              "'stderr_tail': p.stderr[-300:]}))")
    out = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="fpga")
    ap.add_argument("--repeats-help", type=int, default=5)
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("pfq-edge"))
    env_note = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}

    helps = sorted(run_measured([exe, "--help"])["wall_s"] for _ in range(args.repeats_help))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        compile_cmd = [exe, "compile", "--target", args.target, "--out", str(out)]
        res = run_measured(compile_cmd)
        done = res["rc"] in (0, 9)  # 9: complete output, the result misses the profile's budget (a verdict)
        report = json.loads((out / "report.json").read_text()) if done else {}
        facts = json.loads((out / "run.json").read_text()) if done else {}
    doc = {
        "command": "python benchmarks/compile_budget.py " + " ".join(sys.argv[1:]),
        "environment": env_note,
        "help_median_s": helps[len(helps) // 2], "help_max_s": helps[-1],
        "compile": {"cmd": " ".join(["pfq-edge"] + compile_cmd[1:-2] + ["--out", "OUT"]), **res,
                    "step_times_s": facts.get("timings_s", {}), "summary": report.get("summary", {})},
        "budgets": {"compile_s": BUDGET_S, "compile_rss_gib": BUDGET_RSS_GIB, "help_s": BUDGET_HELP_S},
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "compile_budget" if args.target == "fpga" else f"compile_budget_{args.target}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    c = doc["compile"]
    s = c["summary"]
    rows = [
        ("`pfq-edge --help` (median of %d)" % args.repeats_help, f"{doc['help_median_s']:.2f} s", f"≤ {BUDGET_HELP_S} s",
         f"{doc['help_median_s'] / BUDGET_HELP_S:.2f}"),
        (f"`{c['cmd']}` wall", f"{c['wall_s']:.0f} s", f"≤ {BUDGET_S:.0f} s", f"{c['wall_s'] / BUDGET_S:.2f}"),
        ("compile peak RSS", f"{c['peak_rss_gib']:.2f} GiB", f"≤ {BUDGET_RSS_GIB} GiB",
         f"{c['peak_rss_gib'] / BUDGET_RSS_GIB:.2f}"),
    ]
    md = ["# Budgets: compile time, memory, CLI start-up", "", f"Command: `{doc['command']}`  ",
          f"Machine: {env_note['cpus']} CPUs, Python {env_note['python']}, {env_note['machine']}", "",
          "| measurement | measured | budget | ratio |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
    md += ["", "Step times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in c["step_times_s"].items()), "",
           f"Fine-tuned top-1: {s.get('finetuned_top1', float('nan')):.4f}; " +
           (f"FINN latency {s['latency_us']:.1f} µs, {s['throughput_fps']:.0f} fps." if "latency_us" in s else
            f"TVM latency {s.get('latency_ms_tvm', float('nan')):.3f} ms (onnxruntime "
            f"{s.get('latency_ms_onnxruntime', float('nan')):.3f} ms), budget verdict {s.get('latency_verdict')}; "
            f"exit code {c['rc']}.")]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not done:
        sys.exit(f"compile failed: {c['stderr_tail']}")


if __name__ == "__main__":
    main()
