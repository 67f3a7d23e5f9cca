"""Fold BatchNorm and insert Brevitas quantizers (graph mode), then calibrate activation ranges.

The workflow of design.md §5: PfQ-pruned float model → fold BN → low-bit quantizers → calibrate → QAT → export.
Bit widths and granularity come from the target profile (``QuantSpec``). Biases stay float for FPGA targets (FINN
absorbs them into its thresholds, and its QONNX import rejects Brevitas' Int32 bias Quant nodes on convolutions);
CPU/GPU targets quantize them to int32 at input scale × weight scale, the grid integer runtimes add them on.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import fx, nn

from pfq_edge.errors import ModelError, first_line

EQUALIZE_ITERS = 20  # Brevitas cross-layer equalization iterations (its examples' choice)
INPUT_RANGE = 1.0  # pixels arrive scaled to [0, 1] (data.py); the input quantizer's step is 1 / (2^bits - 1)
_LEARNED_SCALE = {"weight_scaling_impl_type": "parameter_from_stats"}  # LSQ-style: scales train during QAT


def _input_quantizer(bits: int):
    """Unsigned quantizer with a fixed scale so that 8-bit inputs are exactly the integer pixels (step 1/255)."""
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import Uint8ActPerTensorFloat

    class PixelInputQuant(Uint8ActPerTensorFloat):
        scaling_impl_type = ScalingImplType.CONST
        scaling_const = INPUT_RANGE
        max_val = INPUT_RANGE
        bit_width = bits

    return PixelInputQuant


def _flatten_modules_to_functions(gm: fx.GraphModule) -> None:
    # Brevitas sees through torch.flatten but not nn.Flatten; without this it re-quantizes the classifier input.
    for node in list(gm.graph.nodes):
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.Flatten):
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.flatten, (node.args[0],),
                                             {"start_dim": mod.start_dim, "end_dim": mod.end_dim})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.recompile()


@contextlib.contextmanager
def _residual_iteration_cap(gm: fx.GraphModule):
    """Brevitas aligns the scales of every add's and concat's inputs one rewrite per pass, up to 9,999 passes of a
    whole-graph recompile; where no alignment exists (an add of a concat's output and another tensor: the concat
    wants its inputs shared, the add its own scale) that loop ran for hours. Real graphs need about one pass per
    add/concat, so cap it there and name the adds and concats. Raises ModelError."""
    from brevitas.graph import quantize_impl as qi

    joins = [n.name for n in gm.graph.nodes if (n.op == "call_function" and n.target in qi.ADD_FNS + [torch.cat])
             or (n.op == "call_method" and n.target in qi.ADD_METHODS)]
    saved, qi.MAX_RESIDUAL_ITERS = qi.MAX_RESIDUAL_ITERS, 8 * len(joins) + 8
    try:
        yield
    except RuntimeError as exc:
        if "Residual handler" not in str(exc):
            raise
        raise ModelError(f"Brevitas cannot give the inputs of the model's adds and concats ({', '.join(joins[:4])}"
                         f"{'…' if len(joins) > 4 else ''}) one quantization scale each; an add that takes a "
                         f"concat's output is a known case: requantize the concat's output in the model, e.g. "
                         f"through a ReLU or a conv, before the add") from None
    finally:
        qi.MAX_RESIDUAL_ITERS = saved


def quantize_model(model: nn.Module, spec) -> nn.Module:
    """Return a Brevitas model of ``model`` (float, eval) with BN folded (or kept) and ``spec``'s bit widths.

    spec: QuantSpec (weight/act/input bit widths 2–8, first/last layer weight bit widths, "per-tensor" |
    "per-channel" weight scales, BN "fold" | "keep" | "auto" (keep below 4-bit weights), cross-layer equalization
    on/off, bias "float" | "int32").
    The result takes (N, C, H, W) float32 in [0, 1] and returns float logits. Raises ModelError if the model cannot
    be traced or holds a BatchNorm shared by two convs (it cannot be folded into both).
    """
    import brevitas.nn as qnn
    from brevitas.graph.quantize import (COMPUTE_LAYER_MAP, QUANT_ACT_MAP, QUANT_IDENTITY_MAP,
                                         preprocess_for_quantize, quantize)
    from brevitas.quant import Int32Bias

    from pfq_edge.pfq.graph import call_counts

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise ModelError(f"cannot trace {type(model).__name__} for quantization: {first_line(exc)}") from None
    for name, count in call_counts(gm).items():
        if count > 1 and isinstance(gm.get_submodule(name), nn.modules.batchnorm._BatchNorm):
            raise ModelError(f"BatchNorm {name!r} is used at {count} call sites; it cannot be folded into one conv")
    weight_quant, act_quant = _quantizers(spec)
    compute_map = {}
    for layer, entry in COMPUTE_LAYER_MAP.items():
        if entry is None or layer not in (nn.Conv2d, nn.Linear):
            compute_map[layer] = entry
            continue
        cls, kwargs = entry
        compute_map[layer] = (cls, {**kwargs, "weight_quant": weight_quant, "weight_bit_width": spec.weight_bit_width,
                                    "bias_quant": Int32Bias if spec.bias == "int32" else None, **_LEARNED_SCALE})
    act_map = {k: (cls, {**kw, "bit_width": spec.act_bit_width}) for k, (cls, kw) in QUANT_ACT_MAP.items()}
    identity_map = {k: (cls, {**kw, "bit_width": spec.act_bit_width}) for k, (cls, kw) in QUANT_IDENTITY_MAP.items()}
    if act_quant is not None:  # MSE-initialised scales: ReLU and ReLU6 alike (the quantizer's range clips at 6)
        for act in (nn.ReLU, nn.ReLU6):
            act_map[act] = (qnn.QuantReLU, {"act_quant": act_quant["unsigned"], "return_quant_tensor": True,
                                            "bit_width": spec.act_bit_width})
        for sign, (cls, kw) in identity_map.items():
            identity_map[sign] = (cls, {**kw, "act_quant": act_quant[sign]})

    # Brevitas traces with its own tracer (its BN-merge patterns rely on it); work on a copy: folding is in place.
    gm = preprocess_for_quantize(copy.deepcopy(model).eval(), trace_model=True, relu6_to_relu=False,
                                 equalize_iters=EQUALIZE_ITERS if spec.equalize else 0,
                                 merge_bn=spec.resolved_bn() == "fold")
    _flatten_modules_to_functions(gm)
    with _residual_iteration_cap(gm):
        qm = quantize(gm, quant_identity_map=identity_map, compute_layer_map=compute_map, quant_act_map=act_map,
                      requantize_layer_handler_output=False)
    input_quants = [n for n in qm.graph.nodes if n.op == "call_module" and n.args
                    and getattr(n.args[0], "op", None) == "placeholder"
                    and isinstance(qm.get_submodule(n.target), qnn.QuantIdentity)]
    if len(input_quants) != 1:
        raise ModelError("the quantized model has no single input quantizer (one image input expected)")
    if _normalization_output(qm) is not None:
        _quantize_after_normalization(qm, input_quants[0], spec.input_bit_width)
    else:
        setattr(qm, input_quants[0].target,
                qnn.QuantIdentity(act_quant=_input_quantizer(spec.input_bit_width), return_quant_tensor=True))
    _set_edge_layer_bits(qm, spec)
    qm.eval()
    return qm


def _quantizers(spec):
    """The weight quantizer and, for ``scale_init`` "mse", the signed/unsigned activation quantizers (None: keep
    Brevitas' per-activation defaults)."""
    from brevitas import quant as bq

    per_tensor = spec.weight_granularity == "per-tensor"
    if spec.resolved_scale_init() == "mse":
        weight = bq.Int8WeightPerTensorFloatMSE if per_tensor else bq.Int8WeightPerChannelFloatMSE
        return weight, {"signed": bq.Int8ActPerTensorFloatMSE, "unsigned": bq.Uint8ActPerTensorFloatMSE}
    return (bq.Int8WeightPerTensorFloat if per_tensor else bq.Int8WeightPerChannelFloat), None


def _normalization_output(gm: fx.GraphModule):
    """The node computing (x − mean) / std (datasets/normalize.py), or None if the model has no normalisation."""
    from pfq_edge.datasets.normalize import STD_BUFFER

    std = next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == STD_BUFFER), None)
    return next(iter(std.users)) if std is not None else None


