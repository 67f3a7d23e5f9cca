"""Train a zoo model on Fashion-MNIST, reproducibly, and save it as safetensors.

    python examples/train_fashion_mnist.py --epochs 15 --out pfq_edge/weights
    python examples/train_fashion_mnist.py --arch fashion-mbv2 --optimizer sgd --lr 0.2 --weight-decay 1e-3 \
        --schedule onecycle --epochs 8 --name fashion-mbv2

Default recipe (``fashion-dscnn``): Adam lr 1e-3 with coupled L2 weight decay 5e-4 (torch.optim.Adam, not AdamW),
batch 128, cosine LR, seed 0, all 60,000 training images. ``--optimizer sgd`` uses momentum 0.9 with L2 weight
decay; a ReLU filter that dies under it gets no gradient but its weight decay, so its weights shrink towards 0 and
its BN output towards the constant β (the filters PfQ removes). Writes ``NAME.safetensors`` and ``NAME.json`` (test
top-1, the command, the recipe, wall time, BN channels with running_var == 0 and constant filters by PfQ's exact
rule) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pfq_edge.data import load_split
from pfq_edge.pfq.criterion import constant_mask
from pfq_edge.io import atomic_write_bytes, atomic_write_text
from pfq_edge.train import TrainConfig, accuracy, set_seed, train
from pfq_edge.zoo import fashion_dscnn, fashion_mbv2, fashion_resnet

ARCHITECTURES = {"fashion-dscnn": fashion_dscnn, "fashion-mbv2": fashion_mbv2, "fashion-resnet": fashion_resnet}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--channels", default="32,64,128,128,256", help="stem and block widths, comma-separated")
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="fashion-dscnn")
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    ap.add_argument("--schedule", choices=("cosine", "constant", "onecycle"), default="cosine")
    ap.add_argument("--name", default="fashion-dscnn", help="file stem of the weights and metadata written")
    ap.add_argument("--out", type=Path, default=Path("pfq_edge/weights"))
    args = ap.parse_args()

    set_seed(args.seed)
    channels = tuple(int(c) for c in args.channels.split(","))
    model = fashion_dscnn(channels) if args.arch == "fashion-dscnn" else ARCHITECTURES[args.arch]()
    train_set, test_set = load_split("train", args.data_dir), load_split("test", args.data_dir)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                      seed=args.seed, schedule=args.schedule,
                      optimizer=args.optimizer, momentum=args.momentum)
    t0 = time.time()
    history = []

    def on_epoch(epoch: int, loss: float) -> None:
        acc = accuracy(model, test_set)
        history.append({"epoch": epoch, "train_loss": round(loss, 4), "test_top1": acc})
        print(f"epoch {epoch}/{args.epochs}: loss {loss:.4f} test top-1 {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)

    train(model, train_set, cfg, description="float training", on_epoch=on_epoch)
    wall = time.time() - t0

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    dead = sum(int((m.running_var == 0).sum()) for m in bns)
    constant = sum(int(constant_mask(m).sum()) for m in bns)
    from safetensors.torch import save

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / f"{args.name}.safetensors",
                       save({k: v.contiguous() for k, v in model.state_dict().items()}))
    meta = {
        "model": args.name,
        "test_top1": history[-1]["test_top1"],
        "history": history,
        "bn_channels_running_var_zero": dead,
        "constant_filters_exact_rule": constant,
        "recipe": {k: getattr(args, k) for k in ("optimizer", "momentum", "epochs", "lr", "weight_decay",
                                                  "batch_size", "seed", "schedule")},
        **({"channels": list(channels)} if args.arch == "fashion-dscnn" else {"architecture": args.arch}),
        "command": "python " + " ".join(sys.argv),
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: meta[k] for k in ("test_top1", "bn_channels_running_var_zero", "constant_filters_exact_rule",
                                           "wall_s")}))


if __name__ == "__main__":
    main()
