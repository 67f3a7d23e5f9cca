"""What FINN cannot map, named before and during its build instead of a bare AssertionError.

Three checks, each raising ToolchainError with every offending node and the reason:

* ``preflight(model)`` — on the QONNX model FINN is given: ops FINN has no hardware layer for at all (float
  activations, softmax, non-nearest resizing, …). Runs before the build starts.
* ``unmapped_after_conversion(model)`` — after ``step_convert_to_hw``: nodes in the middle of the graph that did not
  become a HW layer (domain ``finn.custom_op.fpgadataflow``). Non-HW nodes before the first or after the last HW
  layer are allowed: FINN leaves them outside the dataflow partition, on the host (the input transpose, the output
  scale).
* ``describe_failure(exc, step)`` — any other exception a FINN step raises: the step, the node FINN was working on
  (read from the failing frames) and the assertion's source line.

To add a reason for an op, extend ``NO_HW_LAYER`` (never mappable) or ``NOT_CONVERTED`` (mappable in principle, left
over here).
"""

from __future__ import annotations

import linecache
import traceback

from pfq_edge.errors import ToolchainError

HW_DOMAIN = "finn.custom_op.fpgadataflow"

_FLOAT_ACT = ("a float activation: FINN maps an activation only as the thresholds of a quantized one (Relu → Quant); "
              "use ReLU/ReLU6 or a Brevitas-quantized activation")
NO_HW_LAYER = {
    **{op: _FLOAT_ACT for op in ("LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
                                 "HardSigmoid", "HardSwish", "Gelu", "Erf", "Mish")},
    "Softmax": "no FINN HW layer; leave the softmax out of the model (the top-1 of the logits is the same)",
    "LogSoftmax": "no FINN HW layer; leave it out of the model (the top-1 of the logits is the same)",
    "LayerNormalization": "no FINN HW layer for normalization over channels at run time",
    "InstanceNormalization": "no FINN HW layer for normalization over channels at run time",
    "Exp": "no FINN HW layer", "Log": "no FINN HW layer", "Sqrt": "no FINN HW layer", "Pow": "no FINN HW layer",
    "Einsum": "no FINN HW layer",
}

NOT_CONVERTED = {
    "Resize": "FINN's UpsampleNearestNeighbour takes nearest-neighbour resizing by an integer factor on an NHWC "
              "stream; left between layout transposes (Transpose, or the Shuffle layers FINN makes of them) a Resize "
              "is still NCHW (FINN's streamlining does not move "
              "a transpose past it): resize before the model (in the data pipeline) instead",
    "Upsample": "FINN's UpsampleNearestNeighbour takes nearest-neighbour resizing by an integer factor on an NHWC "
                "stream; this one was not converted",
    "Transpose": "a layout transpose FINN's streamlining could not absorb or move to the graph's ends",
    "Mul": "a floating-point scale FINN's streamlining could not absorb into thresholds or the next layer",
    "Add": "a floating-point offset (or a join of differently scaled branches) FINN's streamlining could not absorb",
    "Sub": "a floating-point offset FINN's streamlining could not absorb",
    "Div": "a floating-point division FINN's streamlining could not absorb",
    "Reshape": "a reshape inside the dataflow; FINN streams NHWC tensors and reshapes only before the classifier",
    "Flatten": "a flatten FINN could not fold into the next layer (a transpose or a scale stayed between)",
    "MultiThreshold": "thresholds that did not become a Thresholding layer (their input is not integer)",
    "Conv": "a convolution that did not become an MVAU/VVAU (its weights or its input are not integer-quantized)",
    "MatMul": "a matrix multiply that did not become an MVAU (its weights or its input are not integer-quantized)",
    "Gemm": "a matrix multiply that did not become an MVAU (its weights or its input are not integer-quantized)",
    "Trunc": "average pooling whose rounding FINN does not take (it needs FLOOR truncation)",
    "AveragePool": "average pooling FINN did not lower (it needs an integer input and FLOOR truncation)",
    "GlobalAveragePool": "global average pooling FINN did not lower (it needs an integer input)",
    "MaxPool": "a max pool FINN did not convert (it needs an NHWC integer input)",
    "Concat": "a concat FINN did not convert (its inputs need one integer type and NHWC layout)",
}


