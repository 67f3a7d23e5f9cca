"""Property-based: random small conv networks with planted constant filters (random β sign, padding, groups,
activation). The pruned network always has valid shapes, matches the original exactly when the plan says the
removal is exact, and always matches in the interior that no zero padding can reach."""

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pfq_edge.pfq.graph import trace
from pfq_edge.pfq.apply import apply_plan
from pfq_edge.pfq.plan import plan_pfq

ACTS = [nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Identity]


@st.composite
def networks(draw):
    """(model, padded_convs): conv → BN → act blocks (dense k1/k3, depthwise, grouped) and a 1×1 head."""
    layers, cin, padded, plants = [], 1, 0, []
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["dense1", "dense3", "depthwise", "grouped"])) if i else "dense3"
        if kind == "depthwise" and cin < 2:
            kind = "dense3"
        if kind == "grouped" and cin % 2:
            kind = "dense3"
        k = 1 if kind == "dense1" else 3
        pad = draw(st.integers(0, 1)) if k == 3 else 0
        padded += pad
        cout = cin if kind == "depthwise" else draw(st.integers(2, 6)) * (2 if kind == "grouped" else 1)
        groups = cin if kind == "depthwise" else (2 if kind == "grouped" else 1)
        conv = nn.Conv2d(cin, cout, k, padding=pad, groups=groups, bias=draw(st.booleans()))
        bn = nn.BatchNorm2d(cout)
        layers += [conv, bn, draw(st.sampled_from(ACTS))()]
        constant = draw(st.lists(st.integers(0, cout - 1), max_size=cout, unique=True))
        betas = draw(st.lists(st.floats(-1.5, 1.5), min_size=len(constant), max_size=len(constant)))
        plants.append((conv, bn, constant, betas))
        cin = cout
    layers.append(nn.Conv2d(cin, 3, 1))
    model = nn.Sequential(*layers).eval()
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
        for conv, bn, constant, betas in plants:  # truly constant: zero filter → conv output 0 = μ, var 0
            for c, b in zip(constant, betas):
                conv.weight[c] = 0
                if conv.bias is not None:
                    conv.bias[c] = 0
                bn.running_mean[c], bn.running_var[c], bn.bias[c] = 0.0, 0.0, b
    return model, padded


@settings(max_examples=int(os.environ.get("PFQ_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_pruned_network_matches_where_the_maths_says(net):
    model, padded = net
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    pruned = copy.deepcopy(model)
    plan = plan_pfq(trace(pruned, x[:1]))
    apply_plan(pruned, plan)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels > 0 and m.out_channels > 0 and m.in_channels % m.groups == 0
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_features > 0
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    assert out.shape == ref.shape
    tol = 1e-4 * (1 + float(ref.abs().max()))
    if all(g.exact for g in plan.groups):
        assert torch.allclose(out, ref, atol=tol)
    p = padded
    interior = (slice(None), slice(None), slice(p, ref.shape[2] - p), slice(p, ref.shape[3] - p))
    assert torch.allclose(out[interior], ref[interior], atol=tol)
