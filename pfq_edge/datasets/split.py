"""One split of a dataset: labels always in memory, images in memory or streamed.

A ``Split`` is what every step reads images from. In-memory splits (Fashion-MNIST, ``.npz`` arrays) hold one
float32 tensor; streamed splits (image folders, Python datasets) decode their images on demand through a torch
DataLoader with worker processes, so a 50,000-image 224×224 set is never in memory at once. Steps that need a
fixed handful of images (calibration, golden checks, example inputs) call ``take(n)``: the first ``n`` images, in
memory. Every split is in a fixed pseudo-random order (datasets/sources.py shuffles folder and array sources with a
fixed seed; Fashion-MNIST's own file order already is), so "the first n" is a sample of all classes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    import torch

from pfq_edge.errors import DataError

STREAM_WORKERS = min(4, os.cpu_count() or 1)


class Split:
    """``labels`` int64 (N,); images float32 (C, H, W) each, pixels in [0, 1] after preprocessing.

    In memory: ``images`` is an (N, C, H, W) tensor. Streamed: ``images`` is None and ``dataset`` is a map-style
    dataset yielding (image tensor, label); ``indices`` picks and orders its items.
    """

    def __init__(self, images=None, labels=None, dataset=None, indices: Sequence[int] | None = None):
        if images is None and dataset is None:
            raise ValueError("a split needs images or a dataset")
        self.images, self.labels, self.dataset = images, labels, dataset
        self.indices = list(indices) if indices is not None else None

    @property
    def streamed(self) -> bool:
        return self.images is None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def part(self, start: int | None = None, stop: int | None = None, step: int | None = None) -> "Split":
        """Samples ``start:stop:step`` in the same form (in memory: a view of the images)."""
        s = slice(start, stop, step)
        if not self.streamed:
            return Split(self.images[s], self.labels[s])
        return Split(labels=self.labels[s], dataset=self.dataset, indices=self.indices[s])

    def subset(self, n: int | None) -> "Split":
        """The first ``n`` samples (all if n is None or larger than the split), in the same form."""
        return self if n is None or n >= len(self) else self.part(0, n)

    def split_off(self, n: int) -> tuple["Split", "Split"]:
        """(all but the last ``n`` samples, the last ``n``): the validation hold-out."""
        keep = len(self) - n
        return self.part(0, keep), self.part(keep)

    def strided(self, start: int, step: int) -> "Split":
        """Every ``step``-th sample from ``start`` (one process's share under torchrun; a view in memory)."""
        return self.part(start, None, step)

    def take(self, n: int) -> "Split":
        """The first ``n`` samples as an in-memory split (decoded; names a file that cannot be read)."""
        part = self.subset(n)
        if not part.streamed:
            return part
        import torch

        images = torch.cat([x for x, _ in part.batches(256)]) if len(part) else torch.zeros(0)
        return Split(images, part.labels.clone())

    def batches(self, batch_size: int, order=None) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
        """(images (B, C, H, W), labels (B,)) batches in ``order`` (a list of index tensors, one per batch;
        default: consecutive batches of ``batch_size``). Streamed splits decode in STREAM_WORKERS processes."""
        import torch

        if order is None:
            order = [torch.arange(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]
        if not self.streamed:
            for idx in order:
                yield self.images[idx], self.labels[idx]
            return
        from torch.utils.data import DataLoader

        mapped = [[self.indices[int(i)] for i in idx] for idx in order]
        workers = STREAM_WORKERS if len(self) > batch_size else 0
        loader = DataLoader(self.dataset, batch_sampler=mapped, num_workers=workers, collate_fn=_collate,
                            persistent_workers=False, multiprocessing_context="fork" if workers else None)
        try:
            for idx, (images, _) in zip(order, loader):
                yield images, self.labels[idx]
        except DataError as exc:  # a worker's DataError comes back with its traceback in the message
            raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def _collate(items):
    import torch

    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
