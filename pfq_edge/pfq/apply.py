"""PfQ mutation: apply a PrunePlan to a model — compensations into the consumers' biases (or BN means) from the
original weights, neutralized filters zeroed, then the channels sliced out — or give a model the pruned shapes
of a saved plan (``apply_structure``).

Method from arXiv:2011.06751 as read in shared/design.md §3.
"""

from __future__ import annotations

import torch
from torch import nn

from pfq_edge.pfq.graph import is_depthwise
from pfq_edge.pfq.plan import Compensation, PrunePlan


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place (module names as in the plan) and return it.

    Compensations are computed from the original weights first; then channels are sliced out.
    """
    with torch.no_grad():
        for group in plan.groups:
            for comp in group.compensations:
                _compensate(model, comp)
        for n in plan.neutralized:
            conv, bn = model.get_submodule(n.conv), model.get_submodule(n.bn)
            conv.weight[n.channels] = 0
            if conv.bias is not None:
                conv.bias[n.channels] = 0
            bn.running_mean[n.channels] = 0
    return apply_structure(model, plan.structure())


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Give ``model``'s layers the pruned shapes in ``structure`` (``PrunePlan.structure()``), in place.

    Used by ``apply_plan`` and to rebuild a saved pruned model before loading its weights. Raises KeyError if a
    named module does not exist.
    """
    with torch.no_grad():
        for name in structure.get("bias_added", []):
            mod = model.get_submodule(name)
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0]))
        outs, ins = structure.get("out", {}), structure.get("in", {})
        for name in sorted(set(outs) | set(ins)):
            _slice_layer(model.get_submodule(name), set(outs.get(name, [])), set(ins.get(name, [])))
        for name, drop in structure.get("bn", {}).items():
            _slice_bn(model.get_submodule(name), set(drop))
    return model


def _compensate(model: nn.Module, comp: Compensation) -> None:
    mod = model.get_submodule(comp.module)
    w = mod.weight.detach()
    vals = torch.tensor(comp.values, dtype=w.dtype)
    cols = w[:, comp.inputs]
    delta = (cols.sum(dim=tuple(range(2, cols.dim()))) * vals).sum(1) if cols.dim() > 2 else cols @ vals
    if comp.target == "bn_mean":
        model.get_submodule(comp.bn).running_mean.sub_(delta)
        return
    if mod.bias is None:  # "new_bias": a bias-free consumer without BN gets one
        mod.bias = nn.Parameter(torch.zeros_like(delta))
    mod.bias.add_(delta)


def _keep(n: int, drop: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _slice_layer(mod: nn.Module, drop_out: set[int], drop_in: set[int]) -> None:
    w = mod.weight.detach()
    keep_out = _keep(w.shape[0], drop_out)
    if isinstance(mod, nn.Conv2d) and is_depthwise(mod):
        # in = out = groups; its input channels are exactly the removed output channels
        w = w[keep_out]
        mod.in_channels = mod.out_channels = mod.groups = len(keep_out)
    else:
        keep_in = _keep(w.shape[1], drop_in)
        w = w[keep_out][:, keep_in]
        if isinstance(mod, nn.Conv2d):
            mod.out_channels, mod.in_channels = len(keep_out), len(keep_in)
        else:
            mod.out_features, mod.in_features = len(keep_out), len(keep_in)
    mod.weight = nn.Parameter(w.clone())
    if mod.bias is not None:
        mod.bias = nn.Parameter(mod.bias.detach()[keep_out].clone())


def _slice_bn(bn: nn.BatchNorm2d, drop: set[int]) -> None:
    keep = _keep(bn.num_features, drop)
    if bn.weight is not None:
        bn.weight = nn.Parameter(bn.weight.detach()[keep].clone())
        bn.bias = nn.Parameter(bn.bias.detach()[keep].clone())
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)
