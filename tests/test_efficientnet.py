"""PfQ on a real pretrained network: EfficientNet-Lite0 (ImageNet), 130 BN channels with running_var == 0."""

import pytest
import torch

from pfq_edge.pfq.analyze import analyze_pfq
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


def test_transfer_model_keeps_the_constant_channels_and_the_guard_refuses_bn_epsilon(tmp_path):
    # Model (a) of issue 4: ImageNet backbone + BN statistics, a Fashion-MNIST head (examples/transfer_efficientnet.py)
    from conftest import compilation
    from pfq_edge.data import load_split
    from pfq_edge.errors import GoldenCheckError
    from pfq_edge.steps import prune as prune_step

    model = load_model("efficientnet-lite0-fmnist").module
    test, train = load_split("test").subset(300), load_split("train").subset(1024)

    def state(rule):
        return compilation(model, overrides={"pfq": {"rule": rule, "channel_multiple": 1}}, test=test, train=train,
                           tmp_path=tmp_path)

    prune = prune_step(state("exact")).report()
    assert prune["constant_total"] == 130 and prune["constant_removed"] == 130
    assert prune["golden"]["passed"] and prune["golden"]["argmax_agreement"] == 1.0
    # σ² ≤ ε filters carry signal here: replacing them by β changes the float model; measured 91.3 % agreement
    with pytest.raises(GoldenCheckError, match=r"bn-epsilon data guard .* top-1 agreement (\d+\.\d+)%"):
        prune_step(state("bn-epsilon"))
