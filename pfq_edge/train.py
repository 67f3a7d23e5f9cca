"""Training, quantization-aware fine-tuning and evaluation loops (plain PyTorch; CPU, or several processes).

Used by ``examples/train_fashion_mnist.py`` for the float baselines and by the finetune step for QAT.
Under ``torchrun --nproc_per_node=N`` (torch.distributed initialised, see ``dist.py``) every global batch is split
across the processes, gradients and metrics are summed over them, and only rank 0 writes checkpoints, so N
processes follow the same trajectory as one (up to floating-point summation order).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from pfq_edge import dist
from pfq_edge.datasets.split import Split
from pfq_edge.errors import ModelError
from pfq_edge.progress import progress_bar


@dataclass
class TrainConfig:
    """Optimiser settings: ``optimizer`` "adam" (torch.optim.Adam, coupled L2 ``weight_decay``) or "sgd" (momentum
    ``momentum``, L2 ``weight_decay``), LR ``schedule`` over all steps.

    ``distill_alpha`` > 0 adds knowledge distillation from a teacher:
    (1 − α)·CE + α·T²·KL(teacher_T ‖ student_T).
    ``patience``: with a validation split, stop after this many epochs without a better validation top-1.
    """

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128           # global batch, split across processes under torchrun
    seed: int = 0
    max_samples: int | None = None  # use only the first N training images per epoch (None: all)
    schedule: str = "cosine"        # "cosine" (to 0 over all steps), "constant" or "onecycle" (peak ``lr``)
    optimizer: str = "adam"         # "adam" or "sgd"
    momentum: float = 0.9           # SGD only
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    patience: int = 2


@dataclass
class TrainResult:
    """Per-epoch mean training ``losses``; validation top-1 before fine-tuning (index 0) and after each epoch
    (empty without a split); the epoch whose weights were kept (``best_epoch``; 0 = the weights before
    fine-tuning); whether early stopping ended it; and the epoch resumed after."""

    losses: list[float] = field(default_factory=list)
    val_top1: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    resumed_after_epoch: int = 0


def set_seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model, data: Split, cfg: TrainConfig, description: str = "train", on_epoch=None, teacher=None,
          validation: Split | None = None, checkpoint: Path | None = None, checkpoint_key: str = "",
          resume: bool = False) -> TrainResult:
    """Train ``model`` in place on ``data`` (a Split: images (N, C, H, W) float32, labels (N,)); returns a TrainResult.

    Shuffling uses a generator seeded with ``cfg.seed``, so the same inputs give the same weights.
    ``teacher``: float model for distillation (used when ``cfg.distill_alpha`` > 0). ``validation``: held-out
    split evaluated before fine-tuning and after each epoch; the best weights are kept (possibly the ones before
    fine-tuning) and ``cfg.patience`` bounds the wait.
    ``checkpoint``: file written (atomically, rank 0) after every epoch; with ``resume`` and an existing file,
    training continues after its last epoch. ``checkpoint_key`` identifies the run (model, settings); a checkpoint
    of another run raises ModelError. ``on_epoch(epoch, mean_loss)`` (1-based epoch) is called after each epoch.
    """
    import torch
    from torch.nn import functional as F

    data = data.subset(cfg.max_samples)
    n = len(data)
    rank, world = dist.rank_and_world()
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    state = None
    if resume and checkpoint is not None and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, checkpoint_key)
        model.load_state_dict(state["model"])  # before the optimizer: Brevitas may replace scale parameters here
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    elif cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr,
                                                    total_steps=max(1, cfg.epochs * steps_per_epoch))
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    result, best_state, waited = TrainResult(), None, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        best_state, waited = state.get("best_model"), state["waited"]
        result = TrainResult(state["losses"], state["val_top1"], state["best_epoch"], False, len(state["losses"]))
    elif validation is not None:  # the quantized model before fine-tuning is the first candidate to keep
        result.val_top1, result.best_epoch = [accuracy(model, validation)], 0
        best_state = copy.deepcopy(model.state_dict())
    distill = teacher is not None and cfg.distill_alpha > 0
    if distill:
        teacher.eval()
    temp = cfg.distill_temperature
    with progress_bar(description, total=(cfg.epochs - result.resumed_after_epoch) * steps_per_epoch) as advance:
        for epoch in range(result.resumed_after_epoch, cfg.epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            total = torch.zeros(1, dtype=torch.float64)
            batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps_per_epoch)]
            # this process's share of each global batch; a streamed split decodes them in worker processes
            shares = data.batches(cfg.batch_size, [b[rank::world] for b in batches])
            for batch, (images, labels) in zip(batches, shares):
                logits = model(images)
                # Sum over the local share / global batch size: summing gradients over ranks gives the batch mean.
                loss_sum = F.cross_entropy(logits, labels, reduction="sum")
                total += loss_sum.detach().double()
                if distill:
                    with torch.no_grad():
                        soft = F.softmax(teacher(images) / temp, dim=1)
                    kd = F.kl_div(F.log_softmax(logits / temp, dim=1), soft, reduction="sum") * temp * temp
                    loss_sum = (1 - cfg.distill_alpha) * loss_sum + cfg.distill_alpha * kd
                opt.zero_grad(set_to_none=True)
                (loss_sum / len(batch)).backward()
                dist.sum_gradients(model)
                opt.step()
                sched.step()
                advance(1)
            result.losses.append(float(dist.reduce_sum(total)) / n)
            if validation is not None:
                acc = accuracy(model, validation)
                result.val_top1.append(acc)
                if acc > result.val_top1[result.best_epoch]:
                    result.best_epoch, best_state, waited = epoch + 1, copy.deepcopy(model.state_dict()), 0
                else:
                    waited += 1
            else:
                result.best_epoch = epoch + 1
            if checkpoint is not None and rank == 0:
                _save_checkpoint(checkpoint, checkpoint_key, model, opt, sched, gen, result, best_state, waited)
            if on_epoch is not None:
                on_epoch(epoch + 1, result.losses[-1])
                model.train()
            if validation is not None and waited >= cfg.patience:
                result.stopped_early = epoch + 1 < cfg.epochs
                break
    if best_state is not None and result.best_epoch != len(result.losses):
        model.load_state_dict(best_state)
    model.eval()
    return result


def _save_checkpoint(path: Path, key: str, model, opt, sched, gen, result: TrainResult, best_state, waited) -> None:
    import io

    import torch

    from pfq_edge.io import atomic_write_bytes

    from pfq_edge.errors import OutputError

    buf = io.BytesIO()
    torch.save({"key": key, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": gen.get_state(), "losses": result.losses,
                "val_top1": result.val_top1, "best_epoch": result.best_epoch, "best_model": best_state,
                "waited": waited}, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {path}: {exc.strerror}") from None


def read_checkpoint(path: Path) -> dict:
    """A fine-tuning checkpoint written by ``train`` (torch.load with weights_only=True: no code runs).
    Raises ModelError if the file is unreadable or not a pfq-edge checkpoint."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    if not isinstance(state, dict) or not {"key", "model", "optimizer", "generator"} <= set(state):
        raise ModelError(f"checkpoint {path} is not a pfq-edge fine-tuning checkpoint (unreadable or another "
                         f"format); remove it or drop --resume")
    return state


