"""Peak memory of calibration and fine-tuning on a 224×224 image folder (streamed through DataLoader workers).

    .venv/bin/python benchmarks/data_stream.py [--images 5000] [--epochs 1]

Writes an image folder of ``--images`` 224×224 RGB JPEGs (Fashion-MNIST upsampled, 5 classes, 10% test), then runs
``pfq-edge compile --target cpu --to-step finetune`` on it with a small 224×224 CNN (``net224`` below, trained by
nobody: memory, not accuracy, is measured) and samples the memory of the whole process tree (the compile and its
DataLoader workers) every 0.2 s from /proc: the peak of the summed RSS (an upper bound: forked workers share
pages) and of the summed PSS. Writes benchmarks/results/data_stream.{json,md}. Budget: ≤ 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
BUDGET_GIB = 4.0
CLASSES = 5


def net224(num_classes: int = CLASSES):
    """(N, 3, 224, 224) → logits: a MobileNet-like stem and three stride-2 conv-BN-ReLU blocks, max pool, linear."""
    layers, c = [], 3
    for w in (16, 32, 64, 96):
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(96 * 7 * 7, num_classes))


def write_folder(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pfq_edge.data import load_split

    split = load_split("train")
    x, y = (split.images[:, 0].numpy() * 255).astype(np.uint8), split.labels.numpy()
    keep = np.flatnonzero(y < CLASSES)[:n]
    for k, i in enumerate(keep):
        part = "test" if k % 10 == 0 else "train"
        d = root / part / f"class{y[i]}"
        d.mkdir(parents=True, exist_ok=True)
        rgb = np.stack([x[i], x[i] // 2, 255 - x[i]], axis=2)  # colour, so that the three channels differ
        Image.fromarray(rgb).resize((224, 224), Image.Resampling.BILINEAR).save(d / f"{k:05d}.jpg", quality=90)


def tree_memory(pid: int) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of ``pid`` and all its descendants."""
    pids, rss, pss = [pid], 0, 0
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                pids += [int(c) for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, pss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder224"
        t = time.perf_counter()
        write_folder(root, args.images)
        counts = {s: sum(1 for _ in (root / s).rglob("*.jpg")) for s in ("train", "test")}
        weights = Path(tmp) / "net224.safetensors"
        from safetensors.torch import save_file

        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in net224().state_dict().items()}, str(weights))
        cmd = [sys.executable, "-m", "pfq_edge", "compile", "--target", "cpu", "--model", "data_stream:net224",
               "--weights", str(weights), "--data", str(root), "--mean", "0.3", "--std", "0.3", "--epochs",
               str(args.epochs), "--to-step", "finetune", "--out", str(Path(tmp) / "out")]
        env = {**os.environ, "PFQ_EDGE_QUIET": "1"}
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).parent, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        peak_rss = peak_pss = 0
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.2)
        wall = time.perf_counter() - t
        err = proc.stderr.read()
    in_memory = counts["train"] * 3 * 224 * 224 * 4 / 2**30
    row = {"images": counts, "epochs": args.epochs, "rc": proc.returncode, "wall_s": round(wall, 1),
           "peak_tree_rss_gib": round(peak_rss / 2**30, 3), "peak_tree_pss_gib": round(peak_pss / 2**30, 3),
           "train_split_as_one_float32_tensor_gib": round(in_memory, 2), "budget_gib": BUDGET_GIB,
           "cores": os.cpu_count(), "stderr_tail": err[-300:]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_stream.json").write_text(json.dumps(row, indent=2) + "\n")
    verdict = "within" if peak_pss / 2**30 <= BUDGET_GIB else "over"
    (RESULTS / "data_stream.md").write_text(
        f"# Streaming a 224×224 image folder: calibration + fine-tuning memory\n\n"
        f"Command: `.venv/bin/python benchmarks/data_stream.py --images {args.images} --epochs {args.epochs}` "
        f"({row['cores']} cores)\n\n"
        f"| images (train / test) | epochs | wall s | peak RSS, process tree (GiB) | peak PSS, process tree (GiB) | "
        f"train split as one float32 tensor (GiB) | budget |\n|---|---|---|---|---|---|---|\n"
        f"| {counts['train']} / {counts['test']} | {args.epochs} | {row['wall_s']} | {row['peak_tree_rss_gib']} | "
        f"{row['peak_tree_pss_gib']} | {row['train_split_as_one_float32_tensor_gib']} | ≤ {BUDGET_GIB} GiB: "
        f"{verdict} |\n\n"
        f"`pfq-edge compile --target cpu --to-step finetune` (load, PfQ, quantize with 1,024 calibration images, "
        f"QAT over the whole train split), exit {proc.returncode}. RSS sums every process of the tree (the DataLoader "
        f"workers share the parent's pages, so this overcounts); PSS splits shared pages between them.\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
