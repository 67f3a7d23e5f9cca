"""The user's data: which images a compile (or ``analyze`` / ``prune --check``) uses and how they are prepared.

``DataSpec`` is the choice (``--data`` + preprocessing options, or a data TOML); ``load_dataset`` reads it into a
``Dataset`` (pfq_edge/compilation.py) of ``Split``s (datasets/split.py) plus class names, the input shape
(C, H, W) and the manifest record. The forms and their readers: datasets/sources.py; preprocessing:
datasets/preprocess.py; the user-facing guide: docs/data.md.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from pfq_edge.datasets.preprocess import Preprocess
from pfq_edge.datasets.split import Split
from pfq_edge.errors import DataError

DEFAULT_SOURCE = "fashion-mnist"

__all__ = ["DataSpec", "Preprocess", "Split", "load_dataset", "read_data_toml", "DEFAULT_SOURCE"]


class DataSpec(BaseModel):
    """source: "fashion-mnist" | image folder | .npz | package.module:factory; data_dir: Fashion-MNIST's IDX folder;
    preprocess: resize / crop / channels / mean / std. ``toml``: the data TOML it came from, if any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = DEFAULT_SOURCE
    data_dir: Optional[Path] = None
    preprocess: Preprocess = Preprocess()
    toml: Optional[Path] = None

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_SOURCE and self.preprocess == Preprocess()

    def facts(self) -> dict:
        """What a result depends on (``--from-step``): the source and the preprocessing."""
        return {"source": self.source, "data_dir": str(self.data_dir.resolve()) if self.data_dir else None,
                "preprocess": self.preprocess.model_dump(mode="json")}


_TOML_KEYS = {"source", "data_dir", "image_size", "center_crop", "channels", "mean", "std"}


def read_data_toml(path: Path) -> dict:
    """The keys of a data TOML (top level or a ``[data]`` table); relative paths are relative to the file.
    Raises DataError for a missing or malformed file or an unknown key."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"data spec not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"cannot read data spec {path}: {exc}") from None
    doc = doc.get("data", doc)
    unknown = sorted(set(doc) - _TOML_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(sorted(_TOML_KEYS))}")
    if "source" not in doc:
        raise DataError(f"{path}: no 'source' (an image folder, an .npz file, module:factory or fashion-mnist)")
    for key in ("source", "data_dir"):
        value = doc.get(key)
        if isinstance(value, str) and value != DEFAULT_SOURCE and ":" not in value.split("/")[0] \
                and not Path(value).is_absolute():
            doc[key] = str((path.parent / value))
    return doc


def make_spec(data: str | None = None, data_dir: Path | None = None, **preprocess) -> DataSpec:
    """A DataSpec from CLI-style values: ``data`` may be a data TOML, whose keys the explicit options override.
    Raises DataError for invalid values (one line)."""
    base: dict = {}
    toml = None
    if data is not None and str(data).endswith(".toml"):
        toml = Path(data)
        base = read_data_toml(toml)
        data = None
    pre = {k: base[k] for k in ("image_size", "center_crop", "channels", "mean", "std") if k in base}
    pre.update({k: v for k, v in preprocess.items() if v is not None and v is not False})
    try:
        return DataSpec(source=data or base.get("source", DEFAULT_SOURCE), data_dir=data_dir or base.get("data_dir"),
                        preprocess=Preprocess(**pre), toml=toml)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        where = f"data option {where}: " if where else "data options: "
        raise DataError(f"{where}{err['msg'].removeprefix('Value error, ')}") from None


def load_dataset(spec: DataSpec, validation_images: int = 0):
    """Read ``spec`` into a ``Dataset``: train / test / val splits, class names, input shape (C, H, W) and the
    manifest record. Without a ``val`` split in the source, the last ``validation_images`` training images are
    held out. Raises DataError (one line) for any problem with the data."""
    from pfq_edge.compilation import Dataset
    from pfq_edge.datasets.sources import read_source
    from pfq_edge.errors import ProfileError

    src = read_source(spec.source, spec.preprocess, spec.data_dir)
    train, test, val = src.splits["train"], src.splits["test"], src.splits.get("val")
    if val is None and validation_images:
        if validation_images >= len(train):
            raise ProfileError(f"finetune.validation_images = {validation_images} leaves no training images (split "
                               f"has {len(train)})")
        train, val = train.split_off(validation_images)
    first = test.take(1).images
    shape = tuple(int(d) for d in first.shape[1:])
    pre = spec.preprocess
    channels = shape[0]
    norm = pre.normalization(channels)
    record = {**src.record, "kind": src.kind, "classes": len(src.classes), "class_names": list(src.classes),
              "images": {"train": len(train), "validation": len(val) if val is not None else 0, "test": len(test)},
              "input_shape": list(shape), "preprocess": {**pre.model_dump(mode="json"), "channels": channels}}
    if norm is not None:
        record["preprocess"].update(mean=list(norm[0]), std=list(norm[1]))
    return Dataset(src.record.get("name", spec.source), train=train, test=test, val=val, classes=src.classes,
                   shape=shape, normalization=norm, record=record)
