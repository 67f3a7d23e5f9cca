"""The model as a torch.fx graph: conv → BN → activation chains and the channel flow between them.

Used by the PfQ analysis and pruning. Tracing is torch.fx ``symbolic_trace``; modules are shared with the
traced model, so mutating a module through the graph mutates the user's model object too.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from pfq_edge.errors import ModelError, one_line

# Element-wise activations: a constant channel stays constant through them (a_c = f(β_c)).
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh,
                      nn.LeakyReLU, nn.GELU, nn.Hardtanh, nn.Identity)
ACTIVATION_FUNCTIONS = {F.relu: nn.ReLU(), torch.relu: nn.ReLU(), F.relu6: nn.ReLU6(), F.hardswish: nn.Hardswish(),
                        F.silu: nn.SiLU(), torch.sigmoid: nn.Sigmoid(), F.sigmoid: nn.Sigmoid()}
# Channel-wise ops through which a constant channel stays a constant channel (exact for max / adaptive pools).
PASSTHROUGH_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Dropout,
                       nn.Dropout2d, nn.Identity)
FLATTEN_FUNCTIONS = (torch.flatten,)
# The same, written as functions; F.avg_pool2d is exact only without padding (checked by the caller).
PASSTHROUGH_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d, F.avg_pool2d, F.dropout)


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A channel-wise op that keeps a constant channel constant (pooling, dropout, identity), module or function."""
    if isinstance(module_of(gm, node), PASSTHROUGH_MODULES):
        return True
    return node.op == "call_function" and node.target in PASSTHROUGH_FUNCTIONS


def is_spatial_mean(node: fx.Node) -> bool:
    """x.mean((2, 3)) / torch.mean(x, (-2, -1)): a global average pool; channel c stays at position c."""
    is_mean = (node.op == "call_method" and node.target == "mean") or \
        (node.op == "call_function" and node.target is torch.mean)
    if not is_mean:
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its output shape for ``example`` (N, C, H, W).

    Raises ModelError naming the failing construct if torch.fx cannot trace the model.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.GraphModule(model, _LayerTracer().trace(model), model.__class__.__name__)
    except Exception as exc:
        msg = one_line(exc, 200)
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx: {msg}") from None
    try:  # ShapeProp prints the traceback of a failing node itself and re-raises it wrapped: keep both quiet
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(example)
    except Exception as exc:
        msg = one_line(exc.__cause__ or exc.__context__ or exc, 200)
        raise ModelError(f"model fails on an input of shape {tuple(example.shape)}: {msg}") from None
    return gm


class _LayerTracer(fx.Tracer):
    """Keeps subclasses of Conv2d / BatchNorm / Linear (e.g. "same"-padding convs) as single layer nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.Linear)) or \
            super().is_leaf_module(m, qualname)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_depthwise(conv: nn.Conv2d) -> bool:
    """Depthwise means groups == in_channels == out_channels > 1 (a 1-channel dense conv is not depthwise)."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def activation_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The element-wise activation that ``node`` applies, as a module, or None if it is not one."""
    mod = module_of(gm, node)
    if mod is not None:
        return mod if isinstance(mod, ACTIVATION_MODULES) else None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS and not node.kwargs.get("inplace", False):
        return ACTIVATION_FUNCTIONS[node.target]
    return None


def call_counts(gm: fx.GraphModule) -> Counter:
    """How many call sites each module target has (a module called twice is shared)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


@dataclass
class Chain:
    """conv → [BN] → [activation]: ``conv``/``bn``/``act`` are module names (act may be a function: ``act_fn``).

    ``out`` is the fx node whose output the rest of the network sees.
    """

    conv: str
    bn: str | None
    act: str | None
    act_fn: nn.Module | None
    conv_node: fx.Node
    out: fx.Node


def chain_from_conv(gm: fx.GraphModule, conv_node: fx.Node) -> Chain:
    """Follow conv → BN → activation from ``conv_node`` as far as each step has a single user."""
    out, bn_name, act_name, act_fn = conv_node, None, None, None
    users = list(out.users)
    if len(users) == 1 and isinstance(module_of(gm, users[0]), nn.BatchNorm2d):
        out = users[0]
        bn_name = out.target
        users = list(out.users)
    if len(users) == 1 and (act := activation_of(gm, users[0])) is not None:
        out = users[0]
        act_fn = act
        act_name = out.target if out.op == "call_module" else str(out.target.__name__)
    return Chain(conv_node.target, bn_name, act_name, act_fn, conv_node, out)


def conv_chains(gm: fx.GraphModule) -> list[Chain]:
    """Every Conv2d call site in graph order, as a chain."""
    return [chain_from_conv(gm, n) for n in gm.graph.nodes if isinstance(module_of(gm, n), nn.Conv2d)]


def spatial_size(node: fx.Node) -> int:
    """H*W of a (N, C, H, W) node output recorded by ``trace``; 1 for (N, C)."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        raise ModelError(f"no shape recorded for {node.name}")
    shape = tuple(meta.shape)
    return int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1


def is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """(N, C, H, W) → (N, C·H·W), however it is written (nn.Flatten, torch.flatten, .flatten, .view, .reshape)."""
    if node.op == "call_method" and node.target in ("view", "reshape") and node.args:
        src, dst = node.args[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
        shape = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
        # only x.view(N, -1): a literal feature count (x.view(-1, 784)) would break once channels are removed
        return (src is not None and dst is not None and len(src.shape) == 4 and len(dst.shape) == 2
                and dst.shape[0] == src.shape[0] and len(shape) == 2 and shape[1] == -1 and shape[0] != -1)
    mod = module_of(gm, node)
    if isinstance(mod, nn.Flatten):
        return mod.start_dim == 1 and mod.end_dim == -1
    if node.op == "call_function" and node.target in FLATTEN_FUNCTIONS:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    return False
