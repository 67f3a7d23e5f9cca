"""PfQ analysis: plan and apply PfQ on a copy of a model and account for every constant filter, with the
folded-weight range and the share of weights rounding to zero per layer, before and after.

Method from Nishikawa & Ikegaya, arXiv:2011.06751 (PfQ), as read in shared/design.md §2–3; the criterion is
``criterion.py``, the plan ``plan.py``, the mutation ``apply.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pfq_edge.pfq import DEFAULT_TOL
from pfq_edge.pfq.apply import apply_plan
from pfq_edge.pfq.criterion import constant_mask, folded_weight, inflating_mask, range_stats
from pfq_edge.pfq.graph import conv_chains, is_depthwise, trace
from pfq_edge.pfq.plan import PrunePlan, plan_pfq


@dataclass
class PfqAnalysis:
    """What PfQ finds and does in one model: per-layer ``layers`` rows, the ``plan``, and the accounting of every
    constant filter (removed, or left with a reason)."""

    layers: list[dict]
    plan: PrunePlan
    bits: int
    constant_total: int
    constant_removed: int
    constant_left: list[dict]         # {"layer", "filters", "reason"}: neutralized (reason "kept for shape") or not

    def as_dict(self) -> dict:
        return {"bits": self.bits, "rule": self.plan.rule, "tol": self.plan.tol,
                "channel_multiple": self.plan.channel_multiple, "constant_total": self.constant_total,
                "constant_removed": self.constant_removed, "constant_left": self.constant_left,
                "filters_removed": self.plan.filters_removed, "exact": self.plan.exact, "layers": self.layers, **{
                    k: v for k, v in self.plan.as_dict().items()
                    if k in ("groups", "neutralized", "skipped", "warnings")}}


def analyze_pfq(model: nn.Module, example: torch.Tensor, bits: int = 4, tol: float = DEFAULT_TOL,
                rule: str = "exact", act_bits: int | None = None, channel_multiple: int = 1, padded: str = "neutralize"):
    """Plan PfQ on ``model`` and apply it to a copy; returns (pruned copy, PfqAnalysis). ``model`` is untouched.

    example: one input (1, C, H, W) for tracing and shapes. bits: weight bit width for the per-tensor step and the
    share of weights that round to zero, before and after. rule: "exact", "bn-epsilon" or "near-constant"
    (``constant_mask``; near-constant needs ``act_bits``, the activation bit width). channel_multiple > 1: layers
    that lose filters keep counts that are multiples of gcd(count, channel_multiple) (hardware-aware PfQ).
    padded: "neutralize" (default: exact) or "remove" a constant filter whose constant meets zero padding
    (``plan_pfq``; removal then differs from the original at the borders). Raises ModelError if the model cannot be
    traced.
    Method: arXiv:2011.06751 as read in shared/design.md §2–3.
    """
    import copy
    from collections import Counter

    pruned = copy.deepcopy(model).eval()
    gm = trace(pruned, example)
    plan = plan_pfq(gm, tol, rule, padded=padded, act_bits=act_bits, channel_multiple=channel_multiple)
    removed = plan.removed_by_layer()
    skipped = {sk.layer: sk.reason for sk in plan.skipped}
    neutralized: dict[str, set[int]] = {}
    entries = Counter(n.conv for n in plan.neutralized)
    for n in plan.neutralized:  # a layer can have several entries (zero padding, channel multiple, ...)
        neutralized.setdefault(n.conv, set()).update(n.channels)
        why = f"{n.reason} ({len(n.channels)} filter{'s' if len(n.channels) > 1 else ''})" \
            if entries[n.conv] > 1 else n.reason
        skipped[n.conv] = f"{skipped[n.conv]}; {why}" if n.conv in skipped else why
    rows, left, seen_bn = [], [], set()
    for chain in conv_chains(gm):
        conv = gm.get_submodule(chain.conv)
        bn = gm.get_submodule(chain.bn) if chain.bn else None
        mask = constant_mask(bn, tol, rule, chain.act_fn, act_bits) if bn is not None else None
        const = set(torch.nonzero(mask).flatten().tolist()) if mask is not None else set()
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
            "range_inflating_filters": int((inflating_mask(bn, tol) & ~mask).sum())
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
