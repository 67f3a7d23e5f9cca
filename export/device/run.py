#!/usr/bin/env python3
"""Classify images with the model of this pfq-edge deployment package (runs on the device; needs numpy and the
package's runtime: TVM for CPU/GPU packages, onnxruntime for their QCDQ model, qonnx for FPGA packages).

    python run.py photo.png                  # one image file (png, jpg, bmp; needs Pillow)
    python run.py DIR                        # a folder of images, or DIR/<class>/* (labels from the class names)
    python run.py IMAGES.npz                 # arrays "images" (N, H, W[, C]) or (N, C, H, W), optional "labels"
    python run.py IMAGES.npy --json          # one array of images; predictions as JSON on stdout
    python run.py IMAGES.npz --engine onnxruntime   # CPU/GPU packages: the QCDQ model instead of the TVM library

Image files get the preprocessing recorded in manifest.json (runtime.preprocess: channels, resize, center crop),
the same as pfq-edge applied to the training images; the mean/std normalisation is inside the model.

FPGA packages run the QONNX model with qonnx node by node (~0.1 s per image on a small CPU). Images are uint8 pixels 0–255 or float32 in [0, 1]. Prints the predicted class per image and, with labels, the
top-1 accuracy (compare it with manifest.json's ``accuracy``). Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def fail(message: str) -> None:
    print(f"run.py: error: {message}", file=sys.stderr)
    sys.exit(2)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def preprocess_image(image, channels: int | None, size, center_crop: bool) -> np.ndarray:
    """A Pillow image → float32 (C, H, W) in [0, 1]: convert to ``channels`` (None: keep), resize to ``size``
    (H, W; bilinear) with an optional center crop. pfq-edge's own image preprocessing calls this function
    (pfq_edge/datasets/preprocess.py), so a package replays what the compile saw; this file runs without pfq-edge."""
    from PIL import Image

    if channels == 1 and image.mode != "L":
        image = image.convert("L")
    elif channels == 3 and image.mode != "RGB":
        image = image.convert("RGB")
    if size is not None:
        h, w = size
        if center_crop:
            scale = max(h / image.height, w / image.width)
            rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
            image = image.resize((rw, rh), Image.Resampling.BILINEAR)
            left, top = (rw - w) // 2, (rh - h) // 2
            image = image.crop((left, top, left + w, top + h))
        else:
            image = image.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return arr.transpose(2, 0, 1).astype(np.float32) / 255.0


def load_image_files(path: Path, shape: list[int], preprocess: dict, classes: list[str]):
    """(images, labels or None) from an image file, a folder of images, or a folder of class folders."""
    try:
        from PIL import Image
    except ImportError:
        fail("reading image files needs Pillow (pip install pillow), or give an .npz")
    if path.is_dir():
        subdirs = sorted(d for d in path.iterdir() if d.is_dir())
        if subdirs:
            unknown = [d.name for d in subdirs if d.name not in classes]
            if unknown:
                fail(f"{path}/{unknown[0]} is not one of this model's classes ({', '.join(classes)})")
            items = [(f, classes.index(d.name)) for d in subdirs for f in sorted(d.iterdir())
                     if f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            items = [(f, None) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        items = [(path, None)]
    if not items:
        fail(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    c, h, w = shape
    size = preprocess.get("image_size")
    images = []
    for f, _ in items:
        try:
            with Image.open(f) as im:
                x = preprocess_image(im, c, size, bool(preprocess.get("center_crop")))
        except OSError as exc:
            fail(f"cannot read image {f}: {exc}")
        if x.shape != (c, h, w):
            fail(f"{f} gives an image of shape {x.shape}; this model takes ({c}, {h}, {w}) (the package records no "
                 f"resize to that size)")
        images.append(x)
    labels = np.array([y for _, y in items], np.int64) if items[0][1] is not None else None
    return np.stack(images), labels


def load_images(path: Path, shape: list[int], preprocess: dict | None = None, classes: list[str] | None = None):
    """(images float32 (N, C, H, W) in [0, 1], labels int64 (N,) or None) from an .npy or .npz file, an image
    file or a folder (``load_image_files``)."""
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        if not path.exists():
            fail(f"no such file: {path}")
        return load_image_files(path, shape, preprocess or {}, classes or [])
    if not path.is_file():
        fail(f"no such file: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception:  # numpy raises several types for a file that is not an array
        fail(f"cannot read {path}: not a .npy/.npz file of numeric arrays")
    labels = None
    if isinstance(data, np.lib.npyio.NpzFile):
        key = next((k for k in ("images", "x", "x_test") if k in data.files), None)
        if key is None:
            fail(f"{path} has arrays {data.files}; expected 'images' (and optionally 'labels'), or x_test/y_test")
        images = data[key]
        label_key = {"images": "labels", "x": "y", "x_test": "y_test"}[key]
        labels = data[label_key] if label_key in data.files else None
    else:
        images = data
    c, h, w = shape
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim == 4 and images.shape[3] == c and images.shape[1] != c:
        images = images.transpose(0, 3, 1, 2)  # (N, H, W, C)
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
        fail(f"images have shape {tuple(images.shape)}; this model takes (N, {c}, {h}, {w}), (N, {h}, {w}, {c})"
             + (f" or (N, {h}, {w})" if c == 1 else ""))
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif images.dtype.kind == "f":
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            fail("images contain NaN or infinite values")
        if images.size and (images.min() < 0 or images.max() > 1):
            fail("float images must lie in [0, 1] (or give uint8 pixels)")
    else:
        fail(f"images have dtype {images.dtype}; expected uint8 or float32")
    if not len(images):
        fail(f"{path} holds no images")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        fail(f"labels have shape {labels.shape} and dtype {labels.dtype}; expected ({len(images)},) integers")
    return np.ascontiguousarray(images), labels


def engine(manifest: dict, name: str):
    """A function (B, C, H, W) float32 -> (B, classes) logits for the package's artefact in runtime ``name``."""
    runtime = manifest["runtime"]
    if name == "tvm":
        import tvm
        from tvm import relax

        device = tvm.cuda(0) if runtime["device"] == "cuda" else tvm.cpu()
        try:
            library = tvm.runtime.load_module(str(HERE / runtime["library"]))
        except Exception:  # TVM reports a library for another CPU as "cannot open shared object file"
            fail(f"cannot load {runtime['library']} on this {platform.machine()} machine: it was built for the "
                 f"package's target ({manifest.get('target', '?')}); run it there, or use --engine onnxruntime")
        vm = relax.VirtualMachine(library, device)
        return lambda x: vm["main"](tvm.runtime.tensor(x, device)).numpy()
    if name == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, runtime["onnxruntime_level"])
        session = ort.InferenceSession(str(HERE / runtime["onnx"]), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]
    if name == "qonnx":
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx

        model = ModelWrapper(str(HERE / runtime["onnx"]))
        inp, out = model.graph.input[0].name, model.graph.output[0].name
        return lambda x: execute_onnx(model, {inp: x})[out]
    fail(f"unknown engine {name!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path)
    ap.add_argument("--engine", choices=["tvm", "onnxruntime", "qonnx"], help="default: the package's runtime")
    ap.add_argument("--json", action="store_true", help="print predictions (and top-1) as JSON")
    args = ap.parse_args(argv)
    manifest = json.loads((HERE / "manifest.json").read_text())
    runtime = manifest["runtime"]
    name = args.engine or runtime["engine"]
    available = ["qonnx"] if runtime["engine"] == "qonnx" else ["tvm", "onnxruntime"]
    if name not in available:
        fail(f"engine {name!r} does not run this package's model; available: {', '.join(available)}")
    classes = manifest.get("classes") or []
    images, labels = load_images(args.images, runtime["input_shape"], runtime.get("preprocess"), classes)
    if labels is not None and classes and (labels.min() < 0 or labels.max() >= len(classes)):
        fail(f"labels must lie in 0..{len(classes) - 1}")
    run = engine(manifest, name)
    batch = runtime["batch_size"]
    logits = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        pad = batch - len(x)  # the compiled model has a static batch: pad the last one, drop the padding after
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        logits.append(np.asarray(run(np.ascontiguousarray(x)))[:batch - pad])
    predictions = np.concatenate(logits).argmax(axis=1) if logits else np.zeros(0, np.int64)
    top1 = float((predictions == labels).mean()) if labels is not None and len(labels) else None
    if args.json:
        print(json.dumps({"engine": name, "images": len(images), "predictions": predictions.tolist(), "top1": top1}))
        return 0
    for i, p in enumerate(predictions):
        print(f"{i}\t{p}\t{classes[p] if p < len(classes) else p}")
    if top1 is not None:
        print(f"top-1 {top1:.4f} on {len(images)} images ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