def _load_checkpoint(path: Path, key: str) -> dict:
    state = read_checkpoint(path)
    if state.get("key") != key:
        raise ModelError(f"checkpoint {path} belongs to another run (model, bit widths, PfQ rule or fine-tuning "
                         f"settings differ); remove it or drop --resume")
    return state


def predict(model, images, batch_size: int = 500):
    """Logits (N, classes) float32 of ``model`` in eval mode on ``images``: a tensor (N, C, H, W) or a ``Split``
    (streamed splits are decoded batch by batch), without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        if isinstance(images, Split):
            return torch.cat([_as_tensor(model(x)) for x, _ in images.batches(batch_size)])
        return torch.cat([_as_tensor(model(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def predict_float64(model, images, batch_size: int = 64):
    """Logits (N, classes) as a float64 numpy array of a copy of ``model`` run in float64 on ``images`` (N, C, H, W):
    the quantized model's function without float32 rounding — the arbiter of pfq_edge.golden. ``model`` itself is
    left as it is."""
    import copy

    import torch

    twin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return torch.cat([_as_tensor(twin(images[i:i + batch_size].double()))
                          for i in range(0, len(images), batch_size)]).numpy()


def _as_tensor(out):
    # Brevitas layers may return a QuantTensor; its .value is the dequantized float tensor.
    return out.value if hasattr(out, "value") and not hasattr(out, "dim") else out


def top1(logits, data: Split) -> float:
    """Top-1 accuracy in [0, 1] of ``logits`` (N, classes) against ``data.labels``."""
    return float((logits.argmax(1) == data.labels).float().mean())


def accuracy(model, data: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``data``; under torchrun each process scores its share of the
    images and the counts are summed, so every process returns the same value."""
    import torch

    rank, world = dist.rank_and_world()
    share = data.strided(rank, world)  # in memory a view: no copy of the images
    logits = predict(model, share, batch_size)
    correct = torch.tensor([float((logits.argmax(1) == share.labels).sum())], dtype=torch.float64)
    return float(dist.reduce_sum(correct)) / len(data)