def _quantize_after_normalization(qm: fx.GraphModule, pixel_quant: fx.Node, bits: int) -> None:
    # The model normalises its [0, 1] input: quantize the normalised values (signed, calibrated scale), not the
    # pixels, so that one quantizer sits at the input and FINN can absorb the Sub/Div into its thresholds.
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat

    pixel_quant.replace_all_uses_with(pixel_quant.args[0])
    qm.graph.erase_node(pixel_quant)
    out = _normalization_output(qm)
    quant = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=bits, return_quant_tensor=True)
    users = list(out.users)
    own = [u for u in users if u.op == "call_module" and isinstance(qm.get_submodule(u.target), qnn.QuantIdentity)]
    if own:
        # Brevitas' own quantizer before the first layer: replace it, and let the other readers (e.g. a
        # ``x.size(0)``, as in EfficientNet's forward) read its output. Two quantizers in a row would requantize the
        # 8-bit input to the act width, where half the values land on rounding ties that FINN's thresholds break
        # upwards and Brevitas/QONNX to even (7.8 % of EfficientNet-Lite0's stem inputs).
        setattr(qm, own[0].target, quant)
        for user in users:
            if user is not own[0]:
                user.replace_input_with(out, own[0])
    else:
        qm.add_submodule("input_quant", quant)
        with qm.graph.inserting_after(out):
            node = qm.graph.call_module("input_quant", (out,))
        for user in users:
            user.replace_input_with(out, node)
    qm.graph.lint()
    qm.recompile()


