"""PfQ on EfficientNet-Lite0: analyze + prune time, and pruned-vs-original logits on real images.

    .venv/bin/python benchmarks/pfq_effnet.py [--images 1000] [--repeats 5]

Times (median of --repeats, model already loaded): `analyze_pfq` (trace, plan, compensate, slice, per-layer
statistics) and `save_pruned`. Images: Fashion-MNIST test images resized to 224×224, 3 channels, ImageNet
normalisation. Writes benchmarks/results/pfq_effnet.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pfq_edge.pfq.analyze import analyze_pfq
from pfq_edge.data import adapt_images, load_split
from pfq_edge.export.pruned import save_pruned
from pfq_edge.train import predict
from pfq_edge.zoo import load_model

RESULTS = Path(__file__).parent / "results"
BUDGET_S = 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    t0 = time.perf_counter()
    loaded = load_model("efficientnet-lite0")
    load_s = time.perf_counter() - t0
    example = torch.zeros(1, 3, 224, 224)
    times, save_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t = time.perf_counter()
            pruned, analysis = analyze_pfq(loaded.module, example)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            save_pruned(pruned, analysis.plan, "efficientnet-lite0", Path(tmp) / "p.safetensors", loaded.weights)
            save_times.append(time.perf_counter() - t)
    x = adapt_images(load_split("test").images[:args.images], (3, 224, 224), imagenet_norm=True)
    ref, out = predict(loaded.module, x, batch_size=50), predict(pruned, x, batch_size=50)
    doc = {
        "command": "python benchmarks/pfq_effnet.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "analyze_prune_median_s": statistics.median(times), "analyze_prune_all_s": times,
        "save_median_s": statistics.median(save_times),
        "constant_total": analysis.constant_total, "constant_removed": analysis.constant_removed,
        "filters_removed": analysis.plan.filters_removed,
        "range_inflating_kept": sum(r["range_inflating_filters"] for r in analysis.layers),
        "images": len(x), "max_abs_logit_diff": float((ref - out).abs().max()),
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pfq_effnet.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [
        "# PfQ on EfficientNet-Lite0 (ImageNet-pretrained)", "", f"Command: `{doc['command']}` "
        f"({doc['threads']} threads)", "",
        "| measurement | value | budget |", "|---|---|---|",
        f"| analyze + prune (trace, plan, compensate, slice, statistics), median of {args.repeats} | "
        f"{doc['analyze_prune_median_s']:.2f} s | ≤ {BUDGET_S} s (ratio {doc['analyze_prune_median_s'] / BUDGET_S:.2f}) |",
        f"| write pruned model (safetensors) | {doc['save_median_s']:.2f} s | |",
        f"| load model + weights | {doc['load_s']:.2f} s | |",
        f"| constant channels (running_var = 0) found / removed | {doc['constant_total']} / "
        f"{doc['constant_removed']} | all |",
        f"| σ² ≤ ε channels with real spread (reported, kept) | {doc['range_inflating_kept']} | |",
        f"| real images (Fashion-MNIST → 224×224×3, ImageNet norm.) | {doc['images']} | ≥ 1,000 |",
        f"| max abs logit difference, pruned vs original | {doc['max_abs_logit_diff']:.2e} | ≤ 1e-4 |",
        f"| top-1 agreement | {doc['top1_agreement']:.2%} | 100% |",
    ]
    (RESULTS / "pfq_effnet.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
