"""The data forms ``--data`` takes, each read into ``Split``s with a manifest record.

- ``fashion-mnist``: the Debian IDX files (pfq_edge/data.py), in memory, file order (already random).
- an image folder ``DIR/{train,test[,val]}/<class>/*.png|jpg|jpeg|bmp``: classes are the sorted folder names
  (torchvision's ImageFolder); streamed; each split's file list shuffled with a fixed seed.
- an array file ``.npz``: ``x_train, y_train, x_test, y_test`` (optional ``x_val, y_val, classes``), images
  (N, H, W) or (N, H, W, C) uint8 or float in [0, 1]; in memory, shuffled with a fixed seed.
- a Python dataset ``package.module:factory``: returns {"train": ds, "test": ds[, "val": ds]} of map-style
  datasets yielding (image, label), the image a tensor (C, H, W) in [0, 1] or a Pillow image; streamed.

A new form: a reader returning ``Source`` here, and a branch in ``read_source``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pfq_edge.datasets.preprocess import Preprocess, image_channels
from pfq_edge.datasets.split import Split
from pfq_edge.export.device.run import IMAGE_SUFFIXES  # the image files run.py reads, the same list
from pfq_edge.errors import DataError, first_line

SHUFFLE_SEED = 0  # the fixed order of folder and array splits (calibration / golden checks take the first images)
SPLITS = ("train", "test", "val")


@dataclass
class Source:
    """What a reader returns: splits by name (train, test, optional val), class names, and the manifest record."""

    kind: str
    splits: dict[str, Split]
    classes: tuple[str, ...]
    record: dict = field(default_factory=dict)  # name, source, sha256, per-split counts, ...


def read_source(source: str, preprocess: Preprocess, data_dir: Path | None = None) -> Source:
    """Read ``source`` (see the module docstring) with ``preprocess``. Raises DataError (one line)."""
    text = str(source)
    if text == "fashion-mnist":
        return read_fashion_mnist(data_dir, preprocess)
    path = Path(text)
    if text.endswith(".npz"):
        return read_arrays(path, preprocess)
    if path.is_dir():
        return read_folder(path, preprocess)
    if ":" in text and not path.exists() and "/" not in text.split(":")[0]:
        return read_python(text, preprocess)
    if not path.exists():
        raise DataError(f"--data {text}: no such folder or file (expected an image folder, an .npz file, a .toml "
                        f"data spec, package.module:factory or fashion-mnist)")
    raise DataError(f"--data {text}: not an image folder, .npz, .toml or module:factory")


# --- Fashion-MNIST -----------------------------------------------------------------------------------------------

def read_fashion_mnist(data_dir: Path | None, preprocess: Preprocess) -> Source:
    from pfq_edge.data import CLASSES, DEFAULT_DATA_DIR, load_split

    splits = {}
    for name in ("train", "test"):
        s = load_split(name, data_dir)
        if preprocess.resizes or preprocess.channels not in (None, 1):
            s = Split(preprocess.tensor(s.images), s.labels)
        splits[name] = s
    folder = Path(data_dir or DEFAULT_DATA_DIR)
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*-ubyte*")):
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return Source("fashion-mnist", splits, tuple(CLASSES),
                  {"name": "Fashion-MNIST", "source": str(folder), "sha256": digest.hexdigest(),
                   "hash_of": "the IDX files"})


# --- image folder ------------------------------------------------------------------------------------------------

class FolderImages:
    """Map-style dataset over image files: item i → (float32 (C, H, W) in [0, 1], label)."""

    def __init__(self, files: list[Path], labels: list[int], preprocess: Preprocess):
        self.files, self.labels, self.preprocess = files, labels, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                x = self.preprocess.pil(im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image {path}: {first_line(exc)}") from None
        return x, self.labels[i]


def read_folder(root: Path, preprocess: Preprocess) -> Source:
    import torch
    from PIL import Image, UnidentifiedImageError

    for name in ("train", "test"):
        if not (root / name).is_dir():
            raise DataError(f"image folder {root} has no {name}/ folder (expected {root}/train/<class>/*.png and "
                            f"{root}/test/<class>/*.png)")
    classes = tuple(sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise DataError(f"{root}/train has no class folders (expected {root}/train/<class>/*.png)")
    lists: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        extra = [d for d in found if d not in classes]
        if extra:
            raise DataError(f"{folder} has class folder {extra[0]!r} that {root}/train lacks")
        items = []
        for label, cls in enumerate(classes):
            d = folder / cls
            if not d.is_dir():
                continue
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            items += [(f, label) for f in files]
        if not items:
            raise DataError(f"{folder} holds no images")
        lists[split] = items
    # Headers only (Pillow opens lazily): sizes and modes of every image, and a first check that each is an image.
    sizes, modes = {}, set()
    for split, items in lists.items():
        for f, _ in items:
            try:
                with Image.open(f) as im:
                    sizes.setdefault(im.size, f)
                    modes.add(im.mode)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {f}: {first_line(exc)}") from None
    if preprocess.image_size is None and len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise DataError(f"images have different sizes ({s1[0]}×{s1[1]} in {f1}, {s2[0]}×{s2[1]} in {f2}); pass "
                        f"--image-size H[,W]")
    if preprocess.channels is None:  # grey folders stay 1 channel; any colour image makes the whole set RGB
        channels = 1 if all(image_channels(m) == 1 for m in modes) else 3
        preprocess = preprocess.model_copy(update={"channels": channels})
    digest = hashlib.sha256()
    splits = {}
    for split, items in lists.items():
        gen = torch.Generator().manual_seed(SHUFFLE_SEED)
        items = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
        for f, _ in sorted(items):
            digest.update(f"{f.relative_to(root)}\t{f.stat().st_size}\n".encode())
        files, labels = [f for f, _ in items], [y for _, y in items]
        splits[split] = Split(labels=torch.tensor(labels, dtype=torch.int64),
                              dataset=FolderImages(files, labels, preprocess), indices=range(len(files)))
    return Source("image-folder", splits, classes,
                  {"name": root.name, "source": str(root), "sha256": digest.hexdigest(), "hash_of": "file list "
                   "(relative path and byte size of every image)", "channels": preprocess.channels})


# --- array file --------------------------------------------------------------------------------------------------

def read_arrays(path: Path, preprocess: Preprocess) -> Source:
    import numpy as np
    import torch

    if not path.is_file():
        raise DataError(f"array file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        files = set(data.files)
    except Exception as exc:
        raise DataError(f"cannot read {path} as an .npz of arrays: {first_line(exc)}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in files]
    if missing:
        raise DataError(f"{path} lacks array {missing[0]!r} (it has {sorted(files)}; expected x_train, y_train, "
                        f"x_test, y_test, optional x_val, y_val, classes)")
    raw = {}
    for split in SPLITS:
        if f"x_{split}" not in files:
            continue
        try:
            x, y = data[f"x_{split}"], data[f"y_{split}"]
        except KeyError:
            raise DataError(f"{path} has x_{split} but no y_{split}") from None
        except Exception as exc:
            raise DataError(f"cannot read {path}: {first_line(exc)}") from None
        raw[split] = (_images(x, f"{path}: x_{split}"), _labels(y, len(x), f"{path}: y_{split}"))
    inferred = "classes" not in files
    if not inferred:
        classes = tuple(str(c) for c in data["classes"].tolist())
    else:  # no names: labels 0..max, named by number
        classes = tuple(str(i) for i in range(max(int(y.max()) for _, y in raw.values() if len(y)) + 1))
        top = {split: int(y.max()) for split, (_, y) in raw.items() if len(y)}
        record_note = (f"{len(classes)} classes inferred from the labels (no 'classes' array; the largest label, "
                       f"{max(top.values())}, is in y_{max(top, key=top.get)})")
    shapes = {x.shape[1:] for x, _ in raw.values()}
    if len(shapes) > 1 and preprocess.image_size is None:
        raise DataError(f"{path}: the splits hold images of shapes {sorted(shapes)}; pass --image-size H[,W]")
    splits = {}
    for split, (x, y) in raw.items():
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            bad = int(y.max()) if y.max() >= len(classes) else int(y.min())
            raise DataError(f"{path}: y_{split} holds label {bad}, outside 0..{len(classes) - 1} "
                            f"({len(classes)} classes)")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SHUFFLE_SEED))
        images = preprocess.tensor(torch.from_numpy(x)[order])
        splits[split] = Split(images, torch.from_numpy(y.astype(np.int64))[order])
    record = {"name": path.stem, "source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
              "hash_of": "the .npz file"}
    if inferred:
        record["classes_note"] = record_note
    return Source("arrays", splits, classes, record)


def _images(x, what: str):
    import numpy as np

    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DataError(f"{what} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3")
    if len(x) == 0:
        raise DataError(f"{what} holds no images")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / 255.0
    if x.dtype.kind != "f":
        raise DataError(f"{what} has dtype {x.dtype}; expected uint8 pixels or floats in [0, 1]")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{what} holds NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{what} holds values in [{x.min():.3g}, {x.max():.3g}]; expected uint8 pixels or floats "
                        f"in [0, 1] (give mean/std with --mean/--std, not normalised arrays)")
    return x


def _labels(y, n: int, what: str):
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise DataError(f"{what} has shape {y.shape} and dtype {y.dtype}; expected ({n},) integers")
    return y


# --- Python dataset ----------------------------------------------------------------------------------------------

class _Preprocessed:
    """A user dataset's items through ``preprocess``: (tensor (C, H, W) in [0, 1] or Pillow image, label)."""

    def __init__(self, dataset, preprocess: Preprocess, name: str):
        self.dataset, self.preprocess, self.name = dataset, preprocess, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        import torch

        try:
            x, y = self.dataset[i]
        except Exception as exc:
            raise DataError(f"dataset {self.name}: item {i} fails: {first_line(exc)}") from None
        from PIL import Image

        if isinstance(x, Image.Image):
            return self.preprocess.pil(x), int(y)
        try:
            x = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"dataset {self.name}: item {i} holds a {type(x).__name__} as its image; expected a "
                            f"tensor or array (C, H, W) in [0, 1] or a Pillow image") from None
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise DataError(f"dataset {self.name}: item {i} is an image of shape {tuple(x.shape)}; expected (C, H, W)")
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise DataError(f"dataset {self.name}: item {i} holds values outside [0, 1] (or NaN); return pixels in "
                            f"[0, 1] and give mean/std with --mean/--std")
        return self.preprocess.tensor(x[None])[0], int(y)


