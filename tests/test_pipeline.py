"""Pipeline stages on the shipped model with planted constant filters (real data, no mocks)."""

import copy
import json

import torch
from torch import nn

from conftest import compilation, plant_constant
from pfq_edge.report import prune_section, to_json
from pfq_edge.steps import prune
from pfq_edge.zoo import load_model


def test_prune_stage_reports_removed_filters_and_passes_its_golden_check(test_split, tmp_path):
    model = copy.deepcopy(load_model("fashion-dscnn-adam").module)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    plant_constant(convs[2], bns[2], [3, 40], [-0.2, -1.0])        # dead ReLU: exact
    plant_constant(convs[-1], bns[-1], [7, 8, 9], [0.3, 0.6, 0.9])  # 1×1 conv → max pool → linear: exact
    c = compilation(model, overrides={"pfq": {"channel_multiple": 1}}, test=test_split.subset(2000), tmp_path=tmp_path)
    result = prune(c)
    prune_doc = result.report()
    assert prune_doc["filters_removed"] == 7 and prune_doc["exact"]  # 2 + the 2 depthwise they feed + 3
    assert prune_doc["golden"]["passed"] and prune_doc["golden"]["max_abs_diff"] <= 1e-4
    rows = {r["layer"]: r for r in prune_doc["layers"]}
    assert rows["6"]["channels_before"] == 64 and rows["6"]["channels_after"] == 62
    assert rows["9"]["channels_after"] == 62  # the depthwise conv fed by them
    assert rows["24"]["channels_after"] == 253 and rows["24"]["constant_filters"] == 3
    assert c.pruned_model[-1].in_features == 253
    doc = json.loads(to_json({"prune": prune_doc}))
    assert doc["prune"]["groups"][0]["removals"][0]["conv"] == "6"
    assert "Filters removed: **7**" in "\n".join(prune_section(doc["prune"]))
    with torch.no_grad():
        x = test_split.images[:100]
        assert torch.allclose(c.pruned_model(x), model(x), atol=1e-4)
