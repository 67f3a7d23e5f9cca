"""PfQ criterion (which filters are constant) and folded-weight statistics.

Method from Nishikawa & Ikegaya, arXiv:2011.06751 (PfQ), as read in shared/design.md §2: a filter c is *constant*
when its post-BN standard deviation |γ_c|·σ_c / sqrt(σ²_c + ε) is zero up to ``tol``; its post-BN output is then
β_c. Filters with σ²_c ≤ ε but a real spread are *range-inflating but informative*: reported, never pruned here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pfq_edge.pfq import DEFAULT_TOL


def post_bn_std(bn: nn.BatchNorm2d) -> torch.Tensor:
    """(C,) standard deviation of the BN output over the data the statistics came from: |γ|·σ/sqrt(σ²+ε)."""
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    return (gamma.abs() * var.clamp_min(0).sqrt() / (var + bn.eps).sqrt()).float()


def constant_mask(bn: nn.BatchNorm2d, tol: float = DEFAULT_TOL, rule: str = "exact") -> torch.Tensor:
    """(C,) bool: filters PfQ treats as constant. rule "exact": the BN output is constant (post-BN std ≤ tol;
    design.md §2). rule "bn-epsilon": running_var ≤ ε (σ²≤ε filters replaced by their mean β: an approximation
    that also takes range-inflating filters carrying signal; guard it with real data)."""
    if rule == "bn-epsilon":
        return (bn.running_var.detach() <= bn.eps) | (post_bn_std(bn) <= tol)
    return post_bn_std(bn) <= tol


def inflating_mask(bn: nn.BatchNorm2d, tol: float = DEFAULT_TOL) -> torch.Tensor:
    """(C,) bool: σ² ≤ ε but not constant — they widen the folded range yet carry signal (design.md §2)."""
    return (bn.running_var.detach() <= bn.eps) & ~constant_mask(bn, tol)


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """(C,) fold scale s_c = γ_c / sqrt(σ²_c + ε)."""
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / (bn.running_var.detach() + bn.eps).sqrt()


def folded_weight(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """Weights W'_c = s_c·W_c of ``conv`` with ``bn`` folded in; shape of conv.weight."""
    w = conv.weight.detach()
    if bn is None:
        return w
    return w * bn_scale(bn).reshape(-1, *([1] * (w.dim() - 1)))


@dataclass
class RangeStats:
    """Per-tensor symmetric quantization of one folded weight tensor at ``bits``."""

    max_abs: float          # range of the folded weights, max |W'|
    step: float             # quantization step max|W'| / (2^(bits-1) - 1)
    zero_fraction: float    # fraction of weights that round to 0 at that step


def range_stats(w: torch.Tensor, bits: int) -> RangeStats:
    max_abs = float(w.abs().max()) if w.numel() else 0.0
    step = max_abs / (2 ** (bits - 1) - 1) if max_abs > 0 else 0.0
    zero = float((w.abs() < step / 2).float().mean()) if step > 0 else 1.0
    return RangeStats(max_abs, step, zero)
