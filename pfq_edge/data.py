"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

Images come back as float32 tensors (N, 1, 28, 28) scaled to [0, 1] (pixel / 255) and labels as int64 (N,).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from pfq_edge.datasets.split import Split
from pfq_edge.errors import DataError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8}
_INSTALL_HINT = "install the Debian package: apt-get install dataset-fashion-mnist (or pass --data-dir)"


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a uint8 array of its declared shape.

    Raises DataError if the file is missing, truncated or not IDX (magic 0x0000, type 0x08).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"dataset file not found: {path}; {_INSTALL_HINT}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read dataset file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, its header declares {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (data_dir / name).exists():
            return data_dir / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {data_dir}; {_INSTALL_HINT}")


def load_split(split: str, data_dir: Path | str | None = None) -> Split:
    """Load ``split`` ("train": 60,000 images, "test": 10,000) from ``data_dir`` (default: the Debian path).

    Raises DataError naming the missing file and the package to install.
    """
    import torch

    if split not in _FILES:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_FILES)}")
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_find(data_dir, img_stem))
    labels = read_idx(_find(data_dir, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{data_dir}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(x, y)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def adapt_images(images, shape: tuple[int, int, int], imagenet_norm: bool = False):
    """Fashion-MNIST images (N, 1, 28, 28) in [0, 1] as inputs of another shape (C, H, W): bilinear resize, the
    gray channel repeated C times, optionally ImageNet mean/std normalisation. Returns float32 (N, C, H, W)."""
    import torch
    from torch.nn import functional as F

    c, h, w = shape
    x = images if tuple(images.shape[2:]) == (h, w) else F.interpolate(images, size=(h, w), mode="bilinear",
                                                                        align_corners=False)
    x = x.repeat(1, c, 1, 1) if c != x.shape[1] else x
    if imagenet_norm and c == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()
