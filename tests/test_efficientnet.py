"""PfQ on a real pretrained network: EfficientNet-Lite0 (ImageNet), 130 BN channels with running_var == 0."""

import pytest
import torch

from pfq_edge.analysis import analyze_pfq
from pfq_edge.data import adapt_images
from pfq_edge.zoo import load_model


@pytest.fixture(scope="module")
def effnet():
    return load_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def analysed(effnet):
    return analyze_pfq(effnet.module, torch.zeros(1, 3, 224, 224))


def test_every_constant_channel_is_found_and_removed(effnet, analysed):
    pruned, a = analysed
    zero_var = sum(int((m.running_var == 0).sum()) for m in effnet.module.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    assert zero_var == 130
    assert a.constant_total == 130 and a.constant_removed == 130 and a.constant_left == []
    assert a.plan.filters_removed == 130
    # σ² ≤ ε channels that still vary are reported, not pruned (design.md: pruning them breaks the model)
    assert sum(r["range_inflating_filters"] for r in a.layers) == 639 - 130
    params = sum(p.numel() for p in pruned.parameters())
    assert params < sum(p.numel() for p in effnet.module.parameters())


def test_pruned_logits_match_on_real_images(effnet, analysed, test_split):
    pruned, _ = analysed
    x = adapt_images(test_split.images[:64], (3, 224, 224), imagenet_norm=True)
    with torch.no_grad():
        ref, out = effnet.module(x), pruned(x)
    assert (ref.argmax(1) == out.argmax(1)).all()
    assert float((ref - out).abs().max()) <= 1e-4
