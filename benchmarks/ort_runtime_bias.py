"""onnxruntime's fused QDQ 1×1 conv with a float bias given at run time: the fact behind export/qcdq.py's
``_constant_initializers`` (docs/cpu-gpu.md, "onnxruntime's optimization levels"), as a one-conv model anyone can run.

    .venv/bin/python benchmarks/ort_runtime_bias.py      # writes benchmarks/results/ort_runtime_bias.md

The model: x → QuantizeLinear → DequantizeLinear → Conv 1×1 (int8 weights → DequantizeLinear, float bias) →
QuantizeLinear → DequantizeLinear, once with the bias a constant initializer and once with the same initializer also
listed as a graph input (what Brevitas' TorchScript exporter writes). Each is run with graph optimizations off (the
graph as written) and at onnxruntime's default level (all: QLinearConv), for the bias as stored, 0 and 2× it.
Output: max |all − off| in output quantization steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
C, K, X_SCALE, W_SCALE, Y_SCALE = 8, 16, 0.02, 0.01, 0.05


def _model(weight: np.ndarray, bias: np.ndarray, bias_as_input: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    consts = {"xs": np.float32(X_SCALE), "xz": np.uint8(0), "w": weight, "ws": np.float32(W_SCALE), "wz": np.int8(0),
              "b": bias, "ys": np.float32(Y_SCALE), "yz": np.uint8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 6, 6])]
    if bias_as_input:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [K]))
    graph = helper.make_graph(nodes, "qdq_conv1x1", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, K, 6, 6])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _run(model: bytes, level: str, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def main() -> int:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (K, C, 1, 1)).astype(np.int8)
    bias = rng.normal(0, 1, K).astype(np.float32)
    x = rng.uniform(0, 5, (1, C, 6, 6)).astype(np.float32)
    rows = []
    for bias_as_input in (False, True):
        model = _model(weight, bias, bias_as_input)
        for factor in (1.0, 0.0, 2.0):
            feeds = {"x": x, **({"b": np.float32(factor) * bias} if bias_as_input else {})}
            if not bias_as_input and factor != 1.0:
                continue  # a constant bias cannot be fed
            off, fused = _run(model, "ORT_DISABLE_ALL", feeds), _run(model, "ORT_ENABLE_ALL", feeds)
            rows.append((bias_as_input, factor, float(np.abs(fused - off).max() / Y_SCALE)))
    lines = ["# onnxruntime: fused QDQ 1×1 conv with a bias given at run time", "",
             f"Command: `python benchmarks/ort_runtime_bias.py`; onnxruntime {ort.__version__}, CPUExecutionProvider.",
             "One QDQ 1×1 conv (8→16 channels, int8 weights, float bias); max |level all − level off| of its output in "
             "output quantization steps (0 = identical; 1 = a rounding flip).", "",
             "| bias listed as graph input | bias fed | max \\|all − off\\| (steps) |", "|---|---|---|"]
    lines += [f"| {'yes' if a else 'no (constant)'} | {f:g} × stored | {d:.0f} |" for a, f, d in rows]
    lines += ["", "With the bias fed at run time the error scales with it and falls to a rounding flip when it is zero: "
              "the fused kernel ignores a bias that is not a constant. pfq-edge's QCDQ export keeps initializers out "
              "of the graph inputs for this reason."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    from pfq_edge.io import atomic_write_text

    atomic_write_text(RESULTS / "ort_runtime_bias.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