def read_python(spec: str, preprocess: Preprocess) -> Source:
    import torch

    module_name, _, attr = spec.partition(":")
    try:
        from pfq_edge.io import import_user_module

        factory = getattr(import_user_module(module_name), attr)
    except Exception as exc:
        raise DataError(f"cannot import dataset factory {spec!r}: {first_line(exc)}") from None
    try:
        out = factory()
    except Exception as exc:
        raise DataError(f"dataset factory {spec!r} failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(out, dict) or not {"train", "test"} <= set(out):
        raise DataError(f"dataset factory {spec!r} returned {type(out).__name__}; expected a dict with 'train' "
                        f"and 'test' datasets (optional 'val', 'classes')")
    splits, top = {}, 0
    for split in SPLITS:
        ds = out.get(split)
        if ds is None:
            continue
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
            raise DataError(f"dataset factory {spec!r}: {split!r} is not a non-empty map-style dataset")
        wrapped = _Preprocessed(ds, preprocess, f"{spec} [{split}]")
        labels = getattr(ds, "targets", None)
        if labels is None or len(labels) != len(ds):
            labels = [wrapped.dataset[i][1] for i in range(len(ds))]  # no .targets: read every item once
        labels = torch.as_tensor([int(v) for v in labels], dtype=torch.int64)
        top = max(top, int(labels.max()) + 1)
        if int(labels.min()) < 0:
            raise DataError(f"dataset {spec!r} [{split}] holds label {int(labels.min())}")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SHUFFLE_SEED)).tolist()
        splits[split] = Split(labels=labels[order], dataset=wrapped, indices=order)
    classes = out.get("classes") or getattr(out["train"], "classes", None)
    classes = tuple(str(c) for c in classes) if classes else tuple(str(i) for i in range(top))
    if top > len(classes):
        raise DataError(f"dataset {spec!r} holds label {top - 1}, outside 0..{len(classes) - 1} "
                        f"({len(classes)} classes)")
    return Source("python", splits, classes, {"name": spec, "source": spec, "sha256": None,
                                              "hash_of": "not hashed (Python dataset)"})
