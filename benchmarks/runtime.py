"""CPU latency of the CPU-target artefacts, side by side in one run (issue 5): TVM untuned and MetaSchedule-tuned
vs onnxruntime (vs torch eager for reference), per model × batch × precision.

    .venv/bin/python benchmarks/runtime.py                         # the committed table (results/runtime.md)
    .venv/bin/python benchmarks/runtime.py --quick                 # default CNN, batch 1, W8A8, 8 trials
Tuning runs one MetaSchedule round per task (fused kernel: 13 in the default CNN, 51 in EfficientNet-Lite0), ~10 s
each on 2 cores plus ~1 min of start-up per configuration, so the default tunes the default CNN at batch 1 (W8A8,
W4A4; 32 trials ≈ 2.5 per task) only. Every row tuned at 3 trials per task, the table in docs/benchmarks.md (~0.5 h and ~1.4 h):
    .venv/bin/python benchmarks/runtime.py --models fashion-dscnn --tune-batches 1,32 \
        --tune-precisions float,W8A8,W4A4 --tune-trials-per-task 3 --name runtime_dscnn_tuned
    .venv/bin/python benchmarks/runtime.py --models efficientnet-lite0 --tune-models efficientnet-lite0 \
        --tune-batches 1,32 --tune-precisions float,W8A8,W4A4 --tune-trials-per-task 3 --name runtime_effnet_tuned
Anything else on the cores stalls TVM's thread pool and spoils both the tuning and the timings. Rows are written to
the results files as they finish. Narrow it with:
    .venv/bin/python benchmarks/runtime.py --models fashion-dscnn --batches 1 --precisions W4A4 --tune-trials 64

Each configuration goes through the compile's own pieces: PfQ (exact rule) → Brevitas quantization (the cpu-x86
profile's settings at the row's bit widths) calibrated on 256 test images (no fine-tuning: latency does not depend on
it) → QCDQ export at a static batch → TVM build (``targets/backends/tvm/driver.py``); "float" is the pruned float model exported with
torch.onnx. Every engine is timed in its own process by ``pfq_edge.runners.latency`` (warm-up dropped, ≥ 1 s of calls,
median). onnxruntime runs at the highest graph-optimization level that computes the model (≥ 99% top-1 agreement with
the graph as written on those images, the compile's own criterion; see docs/cpu-gpu.md, "onnxruntime's optimization levels"); the level is a
column. The script does nothing in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {"fashion-dscnn": "fashion-dscnn", "efficientnet-lite0": "efficientnet-lite0-fmnist"}
PRECISIONS = {"float": None, "W8A8": 8, "W4A4": 4}
CALIBRATION = 256


def _model(name: str):
    import torch

    from pfq_edge.pfq.analyze import analyze_pfq
    from pfq_edge.zoo import load_model

    model = load_model(MODELS[name]).module.eval()
    pruned, analysis = analyze_pfq(model, torch.zeros(1, 1, 28, 28))
    return pruned, analysis.as_dict()["filters_removed"]


def _onnx(pruned, precision: str, batch: int, images, folder: Path) -> Path:
    import torch

    from pfq_edge.export.qcdq import export_qcdq
    from pfq_edge.quantize import calibrate, quantize_model
    from pfq_edge.targets.profile import load_profile

    x = images[:batch]
    path = folder / f"{precision}-b{batch}.onnx"
    if PRECISIONS[precision] is None:
        with torch.no_grad():
            torch.onnx.export(pruned, (x,), str(path), input_names=["input"], output_names=["logits"], dynamo=False)
        return path
    bits = PRECISIONS[precision]
    quant = load_profile("cpu-x86").quant.model_copy(update={"weight_bit_width": bits, "act_bit_width": bits})
    qmodel = quantize_model(pruned, quant)
    calibrate(qmodel, images[:CALIBRATION])
    return export_qcdq(qmodel, x, path)


def _ort_level(path: Path, images) -> str:
    """onnxruntime's highest optimization level that computes the model (the compile's own criterion)."""
    from pfq_edge.runners.onnx import onnxruntime_levels, run_onnxruntime

    return onnxruntime_levels(path, images, run_onnxruntime(path, images, level="off"))[1]


def run_config(name: str, pruned, precision: str, batch: int, images, threads: int, trials: int,
               per_task: int, folder: Path, log) -> dict:
    import torch

    from pfq_edge.targets.backends.tvm.driver import build_tvm, tuning_tasks
    from pfq_edge.runners.latency import measure
    from pfq_edge.targets.profile import RuntimeSpec

    sub = folder / f"{name}-{precision}-b{batch}"
    sub.mkdir()
    path = _onnx(pruned, precision, batch, images, sub)
    golden = images[:max(batch, 64 // batch * batch)].numpy()
    level = _ort_level(path, golden)
    x = images[:batch].numpy()
    row = {"model": name, "precision": precision, "batch": batch, "threads": threads, "ort_level": level,
           "onnx_bytes": path.stat().st_size}
    timings = {}
    spec = RuntimeSpec(tvm_target="llvm", threads=threads, batch_size=batch)
    untuned = build_tvm(path, spec, sub / "untuned")
    timings["tvm_untuned"] = measure("tvm", untuned.library, x, threads)
    if trials:
        if per_task:  # the same search effort per kernel whatever the model's size
            trials = per_task * tuning_tasks(path, spec)
        tuned = build_tvm(path, spec.model_copy(update={"tune_trials": trials}), sub / "tuned",
                          tuning_db=sub / "tvm_tuning")
        row["tuning_s"], row["tuning_tasks"] = tuned.tuning["seconds"], tuned.tuning["tasks"]
        row["tuning_trials"] = trials
        timings["tvm_tuned"] = measure("tvm", tuned.library, x, threads)
    timings["onnxruntime"] = measure("onnxruntime", path, x, threads, ort_level=level)
    if precision == "float":  # torch eager on the very same float model, for reference
        pt2 = sub / "model.pt2"
        with torch.no_grad():
            torch.export.save(torch.export.export(pruned, (images[:batch],)), str(pt2))
        timings["torch"] = measure("torch", pt2, x, threads)
    row.update({f"{k}_ms": v["median_ms"] for k, v in timings.items()})
    row.update({f"{k}_p90_ms": v["p90_ms"] for k, v in timings.items()})
    ort = row["onnxruntime_ms"]
    row["untuned_over_ort"] = row["tvm_untuned_ms"] / ort
    if "tvm_tuned_ms" in row:
        row["tuned_over_ort"] = row["tvm_tuned_ms"] / ort
    log(f"{name} {precision} batch {batch}: TVM untuned {row['tvm_untuned_ms']:.3f} ms, tuned "
        f"{row.get('tvm_tuned_ms', float('nan')):.3f} ms, onnxruntime[{level}] {ort:.3f} ms")
    return row


def _tuning(row: dict) -> str:
    if "tuning_s" not in row:
        return "—"
    return f"{row['tuning_trials']} / {row['tuning_tasks']}, {row['tuning_s']:.0f} s"


def markdown(rows: list[dict], meta: dict) -> str:
    def f(v, fmt=".3f"):
        return "—" if v is None else format(v, fmt)

    effort = (f"{meta['tune_trials_per_task']} trials per task" if meta.get("tune_trials_per_task")
              else f"{meta['tune_trials']} trials per tuned configuration")
    lines = ["# CPU latency: TVM vs onnxruntime (issue 5)", "",
             f"Command: `{meta['command']}`  ",
             f"Wall time: {meta['wall_s']:.0f} s on {meta['machine']}; {meta['threads']} threads per engine; "
             f"MetaSchedule {effort} ({meta.get('tuned')})"
             + ("" if meta.get("complete", True) else " — **partial: the run is still going or was stopped**") + ".  ",
             "Median ms per call (each engine in its own process, warm-up dropped, ≥ 1 s of calls); ratio < 1 means "
             "TVM is faster. `ort level`: onnxruntime's highest graph-optimization level that still computes the "
             "model (≥ 99% top-1 agreement with the graph as written; at `all` it runs QCDQ as integer kernels). "
             "`tuning`: MetaSchedule trials / tasks, seconds.", "",
             "| model | precision | batch | ort level | onnxruntime ms | TVM untuned ms | TVM tuned ms | "
             "untuned / ort | tuned / ort | torch eager ms | tuning |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['ort_level']} | "
                     f"{f(r['onnxruntime_ms'])} | {f(r['tvm_untuned_ms'])} | {f(r.get('tvm_tuned_ms'))} | "
                     f"{f(r['untuned_over_ort'], '.2f')} | {f(r.get('tuned_over_ort'), '.2f')} | "
                     f"{f(r.get('torch_ms'))} | {_tuning(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--tune-trials", type=int, default=32, help="MetaSchedule trials per tuned configuration")
    ap.add_argument("--tune-trials-per-task", type=int, default=0,
                    help="if > 0: this many trials per tuning task instead of --tune-trials per configuration")
    ap.add_argument("--tune-models", default="fashion-dscnn", help="models that get tuned")
    ap.add_argument("--tune-batches", default="1", help="batch sizes that get tuned")
    ap.add_argument("--tune-precisions", default="W8A8,W4A4", help="precisions that get tuned")
    ap.add_argument("--threads", type=int, default=0, help="threads per engine, 0 = every core")
    ap.add_argument("--quick", action="store_true", help="default CNN, batch 1, W8A8, 8 trials")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="runtime")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.precisions, args.tune_trials = "fashion-dscnn", "1", "W8A8", 8
    for what, known, given in (("model", MODELS, args.models), ("precision", PRECISIONS, args.precisions)):
        bad = [g for g in given.split(",") if g not in known]
        if bad:
            ap.error(f"unknown {what} {bad[0]!r}; known: {', '.join(known)}")
    os.environ["PFQ_EDGE_QUIET"] = "1"
    from pfq_edge.data import load_split
    from pfq_edge.io import atomic_write_text
    from pfq_edge.runners.latency import resolve_threads

    threads = resolve_threads(args.threads)
    images = load_split("test").images[:CALIBRATION]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    rows = []
    command = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)

    def write(done: bool) -> str:
        meta = {"command": command, "wall_s": round(time.time() - t0, 1), "complete": done,
                "machine": f"{os.cpu_count()} cores, {platform.machine()}", "threads": threads,
                "tune_trials": args.tune_trials, "tune_trials_per_task": args.tune_trials_per_task,
                "tuned": f"{args.tune_models} at batch {args.tune_batches}, {args.tune_precisions}"}
        text = markdown(rows, meta)
        atomic_write_text(args.out / f"{args.name}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        atomic_write_text(args.out / f"{args.name}.md", text)
        return text

    with tempfile.TemporaryDirectory(prefix="pfq-edge-runtime") as tmp:
        for name in args.models.split(","):
            pruned, _ = _model(name)
            for batch in (int(b) for b in args.batches.split(",")):
                for precision in args.precisions.split(","):
                    tuned = (name in args.tune_models.split(",") and str(batch) in args.tune_batches.split(",")
                             and precision in args.tune_precisions.split(","))
                    trials = args.tune_trials if tuned else 0
                    rows.append(run_config(name, pruned, precision, batch, images, threads, trials,
                                           args.tune_trials_per_task, Path(tmp), log))
                    write(done=False)  # a long run keeps what it measured if it is stopped
    print(write(done=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