def _reason(op_type: str) -> str:
    return NO_HW_LAYER.get(op_type) or NOT_CONVERTED.get(op_type) or "no FINN HW layer was inferred for it"


def _listing(nodes, model=None) -> str:
    """``name (op): reason`` for up to four nodes; with ``model`` (a ModelWrapper), also what each sits between
    (FINN's conversions match on the neighbours too: a Resize between two Transposes was left in NCHW)."""
    def where(n) -> str:
        if model is None:
            return ""
        before = [p.op_type for p in map(model.find_producer, n.input) if p is not None]
        after = [c.op_type for o in n.output for c in model.find_consumers(o)]
        return f" between {'/'.join(before) or 'the input'} and {'/'.join(after) or 'the output'}"

    shown = "; ".join(f"{n.name} ({n.op_type}{where(n)}): {_reason(n.op_type)}" for n in nodes[:4])
    return shown + (f"; and {len(nodes) - 4} more" if len(nodes) > 4 else "")


def preflight(model) -> None:
    """Raise ToolchainError naming every node of ``model`` (a qonnx ModelWrapper, FINN's input) whose op FINN has no
    HW layer for; a Resize must be nearest-neighbour. Returns None when nothing is known to be unmappable."""
    bad = [n for n in model.graph.node if n.op_type in NO_HW_LAYER]
    for node in model.graph.node:
        if node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode != "nearest":
                bad.append(node)
    if bad:
        noun = "node" if len(bad) == 1 else "nodes"
        raise ToolchainError(f"FINN cannot map {len(bad)} {noun} of this model (checked before the build): "
                             f"{_listing(bad)}")


def unmapped_after_conversion(model) -> list:
    """Nodes of ``model`` (after ``step_convert_to_hw``) that are not HW layers and sit between HW layers — FINN
    would split or refuse the dataflow partition there. Nodes before the first / after the last HW layer are left
    out (they run on the host)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reaches_hw(node, step) -> bool:
        seen, todo = set(), [node]
        while todo:
            cur = todo.pop()
            for nxt in step(cur):
                if id(nxt) not in seen:
                    seen.add(id(nxt))
                    if nxt.domain == HW_DOMAIN:
                        return True
                    todo.append(nxt)
        return False

    def upstream(n):
        return [producers[i] for i in n.input if i in producers]

    def downstream(n):
        return [c for o in n.output for c in consumers.get(o, [])]

    return [n for n in graph.node
            if n.domain != HW_DOMAIN and reaches_hw(n, upstream) and reaches_hw(n, downstream)]


def check_conversion(model) -> None:
    """Raise ToolchainError naming the nodes ``unmapped_after_conversion`` finds, with the reason for each."""
    bad = unmapped_after_conversion(model)
    if bad:
        noun = "node" if len(bad) == 1 else "nodes"
        raise ToolchainError(f"FINN did not map {len(bad)} {noun} to HW layers (after step_convert_to_hw): "
                             f"{_listing(bad, model)}")


def describe_failure(exc: BaseException, step: str) -> str:
    """One line for an exception raised inside FINN step ``step``: the node FINN was working on (a ``self.onnx_node``
    or ``node`` in the failing frames, innermost first), the exception, and for a bare assertion its source line."""
    frames = traceback.extract_tb(exc.__traceback__)
    node = None
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        candidate = getattr(frame.f_locals.get("self"), "onnx_node", None) or frame.f_locals.get("node")
        if getattr(candidate, "op_type", None) and getattr(candidate, "name", None) is not None:
            node = candidate
            break
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if frames and not text:
        last = frames[-1]
        source = (linecache.getline(last.filename, last.lineno) or last.line or "").strip()
        where = "/".join(last.filename.split("/")[-2:])
        what += f" at {where}:{last.lineno}" + (f" ({source})" if source else "")
    at = f" at {node.name or '(unnamed)'} ({node.op_type})" if node is not None else ""
    return f"{step}{at}: {what}"
