"""PfQ criterion and folded-weight statistics.

Method from Nishikawa & Ikegaya, arXiv:2011.06751 (PfQ), as read in shared/design.md §2: a filter c is *constant*
when its post-BN standard deviation |γ_c|·σ_c / sqrt(σ²_c + ε) is zero up to ``tol``; its post-BN output is then
β_c. Filters with σ²_c ≤ ε but a real spread are *range-inflating but informative*: reported, never pruned here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_TOL = 1e-6  # post-BN std (output units) at or below which a filter counts as constant; far below any step


def post_bn_std(bn: nn.BatchNorm2d) -> torch.Tensor:
    """(C,) standard deviation of the BN output over the data the statistics came from: |γ|·σ/sqrt(σ²+ε)."""
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    return (gamma.abs() * var.clamp_min(0).sqrt() / (var + bn.eps).sqrt()).float()


RULES = ("exact", "bn-epsilon")


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


@dataclass
class PfqAnalysis:
    """What PfQ finds and does in one model: per-layer ``layers`` rows, the ``plan``, and the accounting of every
    constant filter (removed, or left with a reason)."""

    layers: list[dict]
    plan: object                      # prune.PrunePlan
    bits: int
    constant_total: int
    constant_removed: int
    constant_left: list[dict]         # {"layer", "filters", "reason"}: neutralized (reason "kept for shape") or not

    def as_dict(self) -> dict:
        return {"bits": self.bits, "rule": self.plan.rule, "tol": self.plan.tol, "constant_total": self.constant_total,
                "constant_removed": self.constant_removed, "constant_left": self.constant_left,
                "filters_removed": self.plan.filters_removed, "layers": self.layers, **{
                    k: v for k, v in self.plan.as_dict().items()
                    if k in ("groups", "neutralized", "skipped", "warnings")}}


def analyze_pfq(model: nn.Module, example: torch.Tensor, bits: int = 4, tol: float = DEFAULT_TOL,
                rule: str = "exact"):
    """Plan PfQ on ``model`` and apply it to a copy; returns (pruned copy, PfqAnalysis). ``model`` is untouched.

    example: one input (1, C, H, W) for tracing and shapes. bits: weight bit width for the per-tensor step and the
    share of weights that round to zero, before and after. rule: "exact" or "bn-epsilon" (``constant_mask``).
    Raises ModelError if the model cannot be traced.
    Method: arXiv:2011.06751 as read in shared/design.md §2–3.
    """
    import copy

    from pfq_edge.graph import conv_chains, is_depthwise, trace
    from pfq_edge.prune import apply_plan, plan_pfq

    pruned = copy.deepcopy(model).eval()
    gm = trace(pruned, example)
    plan = plan_pfq(gm, tol, rule)
    removed = plan.removed_by_layer()
    skipped = {sk.layer: sk.reason for sk in plan.skipped} | {n.conv: n.reason for n in plan.neutralized}
    neutralized = {n.conv: set(n.channels) for n in plan.neutralized}
    rows, left, seen_bn = [], [], set()
    for chain in conv_chains(gm):
        conv = gm.get_submodule(chain.conv)
        bn = gm.get_submodule(chain.bn) if chain.bn else None
        const = set(torch.nonzero(constant_mask(bn, tol, rule)).flatten().tolist()) if bn is not None else set()
        if chain.bn in seen_bn:  # a BN shared by two convs: its filters are counted at its first call site
            const = set()
        seen_bn.add(chain.bn)
        gone = removed.get(chain.conv, set())
        stats = range_stats(folded_weight(conv, bn), bits)
        rows.append({
            "layer": chain.conv, "bn": chain.bn,
            "kind": "depthwise" if is_depthwise(conv) else ("dense" if conv.groups == 1 else "grouped"),
            "channels_before": conv.out_channels, "constant_filters": len(const), "removed_filters": len(gone),
            "neutralized_filters": len(neutralized.get(chain.conv, ())),
            "range_inflating_filters": int((inflating_mask(bn, tol) & ~constant_mask(bn, tol, rule)).sum())
            if bn is not None else 0,
            "folded_max_abs_before": stats.max_abs, "step_before": stats.step, "zero_fraction_before":
                stats.zero_fraction,
        })
        if const - gone:
            reason = skipped.get(chain.conv) or next((w for w in plan.warnings if repr(chain.conv) in w), None) \
                or "not reached by any removal"
            left.append({"layer": chain.conv, "filters": len(const - gone), "reason": reason})
    apply_plan(pruned, plan)
    for row in rows:
        conv = pruned.get_submodule(row["layer"])
        bn = pruned.get_submodule(row["bn"]) if row["bn"] else None
        stats = range_stats(folded_weight(conv, bn), bits)
        row.update({"channels_after": conv.out_channels, "folded_max_abs_after": stats.max_abs,
                    "step_after": stats.step, "zero_fraction_after": stats.zero_fraction})
    total = sum(r["constant_filters"] for r in rows)
    return pruned, PfqAnalysis(rows, plan, bits, total, total - sum(x["filters"] for x in left), left)
