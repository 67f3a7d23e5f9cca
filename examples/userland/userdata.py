"""Real data in the forms users bring it: Fashion-MNIST written out as an image folder (grey, or RGB resized to
32×32), scikit-learn's digits as an .npz. Small, so that the tests stay fast."""

from pathlib import Path

import numpy as np

FOLDER_CLASSES = ("T-shirt-top", "Trouser", "Pullover", "Dress", "Coat")


def fashion_folder(root: Path, per_class_train: int, per_class_test: int, size: int | None = None,
                   rgb: bool = False, classes: int = 5) -> Path:
    """root/{train,test}/<class>/*.png from the first Fashion-MNIST images of the first ``classes`` classes."""
    from PIL import Image

    from pfq_edge.data import load_split

    for split, n in (("train", per_class_train), ("test", per_class_test)):
        s = load_split(split)
        x, y = (s.images[:, 0].numpy() * 255).round().astype(np.uint8), s.labels.numpy()
        for label in range(classes):
            d = root / split / FOLDER_CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            for k, i in enumerate(np.flatnonzero(y == label)[:n]):
                im = Image.fromarray(x[i])
                if size is not None:
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                (im.convert("RGB") if rgb else im).save(d / f"{k:04d}.png")
    return root


def digits_npz(path: Path) -> Path:
    """scikit-learn's digits as x_train (1500, 8, 8) uint8, y_train, x_test (297, 8, 8), y_test, classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)
    np.savez(path, x_train=x[:1500], y_train=d.target[:1500], x_test=x[1500:], y_test=d.target[1500:],
             classes=np.array([str(i) for i in range(10)]))
    return path


def train_weights(factory, data_spec, path: Path, epochs: int = 3, head: str | None = None, **kwargs) -> Path:
    """Train ``factory(**kwargs)`` briefly on ``data_spec`` (pfq-edge's own data pipeline, its preprocessing and
    mean/std included) and save a state dict. ``head``: the name of the final Linear layer to train alone (transfer
    learning: the pretrained backbone and its BN statistics stay as they are; its pooled features are computed once)."""
    import torch
    from safetensors.torch import save_file

    from pfq_edge.datasets import Split, load_dataset
    from pfq_edge.datasets.normalize import with_input_normalization
    from pfq_edge.train import TrainConfig, predict, train

    torch.manual_seed(0)
    ds = load_dataset(data_spec)
    model = factory(**kwargs)

    def normalized(m):
        return with_input_normalization(m, *ds.normalization) if ds.normalization is not None else m

    if head is None:
        train(normalized(model), ds.train, TrainConfig(epochs=epochs, lr=3e-3, batch_size=64))
    else:
        fc = getattr(model, head)
        setattr(model, head, torch.nn.Identity())
        features = predict(normalized(model), ds.train)  # (N, in_features), backbone in eval mode
        setattr(model, head, fc)
        train(fc, Split(features, ds.train.labels), TrainConfig(epochs=epochs, lr=1e-3, batch_size=64))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def main(argv=None) -> None:
    """``python userdata.py`` writes the README's example data here: clothes/ (5 classes, 3×32×32 RGB PNGs),
    clothes-grey/ (the same, 1×28×28) and digits.npz; ``python userdata.py train FOLDER_OR_NPZ FACTORY OUT``
    (FACTORY: a name in user_models.py, or module:factory) trains that factory's model on it (3 epochs) with
    pfq-edge's data pipeline and saves a state dict."""
    import argparse
    import sys

    from pfq_edge.datasets import make_spec

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("command", nargs="?", default="data", choices=["data", "train"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--mean", type=str, help="train: one value or a comma list per channel (as pfq-edge's --mean)")
    ap.add_argument("--std", type=str)
    ap.add_argument("--image-size", type=str, help="train: H[,W], as pfq-edge's --image-size")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=32, help="data: side of the RGB clothes images")
    ap.add_argument("--head", help="train only this final Linear layer (e.g. _fc of effnet_lite0)")
    a = ap.parse_args(argv)
    here = Path(".")
    if a.command == "data":
        if a.size != 32:
            fashion_folder(here / f"clothes{a.size}", 200, 40, size=a.size, rgb=True)
            print(f"wrote clothes{a.size}/ (1000 train, 200 test images)")
            return
        fashion_folder(here / "clothes", 200, 40, size=32, rgb=True)
        fashion_folder(here / "clothes-grey", 200, 40)
        digits_npz(here / "digits.npz")
        print("wrote clothes/ (1000 train, 200 test images), clothes-grey/, digits.npz")
        return
    data, factory_name, out = a.args
    import importlib

    module, _, name = factory_name.rpartition(":") if ":" in factory_name else ("user_models", ":", factory_name)
    sys.path.insert(0, ".")  # a module:factory next to this file or in the working directory, as pfq-edge takes it
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        sys.exit(f"userdata.py: cannot load factory {factory_name!r}: {exc}")
    spec = make_spec(data, None, mean=_floats(a.mean), std=_floats(a.std), image_size=_floats(a.image_size, int))
    train_weights(factory, spec, Path(out), epochs=a.epochs, head=a.head)
    print(f"wrote {out}", file=sys.stderr)


def _floats(text: str | None, kind=float):
    return None if text is None else tuple(kind(v) for v in text.split(","))


if __name__ == "__main__":
    main()
