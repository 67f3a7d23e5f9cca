"""Models given as a ``torch.export`` archive (``.pt2``): loaded without running pickled code, and rebuilt as an
``nn.Module`` whose layers are modules again (Conv2d, BatchNorm2d, Linear, ReLU, pooling), so that PfQ and Brevitas
see the same structure as in the eager model.

An exported program holds aten calls (``aten.conv2d(x, weight, …)``), not modules; PfQ looks for conv → BN pairs and
Brevitas replaces modules, so each weight-carrying call becomes the module with those weights. Adds, concats and
means become the calls eager code traces to (``operator.add``, ``torch.cat``, ``Tensor.mean``): Brevitas requantizes
the inputs of exactly those (an ``aten.add`` left as it is reached FINN unquantized, and its streamlining looped);
other calls stay as they are.
"""

from __future__ import annotations

import contextlib
import operator
import pickle
from pathlib import Path

from pfq_edge.errors import ModelError, one_line


@contextlib.contextmanager
def _no_pickled_code():
    """torch.export.load falls back to unrestricted unpickling for some weights and constants; refuse those and
    force every torch.load to weights_only=True, so a crafted archive cannot run code."""
    import torch

    def refuse(*args, **kwargs):
        raise ModelError("the archive holds pickled objects other than tensors; refusing to unpickle them")

    saved = torch.load, pickle.loads, torch._C._pickle_load_obj

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return saved[0](*args, **kwargs)

    torch.load, pickle.loads, torch._C._pickle_load_obj = weights_only_load, refuse, refuse
    try:
        yield
    finally:
        torch.load, pickle.loads, torch._C._pickle_load_obj = saved


def load_exported(path: Path):
    """(module in eval mode, input shape (C, H, W)) from a ``torch.export.save`` archive.

    Raises ModelError if the file is not a readable archive, would unpickle objects, has not exactly one 4-D image
    input, or uses a layer call this rebuild does not know with weights attached.
    """
    import logging
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a torch.export archive (not a zip file)")
    logging.disable(logging.CRITICAL)  # torch logs a traceback before re-raising deserialization errors
    try:
        with _no_pickled_code():
            program = torch.export.load(str(path))
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    except Exception as exc:  # zip, JSON and version errors of several types
        text = one_line(exc, 200)
        raise ModelError(f"cannot read torch.export archive {path}: {text}") from None
    finally:
        logging.disable(logging.NOTSET)
    inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    shapes = [n.meta.get("val").shape for n in program.graph.nodes if n.op == "placeholder"
              and n.name in {getattr(s.arg, "name", None) for s in inputs}]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise ModelError(f"{path}: expected one image input (N, C, H, W), found {[tuple(s) for s in shapes]}")
    module = rebuild(program.module(), str(path))
    return module.eval(), tuple(int(d) for d in shapes[0][1:])