def compute_layers(qmodel: nn.Module) -> list[str]:
    """Names of the weight-quantized layers (conv / linear) in execution order."""
    if isinstance(qmodel, fx.GraphModule):
        names = [n.target for n in qmodel.graph.nodes if n.op == "call_module"]
    else:
        names = [name for name, _ in qmodel.named_modules()]
    return [n for n in names if getattr(qmodel.get_submodule(n), "weight_quant", None) is not None]


def _set_edge_layer_bits(qm: nn.Module, spec) -> None:
    # Rebuild the weight quantizer of the first / last layer from its injector with another bit width.
    layers = compute_layers(qm)
    for name, bits in zip((layers[0], layers[-1]), spec.edge_layer_bits(len(layers))):
        if bits != spec.weight_bit_width:
            proxy = qm.get_submodule(name).weight_quant
            proxy.quant_injector = proxy.quant_injector.let(bit_width=bits)
            proxy.init_tensor_quant()


def transfer_weights(src: nn.Module, dst: nn.Module) -> int:
    """Copy the trained weights of ``src`` into ``dst``, two quantized models of the same pruned network at other
    bit widths (staged fine-tuning): every conv/linear weight and bias and every BatchNorm's parameters and
    statistics, not the quantizers' scales — ``dst`` calibrates its own. Returns the number of tensors copied;
    raises ModelError if the two models' layers differ."""
    keys = set()
    for name, mod in dst.named_modules():
        prefix = f"{name}." if name else ""
        if getattr(mod, "weight_quant", None) is not None:
            keys.update(prefix + k for k in ("weight", "bias") if getattr(mod, k, None) is not None)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            keys.update(prefix + k for k, _ in mod.state_dict().items())
    # In place, not load_state_dict: after a (partial) load_state_dict, the calibrated fashion-resnet failed at its
    # residual adds ("Scaling factors are different", measured); copying the tensors leaves Brevitas' state alone.
    state, target = src.state_dict(), dst.state_dict(keep_vars=True)
    missing = sorted(k for k in keys if k not in state or state[k].shape != target[k].shape)
    if missing:
        raise ModelError(f"cannot carry weights between stages: {missing[0]} differs")
    with torch.no_grad():
        for k in keys:
            target[k].copy_(state[k])
    return len(keys)


