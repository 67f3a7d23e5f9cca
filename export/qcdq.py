"""Standard ONNX Q/DQ export (QCDQ) for CPU/GPU runtimes (run it with ``pfq_edge.runners.onnx``).

QCDQ is Brevitas' form of the ONNX QDQ standard: every quantized tensor is QuantizeLinear → DequantizeLinear on
8-bit integers, with a Clip between them holding a < 8-bit range (a 4-bit activation: Q → Clip(0, 15) → DQ).
It carries 2–8-bit integers only (biases stay float here: see quantize.py), so a tensor that reaches 9 bits is
refused by ``check_qcdq_bit_widths`` with its name, before the exporter sees it (shared/cases 9).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pfq_edge.errors import ModelError, ToolchainError, first_line
from pfq_edge.io import atomic_write_bytes

QCDQ_MAX_BITS = 8


def check_qcdq_bit_widths(qmodel: torch.nn.Module, example: torch.Tensor) -> None:
    """Refuse tensors QCDQ cannot carry: run ``example`` (N, C, H, W) through ``qmodel`` and look at every quantizer
    output (activations, weights) and every quantized input of a conv/linear layer.

    Accumulators (conv outputs before requantization) are float in QCDQ and are not checked. Raises ModelError
    naming the tensor and its bit width, e.g. "tensor 'add' (input of layer 'conv3') is 9-bit".
    """
    from brevitas.proxy.parameter_quant import BiasQuantProxyFromInjectorBase
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector
    from brevitas.quant_tensor import QuantTensor

    found: list[tuple[str, int]] = []
    producers = _producers(qmodel)

    def bits(x) -> int | None:
        return int(round(float(x.bit_width))) if isinstance(x, QuantTensor) and x.bit_width is not None else None

    def on_output(name):
        def hook(_module, _inputs, output):
            b = bits(output)
            if b is not None and b > QCDQ_MAX_BITS:
                found.append((f"tensor {name!r}", b))
        return hook

    def on_input(name):
        def hook(_module, inputs):
            b = bits(inputs[0]) if inputs else None
            if b is not None and b > QCDQ_MAX_BITS:
                src = producers.get(name)
                found.append((f"tensor {src!r} (input of layer {name!r})" if src else f"the input of layer {name!r}", b))
        return hook

    handles = []
    for name, module in qmodel.named_modules():
        if (isinstance(module, QuantProxyFromInjector) and getattr(module, "is_quant_enabled", False)
                and not isinstance(module, BiasQuantProxyFromInjectorBase)):
            owner = name.rsplit(".", 1)[0] if "." in name else name
            handles.append(module.register_forward_hook(on_output(owner)))
        elif getattr(module, "weight_quant", None) is not None:
            handles.append(module.register_forward_pre_hook(on_input(name)))
    try:
        qmodel.eval()
        with torch.no_grad():
            output = qmodel(example)
        b = bits(output)
        if b is not None and b > QCDQ_MAX_BITS:  # e.g. a sum or an accumulator returned as the model's output
            found.append(("the model's output", b))
    finally:
        for h in handles:
            h.remove()
    found = list(dict.fromkeys(found))
    if found:
        what, b = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ModelError(f"{what[0].upper()}{what[1:]} is {b}-bit{more}; QCDQ (ONNX QuantizeLinear/DequantizeLinear) carries 2–"
                         f"{QCDQ_MAX_BITS}-bit integers: requantize it to ≤ {QCDQ_MAX_BITS} bits (a Brevitas "
                         f"QuantIdentity) or choose a target whose format carries it")


def _producers(qmodel: torch.nn.Module) -> dict[str, str]:
    """For an fx GraphModule: layer name → name of the graph node that feeds it."""
    graph = getattr(qmodel, "graph", None)
    if graph is None:
        return {}
    return {n.target: n.args[0].name for n in graph.nodes
            if n.op == "call_module" and n.args and hasattr(n.args[0], "name")}


def export_qcdq(qmodel: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``qmodel`` for inputs shaped like ``example`` (batch, C, H, W) — the batch is static — to QCDQ ONNX.

    Checks bit widths first (``check_qcdq_bit_widths``). Tries Brevitas' TorchScript exporter (opset 13, module
    names kept), then the dynamo one. Raises ModelError (a tensor above 8 bits) or ToolchainError.
    """
    import onnx
    from brevitas.export import export_onnx_qcdq

    from pfq_edge.export.qonnx import export_with_fallback

    check_qcdq_bit_widths(qmodel, example)
    path = Path(path)
    export_with_fallback(export_onnx_qcdq, "QCDQ", qmodel, example, path)
    model = onnx.load(str(path))
    if _constant_initializers(model):
        atomic_write_bytes(path, model.SerializeToString())
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ToolchainError(f"the QCDQ export {path.name} is not valid ONNX: {first_line(exc)}") from None
    return path


def _constant_initializers(model) -> bool:
    """Drop initializers from the graph inputs; True if any were listed there.

    Brevitas' TorchScript export lists the float biases as graph inputs too, i.e. as values a caller may override.
    onnxruntime then quantizes them at run time for its fused QLinearConv, and 1.25.1 drops that bias from a fused
    1×1 conv (on the default CNN: top-1 agreement 16.8% with the graph as written). As constants they are
    quantized once when the session is built, and every fusion matches (docs/cpu-gpu.md, "onnxruntime's optimization levels").
    """
    names = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in names]
    if len(inputs) == len(model.graph.input):
        return False
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return True
