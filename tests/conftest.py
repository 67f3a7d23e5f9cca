"""Shared fixtures: real Fashion-MNIST (Debian package), small models, quiet progress bars."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("PFQ_EDGE_QUIET", "1")
# the README's user-side files (a model factory, a dataset factory, the data writers) are what the tests bring
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "userland"))


@pytest.fixture(scope="session")
def test_split():
    from pfq_edge.data import load_split

    return load_split("test")


@pytest.fixture(scope="session")
def train_split():
    from pfq_edge.data import load_split

    return load_split("train")


@pytest.fixture(scope="session")
def images(test_split):
    """The first 64 real test images, (64, 1, 28, 28) float32 in [0, 1]."""
    return test_split.images[:64]


def tiny_dscnn(channels=(8, 16, 16)):
    from pfq_edge.zoo import fashion_dscnn

    torch.manual_seed(0)
    return fashion_dscnn(channels).eval()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN realistic, non-trivial statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def plant_constant(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels, beta) -> None:
    """Make ``channels`` of conv → bn truly constant: zero filter, BN mean 0 and running_var 0, BN bias ``beta``."""
    with torch.no_grad():
        for c, b in zip(channels, beta):
            conv.weight[c] = 0
            if conv.bias is not None:
                conv.bias[c] = 0
            bn.running_mean[c] = 0
            bn.running_var[c] = 0
            bn.bias[c] = b


def compilation(model, target="fpga", overrides=None, test=None, train=None, tmp_path=None):
    """A Compilation holding ``model`` and real data, ready for a single step (e.g. ``pfq_edge.steps.prune``)."""
    from pathlib import Path

    from pfq_edge.compilation import Compilation, CompileConfig, Dataset, InputSpec
    from pfq_edge.data import CLASSES
    from pfq_edge.targets.profile import load_profile, with_overrides

    profile = with_overrides(load_profile(target), overrides or {})
    work = Path(tmp_path or ".")
    return Compilation(config=CompileConfig("m", target, work / "o"), profile=profile, work=work, final=work / "o",
                       spec=InputSpec(tuple(test.images.shape[1:]), tuple(CLASSES)),
                       data=Dataset("fashion-mnist", train=train if train is not None else test, test=test),
                       float_model=model)