def _attr(gm, node):
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def rebuild(gm, name: str):
    """An fx GraphModule with module calls for the weight-carrying aten calls of ``gm`` (an unlifted exported
    program)."""
    import torch
    from torch import fx, nn

    aten = torch.ops.aten
    graph, env, modules = fx.Graph(), {}, {}
    values = {n.name: _attr(gm, n) for n in gm.graph.nodes if n.op == "get_attr"}

    def arg(a):
        return fx.node.map_arg(a, lambda n: env[n.name]) if not isinstance(a, fx.Node) else env[a.name]

    def tensor(a):
        return None if a is None else values[a.name].detach().clone()

    def layer(named_by, mod, x):
        """Add ``mod`` named after its weight's owner (``features.3`` for ``features.3.weight``) or the node."""
        key = named_by.target.rsplit(".", 1)[0] if named_by.op == "get_attr" else named_by.name
        key = key if key not in modules else f"{key}_{len(modules)}"
        modules[key] = mod
        return graph.call_module(key, (x,))

    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_module" and node.target == "_guards_fn"):
            continue
        if node.op == "placeholder":
            env[node.name] = graph.placeholder(node.name)
            continue
        if node.op == "output":  # the flat outputs; a single tensor is returned as such
            out = node.args[0]
            graph.output(arg(out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out))
            continue
        t, a = node.target, node.args
        if t is aten.conv2d.default:
            bias, stride, padding, dilation, groups = list(a[2:]) + [None, 1, 0, 1, 1][len(a) - 2:]
            w, b = tensor(a[1]), tensor(bias)
            conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding, dilation, groups,
                             bias=b is not None)
            conv.weight.data, conv.bias = w, (nn.Parameter(b) if b is not None else None)
            env[node.name] = layer(a[1], conv, env[a[0].name])
        elif t is aten.batch_norm.default:  # (x, weight, bias, running_mean, running_var, training, momentum, eps, …)
            w, b, mean, var, eps = a[1], a[2], a[3], a[4], a[7]
            bn = nn.BatchNorm2d(values[mean.name].numel(), eps=float(eps))
            with torch.no_grad():
                bn.running_mean.copy_(tensor(mean))
                bn.running_var.copy_(tensor(var))
                bn.weight.copy_(tensor(w) if w is not None else torch.ones_like(bn.weight))
                bn.bias.copy_(tensor(b) if b is not None else torch.zeros_like(bn.bias))
            env[node.name] = layer(mean, bn, env[a[0].name])
        elif t is aten.linear.default:
            w, b = tensor(a[1]), tensor(a[2] if len(a) > 2 else None)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            lin.weight.data, lin.bias = w, (nn.Parameter(b) if b is not None else None)
            env[node.name] = layer(a[1], lin, env[a[0].name])
        elif t in (aten.relu.default, aten.relu_.default):
            env[node.name] = layer(node, nn.ReLU(), env[a[0].name])
        elif t in (aten.relu6.default, aten.hardtanh.default) and tuple(a[1:3]) in ((), (0.0, 6.0)):
            env[node.name] = layer(node, nn.ReLU6(), env[a[0].name])
        elif t is aten.max_pool2d.default:
            env[node.name] = layer(node, nn.MaxPool2d(*a[1:]), env[a[0].name])
        elif t is aten.avg_pool2d.default:
            env[node.name] = layer(node, nn.AvgPool2d(*a[1:]), env[a[0].name])
        elif t is aten.flatten.using_ints:
            env[node.name] = layer(node, nn.Flatten(*a[1:]), env[a[0].name])
        elif t is aten.adaptive_avg_pool2d.default:
            env[node.name] = layer(node, nn.AdaptiveAvgPool2d(a[1]), env[a[0].name])
        elif t in (aten.add.Tensor, aten.add_.Tensor) and node.kwargs.get("alpha", 1) == 1 and len(a) == 2:
            env[node.name] = graph.call_function(operator.add, arg(tuple(a)))  # as eager code's ``x + y`` traces
        elif t is aten.cat.default:
            env[node.name] = graph.call_function(torch.cat, arg(tuple(a)), arg(dict(node.kwargs)))
        elif t is aten.mean.dim:
            env[node.name] = graph.call_method("mean", arg(tuple(a)), arg(dict(node.kwargs)))
        elif node.op == "call_function":
            for x in node.all_input_nodes:
                if x.op == "get_attr" and x.name not in env:
                    if isinstance(values[x.name], nn.Parameter):
                        raise ModelError(f"{name}: {t} uses weights ({x.target}); only conv2d, linear and "
                                         f"batch_norm may carry weights in a model pfq-edge compiles")
                    modules.setdefault("_constants", nn.Module()).register_buffer(x.name, values[x.name].clone())
                    env[x.name] = graph.get_attr(f"_constants.{x.name}")
            env[node.name] = graph.call_function(t, arg(tuple(a)), arg(dict(node.kwargs)))
        else:
            raise ModelError(f"{name}: cannot rebuild node {node.op} {t}")
    return fx.GraphModule(modules, graph, class_name="ExportedModel")