def calibrate(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 256) -> None:
    """Set activation ranges of ``qmodel`` from ``images`` (N, C, H, W) with Brevitas' calibration mode."""
    from brevitas.graph.calibrate import calibration_mode

    qmodel.eval()
    with torch.no_grad(), _observer_state_kept(qmodel), calibration_mode(qmodel):
        for i in range(0, len(images), batch_size):
            qmodel(images[i:i + batch_size])
    qmodel.eval()


def reestimate_bn(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 256) -> int:
    """Re-estimate every BatchNorm's running mean/var of ``qmodel`` (a Brevitas model with BN kept) on ``images``
    (N, C, H, W) with its quantizers in place: BN layers in train mode with a cumulative average (momentum None),
    everything else in eval mode, no gradients — "BN adaptation" as in NNCF, AIMET. Returns the number of BN
    layers. Run after ``calibrate``: Brevitas' activation scales are initialised once (a second calibration leaves
    them as they are, measured), so they stay those of the first calibration."""
    bns = [m for m in qmodel.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    qmodel.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                qmodel(images[i:i + batch_size])
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        qmodel.eval()
    return len(bns)


def correct_bias(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 256) -> None:
    """Brevitas bias correction: each layer's bias absorbs the mean shift between its float and quantized
    outputs on ``images`` (N, C, H, W). Run after ``calibrate``."""
    from brevitas.graph.calibrate import bias_correction_mode

    qmodel.eval()
    with torch.no_grad(), _observer_state_kept(qmodel), bias_correction_mode(qmodel):
        for i in range(0, len(images), batch_size):
            qmodel(images[i:i + batch_size])
    qmodel.eval()


@contextlib.contextmanager
def _observer_state_kept(qmodel: nn.Module):
    # Brevitas 0.13.4's calibration_mode switches every activation quantizer to observer_only (stats, no rounding)
    # and restores what it saw per proxy. The inputs of a concat or an add share one quantizer (Brevitas aligns
    # them), seen through two proxies: the second records the first's True and "restores" it, so that quantizer
    # never rounds again — Brevitas then computes those tensors in float while the export quantizes them (a concat
    # model: every image off by up to 0.028). Restore the state as it was before.
    before = {m: m.observer_only for m in qmodel.modules() if hasattr(m, "observer_only")}
    try:
        yield
    finally:
        for m, state in before.items():
            m.observer_only = state


def weight_bits(qmodel: nn.Module) -> dict:
    """Logical size: weight storage in bits (Σ numel × bit width) for conv/linear weights; biases counted apart.

    Returns {"weight_bits", "bias_params", "zero_weight_fraction" (share of weights whose integer is 0),
    "layers": [{"layer", "params", "bit_width", "bits", "zero_fraction"}]}.
    """
    layers, total, bias, zeros, count = [], 0, 0, 0, 0
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if hasattr(mod, "weight_quant") and getattr(mod, "weight", None) is not None:
                qw = mod.quant_weight()
                bw, n = int(qw.bit_width), mod.weight.numel()
                z = int((qw.int() == 0).sum())
                layers.append({"layer": name, "params": n, "bit_width": bw, "bits": n * bw, "zero_fraction": z / n})
                total, zeros, count = total + n * bw, zeros + z, count + n
                bias += mod.bias.numel() if mod.bias is not None else 0
    return {"weight_bits": total, "bias_params": bias, "zero_weight_fraction": zeros / max(count, 1),
            "layers": layers}
