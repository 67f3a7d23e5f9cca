"""Training, quantization-aware fine-tuning and evaluation loops (plain PyTorch, CPU).

Used by ``examples/train_fashion_mnist.py`` for the float baseline and by the finetune stage for QAT.
"""

from __future__ import annotations

from dataclasses import dataclass

from pfq_edge.data import Split
from pfq_edge.progress import progress_bar


@dataclass
class TrainConfig:
    """Optimiser settings: Adam with coupled L2 ``weight_decay`` (torch.optim.Adam), cosine LR over all steps."""

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    seed: int = 0
    max_samples: int | None = None  # use only the first N training images per epoch (None: all)


def set_seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model, data: Split, cfg: TrainConfig, description: str = "train", on_epoch=None) -> list[float]:
    """Train ``model`` in place on ``data`` (images (N, 1, H, W) float32, labels (N,)); returns per-epoch mean loss.

    Shuffling uses a generator seeded with ``cfg.seed``, so the same inputs give the same weights.
    ``on_epoch(epoch, mean_loss)`` (1-based epoch) is called after each epoch, e.g. to evaluate or log.
    """
    import torch
    from torch.nn import functional as F

    data = data.subset(cfg.max_samples)
    n = len(data)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with progress_bar(description, total=cfg.epochs * steps_per_epoch) as advance:
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(steps_per_epoch):
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                advance(1)
            losses.append(total / n)
            if on_epoch is not None:
                on_epoch(epoch + 1, losses[-1])
                model.train()
    model.eval()
    return losses


def predict(model, images, batch_size: int = 500):
    """Logits (N, classes) float32 of ``model`` in eval mode on ``images`` (N, C, H, W), without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([_as_tensor(model(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def _as_tensor(out):
    # Brevitas layers may return a QuantTensor; its .value is the dequantized float tensor.
    return out.value if hasattr(out, "value") and not hasattr(out, "dim") else out


def accuracy(model, data: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``data``."""
    logits = predict(model, data.images, batch_size)
    return float((logits.argmax(1) == data.labels).float().mean())


