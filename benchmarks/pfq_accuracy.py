"""PfQ against the conventional workflows, on real Fashion-MNIST: model × bits × method → top-1 (issue 4).

    .venv/bin/python benchmarks/pfq_accuracy.py                 # the committed table (see results/pfq_accuracy.md)
    .venv/bin/python benchmarks/pfq_accuracy.py --quick         # re-check: 2 models, W4A4/W3A3, 3 methods, 1 seed
    .venv/bin/python benchmarks/pfq_accuracy.py --smoke --out /tmp/x   # seconds; what CI runs

Every run goes through the compile's own stages (``steps.FRONT_END``: load → prune → quantize → finetune)
with profile overrides, so a method here is exactly what ``pfq-edge compile`` does with the same options:

    qat           plain QAT, no PfQ                           --pfq-rule off
    ptq / pfq+ptq calibration only, without / with PfQ (exact) --epochs 0 (not in the default grid)
    cle-bc        cross-layer equalization + bias correction, no fine-tuning (PTQ)
    cle-bc+qat    the same, then QAT
    pfq+qat       PfQ, exact rule (design.md §2), then QAT     (default of pfq-edge compile)
    pfq-eps+qat   PfQ, BN-epsilon rule (σ² ≤ ε, data-guarded), then QAT
    pfq+cle+qat   PfQ exact + cross-layer equalization, then QAT
    nc+qat        PfQ, near-constant rule (below half an activation step at the bits, data-guarded), then QAT
    qat-stats     plain QAT with Brevitas' stats-initialised scales (max |w|, percentile; --scale-init stats)
    pfq+qat-stats PfQ exact, then QAT with stats-initialised scales
    pfq+qat+kd    PfQ exact, then QAT with distillation from the float model (--distill 0.5)
    bnkeep+qat    no PfQ, BN kept float through QAT (--bn keep), its statistics re-estimated after quantizer
                  insertion: the unfolded weights never see γ/σ, the other way around PfQ's problem
    pfq+bnkeep+qat PfQ exact, BN kept (re-estimated) through QAT (--bn keep)
    pfq+bnkeep+kd PfQ exact, BN kept (re-estimated), distillation (--bn keep --distill 0.5)
    pfq+staged+kd PfQ exact, QAT at W4A4 for half the epochs, then at the cell's bits for the rest, distillation
                  (--stages W4A4 --stage-epochs E/2 --epochs E/2 --distill 0.5): the same epochs in all as the others

Every method quantizes with the profile's defaults otherwise: MSE-initialised learned scales (--scale-init mse),
the first conv and the classifier at 8 bits below 4-bit weights, FPGA channel multiple 8 (hardware-aware PfQ).

Bits: W8A8, W4A4, W3A3, W2A2 per-tensor and W4A4pc (per-channel weight scales); inputs 8-bit throughout.
Per cell: top-1 on the test images before (PTQ) and after QAT, mean ± std over the seeds (the seed drives QAT
shuffling); logical weight bits; filters removed; share of weights whose integer is 0. Runs are spread over
``--jobs`` processes (one thread each). ``--finn`` also exports each cell's first-seed model and runs the FINN
estimate of the PYNQ-Z1 profile (LUT / BRAM_18K / fps at its target_fps, fit verdict), as the compile would.
Writes pfq_accuracy.{json,md,png} under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "qat": {"pfq": {"rule": "off"}},
    "ptq": {"pfq": {"rule": "off"}, "finetune": {"epochs": 0}},
    "pfq+ptq": {"pfq": {"rule": "exact"}, "finetune": {"epochs": 0}},
    "cle-bc": {"pfq": {"rule": "off"}, "quant": {"equalize": True, "bias_correction": True}, "finetune": {"epochs": 0}},
    "cle-bc+qat": {"pfq": {"rule": "off"}, "quant": {"equalize": True, "bias_correction": True}},
    "pfq+qat": {"pfq": {"rule": "exact"}},
    "pfq-eps+qat": {"pfq": {"rule": "bn-epsilon"}},
    "pfq+cle+qat": {"pfq": {"rule": "exact"}, "quant": {"equalize": True}},
    "nc+qat": {"pfq": {"rule": "near-constant"}},
    "qat-stats": {"pfq": {"rule": "off"}, "quant": {"scale_init": "stats"}},
    "pfq+qat-stats": {"pfq": {"rule": "exact"}, "quant": {"scale_init": "stats"}},
    "pfq+qat+kd": {"pfq": {"rule": "exact"}, "finetune": {"distill_alpha": 0.5}},
    "bnkeep+qat": {"pfq": {"rule": "off"}, "quant": {"bn": "keep"}},
    "pfq+bnkeep+qat": {"pfq": {"rule": "exact"}, "quant": {"bn": "keep"}},
    "pfq+bnkeep+kd": {"pfq": {"rule": "exact"}, "quant": {"bn": "keep"}, "finetune": {"distill_alpha": 0.5}},
    "pfq+staged+kd": {"pfq": {"rule": "exact"}, "finetune": {"stages": ["W4A4"], "distill_alpha": 0.5}},
}
BITS = {
    "W8A8": {"weight_bit_width": 8, "act_bit_width": 8},
    "W4A4": {"weight_bit_width": 4, "act_bit_width": 4},
    "W3A3": {"weight_bit_width": 3, "act_bit_width": 3},
    "W2A2": {"weight_bit_width": 2, "act_bit_width": 2},
    "W4A4pc": {"weight_bit_width": 4, "act_bit_width": 4, "weight_granularity": "per-channel"},
}
FINN_KEYS = ("LUT", "BRAM_18K", "DSP", "fps", "latency_us", "fit", "finn_error")
MODELS = ["fashion-dscnn", "fashion-dscnn-wide", "efficientnet-lite0-fmnist", "fashion-dscnn-adam",
          "fashion-dscnn-wide-adam", "fashion-mbv2", "fashion-resnet"]
_DATA = {}


def _run(task: dict) -> dict:
    """One (model, bits, method, seed) run in this process; returns its record."""
    import torch

    from pfq_edge.data import load_split
    from pfq_edge.errors import PfqError
    from pfq_edge.compilation import Compilation, CompileConfig, Dataset, InputSpec
    from pfq_edge.data import CLASSES
    from pfq_edge.pipeline import effective_profile, run_steps
    from pfq_edge.steps import FRONT_END

    from pfq_edge.train import predict
    from pfq_edge.zoo import load_model

    torch.set_num_threads(task["threads"])
    if not _DATA:
        _DATA["train"], _DATA["test"] = load_split("train"), load_split("test")
    test = _DATA["test"].subset(task["test_images"])
    if task["model"] not in _DATA:  # the float model and its test logits, once per process (stages never modify it)
        model = load_model(task["model"]).module
        _DATA[task["model"]] = (model, predict(model, test.images))
    float_model, float_logits = _DATA[task["model"]]
    method = METHODS[task["method"]]
    overrides = {
        # BN folded unless the method keeps it: the methods' names say what they do at every bit width (the
        # profile's bn "auto" would keep it below 4 bits)
        "quant": {"bn": "fold", **BITS[task["bits"]], **method.get("quant", {})},
        "pfq": method["pfq"],
        "finetune": {"epochs": task["epochs"], "train_samples": task["train_samples"], "lr": task["lr"],
                     "seed": task["seed"], **method.get("finetune", {})},
    }
    if "stages" in overrides["finetune"]:  # the same epochs in all: half at the stages' bits, half at the cell's
        stage = max(1, task["epochs"] // 2)
        overrides["finetune"].update(stage_epochs=stage, epochs=max(1, task["epochs"] - stage))
    if task.get("finn"):
        overrides["fpga"] = {"compare_unpruned": False}  # the grid's own qat cell is the unpruned design
    cfg = CompileConfig(model=task["model"], target="fpga", out=Path("unused"), overrides=overrides)
    work = Path(tempfile.mkdtemp(prefix="pfq-bench-")) if task.get("finn") else Path(".")
    c = Compilation(config=cfg, profile=effective_profile(cfg), work=work, final=Path("unused"),
                    spec=InputSpec(tuple(test.images.shape[1:]), CLASSES),
                    data=Dataset("fashion-mnist", train=_DATA["train"], test=test), float_model=float_model,
                    float_logits=float_logits)
    t0 = time.perf_counter()
    record = {k: task[k] for k in ("model", "bits", "method", "seed")}
    try:
        run_steps(c, FRONT_END)
    except PfqError as exc:  # the bn-epsilon data guard refusing is a result, not a crash
        return {**record, "refused": str(exc), "wall_s": round(time.perf_counter() - t0, 1)}
    finn = {}
    if task.get("finn"):  # the FPGA design of this cell: QONNX export and FINN estimate, as the compile does
        from pfq_edge.targets.backends import backend_for

        backend = backend_for("fpga")
        try:
            run_steps(c, backend.steps)
            s = backend.summary(c)
            finn = {"LUT": s["LUT"], "BRAM_18K": s["BRAM_18K"], "DSP": s["DSP"], "fps": s["throughput_fps"],
                    "latency_us": s["latency_us"], "fit": s["fit"]}
        except PfqError as exc:
            finn = {"finn_error": str(exc)}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    acc, quant, prune = c.accuracy, c.result("quantize").report(), c.result("prune").report()
    return {**record, "float_top1": acc["float"], "pfq_float_top1": acc.get("pfq_float", acc["float"]),
            "ptq_top1": acc["quantized_ptq"], "top1": acc.get("finetuned", acc["quantized_ptq"]),
            "weight_bits": quant["weight_bits"], "zero_weight_fraction": quant["zero_weight_fraction"],
            "filters_removed": prune["filters_removed"], "guard": prune.get("guard"), **finn,
            "wall_s": round(time.perf_counter() - t0, 1)}


def _log(rec: dict) -> None:
    """One line per finished run on stderr when it is not a terminal (a log file shows progress)."""
    if not sys.stderr.isatty():
        result = rec.get("refused") or f"PTQ {rec['ptq_top1']:.4f} → {rec['top1']:.4f}"
        print(f"{rec['model']} {rec['bits']} {rec['method']} seed {rec['seed']}: {result} ({rec['wall_s']} s)",
              file=sys.stderr, flush=True)


def _filters_removed(model: str, rule: str) -> int:
    import torch

    from pfq_edge.pfq.analyze import analyze_pfq
    from pfq_edge.zoo import load_model

    loaded = load_model(model)
    return analyze_pfq(loaded.module, torch.zeros(1, *loaded.input_shape), rule=rule)[1].plan.filters_removed


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (model, bits, method): mean ± std of PTQ and final top-1 over seeds, size, removals."""
    rows, keys = [], []
    for r in records:
        key = (r["model"], r["bits"], r["method"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        runs = [r for r in records if (r["model"], r["bits"], r["method"]) == key]
        done = [r for r in runs if "refused" not in r]
        row = {"model": key[0], "bits": key[1], "method": key[2], "seeds": [r["seed"] for r in runs],
               "same_as": runs[0].get("same_as")}
        if not done:
            rows.append({**row, "refused": runs[0]["refused"]})
            continue
        top1, ptq = _mean_std([r["top1"] for r in done]), _mean_std([r["ptq_top1"] for r in done])
        rows.append({**row, "top1_mean": top1[0], "top1_std": top1[1], "ptq_mean": ptq[0], "ptq_std": ptq[1],
                     "float_top1": done[0]["float_top1"], "pfq_float_top1": done[0]["pfq_float_top1"],
                     "weight_bits": done[0]["weight_bits"], "filters_removed": done[0]["filters_removed"],
                     "zero_weight_fraction": statistics.fmean(r["zero_weight_fraction"] for r in done),
                     "guard_agreement": (done[0]["guard"] or {}).get("argmax_agreement"),
                     **next(({k: r[k] for k in FINN_KEYS if k in r} for r in done
                             if "LUT" in r or "finn_error" in r), {})})
    for row in rows:  # Δ against plain QAT, same model, bits (the comparison the paper's claim is about)
        base = next((b for b in rows if (b["model"], b["bits"], b["method"]) == (row["model"], row["bits"], "qat")
                     and "top1_mean" in b), None)
        if base is not None and "top1_mean" in row:
            row["delta_vs_qat"] = row["top1_mean"] - base["top1_mean"]
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# PfQ vs conventional quantization on Fashion-MNIST", "",
        f"Command: `{meta['command']}`  ", f"Wall time: {meta['wall_s']:.0f} s on {meta['machine']} "
        f"({meta['jobs']} processes × {meta['threads']} thread); {meta['runs']} runs.  ",
        f"QAT: {meta['epochs']} epoch(s) × {meta['train_samples']} images, Adam lr {meta['lr']:g}, cosine; "
        f"seeds {meta['seeds']}; top-1 on {meta['test_images']} test images; inputs 8-bit.", "",
        "| model | bits | method | PTQ top-1 % | top-1 % (mean ± std) | Δ vs qat (pt) | weight bits | "
        "filters removed | weights → 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    finn = any("LUT" in r or "finn_error" in r for r in rows)
    if finn:
        lines[-2] += " FINN LUT / BRAM_18K / fps (PYNQ-Z1, seed 0) |"
        lines[-1] += "---|"
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['bits']} | {r['method']} | refused by the data guard: "
                         f"{r['refused'].replace('|', '/')[:160]} | | | | | |")
            continue
        delta = f"{100 * r['delta_vs_qat']:+.2f}" if "delta_vs_qat" in r and r["method"] != "qat" else ""
        if r.get("same_as"):
            delta = f"= {r['same_as']} (nothing to prune)"
        final = f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}"
        lines.append(f"| {r['model']} | {r['bits']} | {r['method']} | {100 * r['ptq_mean']:.2f} | {final} | "
                     f"{delta} | {r['weight_bits']:,} | {r['filters_removed']} | "
                     f"{100 * r['zero_weight_fraction']:.1f} % |" + (_finn_cell(r) if finn else ""))
    floats = {}
    for r in rows:
        if "float_top1" in r:
            floats.setdefault(r["model"], {})[r["method"]] = (r["float_top1"], r["pfq_float_top1"])
    lines += ["", "Float top-1 before → after PfQ (the pruned float model, before quantization):", ""]
    for model, by_method in floats.items():
        parts = [f"{m}: {100 * a:.2f} → {100 * b:.2f}" for m, (a, b) in by_method.items() if m.startswith("pfq")]
        lines.append(f"- {model}: float {100 * next(iter(by_method.values()))[0]:.2f} %; " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _finn_cell(r: dict) -> str:
    if "LUT" in r:
        return f" {r['LUT']:,.0f} / {r['BRAM_18K']:.0f} / {r['fps']:,.0f} ({r['fit']}) |"
    return f" {r['finn_error'].replace('|', '/')[:80]} |" if "finn_error" in r else " |"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    markers = dict(zip(METHODS, itertools.cycle("osD^vPXh<>*p")))  # more methods than marker shapes: reuse
    for ax, model in zip(axes[0], models):
        for method in METHODS:
            pts = [r for r in rows if r["model"] == model and r["method"] == method and "top1_mean" in r]
            if not pts:
                continue
            ax.errorbar([r["weight_bits"] / 8192 for r in pts], [100 * r["top1_mean"] for r in pts],
                        yerr=[100 * r["top1_std"] for r in pts], marker=markers[method], linestyle="none",
                        capsize=3, label=method, alpha=0.8)
            for r in pts:
                ax.annotate(r["bits"], (r["weight_bits"] / 8192, 100 * r["top1_mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("logical weight size (KiB)")
        ax.set_ylabel("top-1 % after the method")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _render(path: Path, out: Path, name: str) -> int:
    """Markdown and PNG again from a results JSON (rows re-aggregated from its runs, in grid order)."""
    from pfq_edge.io import atomic_write_text

    doc = json.loads(path.read_text())
    key = {m: i for i, m in enumerate(MODELS)}, {b: i for i, b in enumerate(BITS)}, \
        {m: i for i, m in enumerate(METHODS)}
    doc["runs"].sort(key=lambda r: (key[0][r["model"]], key[1][r["bits"]], key[2][r["method"]], r["seed"]))
    rows = aggregate(doc["runs"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps({**doc, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", markdown(rows, doc["meta"]))
    plot(rows, out / f"{name}.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS[:2]))
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--methods", default=",".join(m for m in METHODS if "ptq" not in m))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-samples", type=int, default=10000, help="QAT images per epoch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--finn", action="store_true", help="also export and estimate each cell's FPGA design with FINN "
                                                         "(first seed only; PYNQ-Z1 profile, ~40 s more per cell)")
    ap.add_argument("--quick", action="store_true", help="2 models, W4A4/W3A3, qat/pfq+qat/pfq-eps+qat, 1 seed")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (256 QAT images, 500 test images)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="pfq_accuracy", help="file stem of the results written under --out")
    ap.add_argument("--render", type=Path, help="only re-write the Markdown table and plot from this results JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.bits, args.methods, args.seeds = "W4A4,W3A3", "qat,pfq+qat,pfq-eps+qat", "0"
    if args.smoke:
        args.models, args.bits, args.methods, args.seeds = "fashion-dscnn", "W4A4", "qat,pfq+qat,qat-stats,cle-bc", "0,1"
        args.train_samples, args.test_images, args.jobs = 256, 500, 1
    for name, known, given in (("model", MODELS, args.models), ("bits", BITS, args.bits),
                               ("method", METHODS, args.methods)):
        bad = [g for g in given.split(",") if g not in known]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r}; known: {', '.join(known)}")
    if args.render:
        return _render(args.render, args.out, args.name)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    tasks = [{"model": m, "bits": b, "method": meth, "seed": int(seed), "epochs": args.epochs,
              "train_samples": args.train_samples, "lr": args.lr, "test_images": args.test_images,
              "threads": threads, "finn": args.finn and seed == args.seeds.split(",")[0]}
             for m in args.models.split(",") for b in args.bits.split(",") for meth in args.methods.split(",")
             for seed in args.seeds.split(",")]
    grid = {(t["model"], t["bits"], t["method"], t["seed"]): i for i, t in enumerate(tasks)}
    # A PfQ rule that removes nothing on a model leaves plain QAT on the very same model: not run twice.
    methods = args.methods.split(",")
    nothing = {(m, rule) for m in args.models.split(",") for rule in ("exact", "bn-epsilon")
               if _filters_removed(m, rule) == 0}
    shared = [t for t in tasks if t["method"] in ("pfq+qat", "pfq-eps+qat") and "qat" in methods
              and (t["model"], METHODS[t["method"]]["pfq"]["rule"]) in nothing]
    # Without fine-tuning (cle-bc) the seed changes nothing: one run, its record repeated for the other seeds.
    first_seed = int(args.seeds.split(",")[0])
    repeats = [t for t in tasks if METHODS[t["method"]].get("finetune", {}).get("epochs") == 0
               and t["seed"] != first_seed]
    tasks = [t for t in tasks if t not in shared and t not in repeats]
    os.environ["PFQ_EDGE_QUIET"] = "1"
    t0 = time.time()
    records = []
    from rich.progress import Progress

    with Progress() as bar:
        job = bar.add_task("pfq_accuracy runs", total=len(tasks))
        if args.jobs == 1:
            for t in tasks:
                records.append(_run(t))
                bar.advance(job)
                _log(records[-1])
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=8) as pool:
                for rec in pool.imap_unordered(_run, tasks):
                    records.append(rec)
                    bar.advance(job)
                    _log(rec)
    for t in shared:
        base = next(r for r in records if (r["model"], r["bits"], r["method"], r["seed"]) ==
                    (t["model"], t["bits"], "qat", t["seed"]))
        records.append({**base, "method": t["method"], "same_as": "qat"})
    for t in repeats:
        base = next(r for r in records if (r["model"], r["bits"], r["method"], r["seed"]) ==
                    (t["model"], t["bits"], t["method"], first_seed))
        records.append({**base, "seed": t["seed"], "seed_independent": True})
    executed = len(tasks)
    tasks += shared + repeats
    records.sort(key=lambda r: grid[(r["model"], r["bits"], r["method"], r["seed"])])
    rows = aggregate(records)
    meta = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "wall_s": round(time.time() - t0, 1), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
            "jobs": args.jobs, "threads": threads, "runs": executed, "epochs": args.epochs,
            "train_samples": args.train_samples, "lr": args.lr, "seeds": args.seeds, "test_images": args.test_images}
    from pfq_edge.io import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps({"meta": meta, "rows": rows, "runs": records},
                                                                 indent=2) + "\n")
    atomic_write_text(args.out / f"{args.name}.md", markdown(rows, meta))
    plot(rows, args.out / f"{args.name}.png")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
