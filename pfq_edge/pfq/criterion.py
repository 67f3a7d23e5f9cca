"""PfQ criterion (which filters are constant) and folded-weight statistics.

Method from Nishikawa & Ikegaya, arXiv:2011.06751 (PfQ), as read in shared/design.md §2: a filter c is *constant*
when its post-BN standard deviation |γ_c|·σ_c / sqrt(σ²_c + ε) is zero up to ``tol``; its post-BN output is then
β_c. Filters with σ²_c ≤ ε but a real spread are *range-inflating but informative*: reported, never pruned here.

Rule "near-constant" (issue 17): constant *for quantization* at the target's activation bit width b. From the BN
statistics alone, filter c's BN output β_c + s_c·z (s_c the post-BN std, z the standardised pre-BN value) lies,
for |z| ≤ 3, in a band of width w_c = 6·s_c; its activation act(·) can only narrow that band. The per-tensor
activation quantizer spans the layer's activation bands, R = max_c max|act(β_c ± 3s_c)|, with step
Δ = R / (2^b − 1) when every band is ≥ 0 (ReLU, ReLU6: unsigned) or R / (2^(b−1) − 1) otherwise. The filter is
near-constant when w_c ≤ Δ/2: replacing its activation by the constant act(β_c) then moves it by at most Δ/4
inside the band, below the Δ/2 that rounding moves every filter by, and by an rms of about s_c ≤ Δ/12, below
rounding's Δ/√12 — it cannot move its quantized activation by a step (except across the one rounding boundary its
band may straddle). The width is the BN output's, not the activation's: a filter whose ±3σ band lies below a ReLU's
0 is *not* taken (measured on EfficientNet-Lite0: 285 such depthwise filters of blocks 12–14 fire on real images,
the BN statistics do not describe their tails; taking them moved top-1 on 11 % of images). After removal the
near-constant filters no longer set the quantizer's range, so R is then taken over the other filters only, and the
set is shrunk until every member is below half a step of that range. The ±3σ band is the one convention, used for
both range and spread; no tolerance is tuned. Like "bn-epsilon" it is an approximation: the prune step guards it
with data.
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


BAND_SIGMAS = 3.0  # rule near-constant: a filter's activation band is β ± 3 post-BN std (see the module docstring)


def constant_mask(bn: nn.BatchNorm2d, tol: float = DEFAULT_TOL, rule: str = "exact", act: nn.Module | None = None,
                  act_bits: int | None = None) -> torch.Tensor:
    """(C,) bool: filters PfQ treats as constant. rule "exact": the BN output is constant (post-BN std ≤ tol;
    design.md §2). rule "bn-epsilon": running_var ≤ ε (σ²≤ε filters replaced by their mean β: an approximation
    that also takes range-inflating filters carrying signal; guard it with real data). rule "near-constant": the
    filter cannot move its quantized activation by a step at ``act_bits`` (module docstring); ``act`` is the chain's
    activation module (None: identity). Raises ValueError for "near-constant" without ``act_bits``."""
    exact = post_bn_std(bn) <= tol
    if rule == "bn-epsilon":
        return (bn.running_var.detach() <= bn.eps) | exact
    if rule == "near-constant":
        if act_bits is None:
            raise ValueError("rule near-constant needs the activation bit width")
        return near_constant_mask(bn, act, act_bits) | exact
    return exact


def activation_bands(bn: nn.BatchNorm2d, act: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,), (C,): each filter's activation band act(β ± 3·post-BN std), float64."""
    spread = BAND_SIGMAS * post_bn_std(bn).double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(spread)
    f = act if act is not None else (lambda x: x)
    with torch.no_grad():
        return f(beta - spread), f(beta + spread)


def near_constant_mask(bn: nn.BatchNorm2d, act: nn.Module | None, act_bits: int) -> torch.Tensor:
    """(C,) bool: BN output band width 6·s ≤ Δ/2, Δ the activation step at ``act_bits`` over the other filters'
    activation bands."""
    lo, hi = activation_bands(bn, act)
    width, extent = 2 * BAND_SIGMAS * post_bn_std(bn).double(), torch.maximum(lo.abs(), hi.abs())
    levels = 2 ** act_bits - 1 if bool((lo >= 0).all()) else 2 ** (act_bits - 1) - 1
    mask = width <= float(extent.max()) / levels / 2
    for _ in range(width.numel()):  # shrinks only: each member stays below half a step of the range left
        if bool(mask.all()):  # nothing would set the range: only truly constant filters count
            return width <= 0
        new = mask & (width <= float(extent[~mask].max()) / levels / 2)
        if torch.equal(new, mask):
            break
        mask = new
    return mask


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
