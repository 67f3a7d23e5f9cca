"""A FINN build step pfq-edge adds after ``step_streamline`` for models that normalise their input (mean/std
inside the model): the absorbed normalisation gives the first thresholds values below 0 on an unsigned pixel
input, which FINN's Thresholding layer refuses. FINN's own ``RoundAndClipThresholds`` rounds them up and clips them
to the input range, an exact change on integer inputs (x ≥ t ⇔ x ≥ ceil(t), and every pixel ≥ 0 passes t < 0).

pfq-edge runs it in its estimate; ``finn_build/`` ships this file so that FINN's builder finds the step by its
dotted name (run ``PYTHONPATH=. finn build …`` in that folder).
"""

import contextlib


def step_pfq_clip_thresholds(model, cfg):
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.transformation.infer_datatypes import InferDataTypes

    return model.transform(RoundAndClipThresholds()).transform(InferDataTypes())


def step_pfq_streamline_branchy(model, cfg):
    """FINN's streamlining for graphs with forks and joins (a residual add, a concat, a tensor read twice) and global
    average pooling, in place of ``step_streamline``: finn-plus' own ResNet step (MoveMulPastAdd, StreamlinePlus,
    conv lowering, thresholds absorbing the adds and transposes), then the global average pool as FINN's
    GlobalAccPool with its 1/(H·W) absorbed into the next thresholds, and the transposes the forks leave paired."""
    from finn.builder.custom_step_library.resnet import step_resnet_streamline
    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import InferGlobalAccPoolLayer
    from finn.transformation.streamline.absorb import (AbsorbConsecutiveTransposes, AbsorbMulIntoMultiThreshold,
                                                       AbsorbTransposeIntoFlatten, AbsorbTransposeIntoMultiThreshold)
    from finn.transformation.streamline.reorder import MakeMaxPoolNHWC
    from finn.transformation.streamline.streamline_plus import StreamlinePlus
    from qonnx.transformation.general import RemoveUnusedTensors
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes

    with _thresholds_rounded_in_one_pass(), _composed_cleanup_only_after_changes(), _shapes_inferred_without_weights():
        model = step_resnet_streamline(model, cfg)
        if model.get_nodes_by_op_type("GlobalAveragePool"):
            model = model.transform(InferGlobalAccPoolLayer()).transform(InferDataTypes())
            model = model.transform(AbsorbMulIntoMultiThreshold()).transform(StreamlinePlus())
    # as FINN's own step_streamline does for max pooling, then the transposes left before a flatten
    for t in (MakeMaxPoolNHWC(), AbsorbTransposeIntoMultiThreshold(), MakeMaxPoolNHWC(),
              AbsorbConsecutiveTransposes(), InferDataLayouts(), AbsorbTransposeIntoFlatten()):
        model = model.transform(t)
    return model.transform(InferDataLayouts()).transform(RemoveUnusedTensors())


def _round_integer_thresholds(model) -> bool:
    """Round every MultiThreshold's thresholds on an integer input up and clip them to the input range — the
    formula of FINN's RoundAndClipThresholds for that case, applied to all nodes at once. Returns whether any
    changed."""
    import numpy as np

    changed = False
    for node in model.graph.node:
        if node.op_type != "MultiThreshold":
            continue
        thresholds = model.get_initializer(node.input[1])
        dtype = model.get_tensor_datatype(node.input[0])
        if thresholds is None or not dtype.is_integer():
            continue
        new = np.clip(np.ceil(thresholds), dtype.min(), dtype.max() + 1).astype(np.float32)
        if np.any(new != thresholds):
            model.set_initializer(node.input[1], new)
            changed = True
    return changed


@contextlib.contextmanager
def _thresholds_rounded_in_one_pass():
    """Inside the block, FINN's RoundAndClipThresholds first rounds all MultiThresholds at once.

    Why: FINN's own apply stops after the first node whose thresholds change and reports the graph changed, so
    StreamlinePlus re-runs its whole exhaustive streamlining once per threshold node (EfficientNet-Lite0: hundreds of
    rounds, > 20 minutes). With every threshold rounded first, FINN's apply finds nothing left to round, sets the
    threshold data types of all nodes in one pass, and the change is still reported, so streamlining runs once more
    as it would have. A threshold's rounding depends only on its own input's data type, which no other node's
    rounding changes, so the result is the same."""
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds

    original = RoundAndClipThresholds.apply

    def apply(transformation, model):
        changed = _round_integer_thresholds(model)
        model, modified = original(transformation, model)
        return model, modified or changed

    RoundAndClipThresholds.apply = apply
    try:
        yield
    finally:
        RoundAndClipThresholds.apply = original


@contextlib.contextmanager
def _composed_cleanup_only_after_changes():
    """Inside the block, qonnx's ComposedTransformation (the loop of FINN's StreamlinePlus) skips its clean-up after
    a member transformation that left the graph exactly as the last such clean-up returned it.

    Why: after every one of its (45) member transformations, ComposedTransformation cleans the graph up — qonnx's
    cleanup, RemoveIdentityOps, GiveUniqueNodeNames, GiveReadableTensorNames, InferShapes, InferDataTypes, each as a
    ``model.transform`` that deep-copies the model and runs the cleanup again — whether or not the member changed
    anything. Those clean-ups are linear scans per tensor (quadratic per graph): on EfficientNet-Lite0 about 0.5–3 s
    each, most of the 20+ minutes streamlining took, while nearly all members change nothing in a round. The clean-up
    is deterministic and idempotent (a cleaned graph cleans up to itself), so when a member's output is byte-for-byte
    the graph the last clean-up produced (protobuf equality), skipping the clean-up returns what FINN's own would.
    Anything else is cleaned up exactly as FINN does. The loop below is qonnx 1.0.0's ComposedTransformation.apply
    with that one test added; with another qonnx version, qonnx's own runs."""
    import copy
    from importlib.metadata import version

    if version("qonnx") != "1.0.0":
        yield
        return

    from qonnx.transformation import composed
    from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.transformation.remove import RemoveIdentityOps

    original = composed.ComposedTransformation.apply
    last_clean = [None]  # the ModelProto the last clean-up returned (shared by nested compositions: same clean-up)

    def apply(self, model):
        graph_modified = False
        for transformation in self.transformations:
            model = copy.deepcopy(model)
            while True:
                model, modified = transformation.apply(model)
                graph_modified = graph_modified or modified
                if not modified:
                    break
            if last_clean[0] is not None and model.model == last_clean[0]:
                continue  # the clean-up would give this same graph back
            model.cleanup()
            model = model.transform(RemoveIdentityOps())
            model = model.transform(GiveUniqueNodeNames())
            model = model.transform(GiveReadableTensorNames())
            model = model.transform(InferShapes())
            model = model.transform(InferDataTypes())
            last_clean[0] = copy.deepcopy(model.model)
        return model, graph_modified

    composed.ComposedTransformation.apply = apply
    try:
        yield
    finally:
        composed.ComposedTransformation.apply = original


_LARGE_INITIALIZER_BYTES = 1 << 16  # smaller ones cost nothing to keep
# ops whose ONNX shape inference reads its inputs' types and shapes, never their values
_SHAPE_FROM_TYPES_ONLY = frozenset({"MatMul", "Conv", "Gemm", "Add", "Sub", "Mul", "Div"})


@contextlib.contextmanager
def _shapes_inferred_without_weights():
    """Inside the block, qonnx's InferShapes runs ONNX's shape inference on a copy of the model whose large
    initializers carry their type and dims but not their values, and puts the inferred value_info on the model.

    Why: LowerConvsToMatMul turns every depthwise convolution into a dense (k·k·C, C) matrix, mostly zeros, which
    FINN's VVAU conversion compacts again later: EfficientNet-Lite0's graph grows from 15 MB to 637 MB. ONNX's
    ``infer_shapes`` serialises the model, parses it in C++ and serialises and parses it back, 2–5 s per call at that
    size, and FINN's streamlining calls InferShapes after nearly every pass. Shape inference reads an initializer's
    type and dims; its values only for shape-like inputs (Reshape's shape, Pad's pads...): only initializers read
    by nothing but MatMul, Conv, Gemm and the element-wise arithmetic lose their values (FINN's custom ops are hidden
    behind standard ones that do not read their parameters). Guard: ONNX's inference must have changed nothing but
    value_info on the copy, else the model goes through ``infer_shapes`` whole. The model is updated in place,
    as qonnx's InferShapes already does to its input (it hides FINN's custom ops in it) before replacing it with the
    result."""
    import copy

    import onnx
    from qonnx.transformation import infer_shapes as qonnx_infer_shapes

    onnx_si = qonnx_infer_shapes.si

    def shell_of(proto, skip, fill):
        """A new message of ``proto``'s type with its fields, except ``skip``, copied; ``fill(shell)`` adds it."""
        shell = type(proto)()
        for field, value in proto.ListFields():
            if field.name == skip:
                continue
            if field.label == field.LABEL_REPEATED:
                getattr(shell, field.name).extend(value)
            elif field.type == field.TYPE_MESSAGE:
                getattr(shell, field.name).CopyFrom(value)
            else:
                setattr(shell, field.name, value)
        fill(shell)
        return shell

    def without_value_info(model):
        m = copy.deepcopy(model)
        m.graph.ClearField("value_info")
        return m

    class _ShapeInference:  # the one function qonnx's InferShapes calls, through its module's ``si``
        @staticmethod
        def infer_shapes(model, *args, **kwargs):
            value_blind = {t.name for t in model.graph.initializer}
            for node in model.graph.node:
                if node.op_type not in _SHAPE_FROM_TYPES_ONLY:
                    value_blind.difference_update(node.input)

            def initializers(graph):
                for t in model.graph.initializer:
                    if t.name in value_blind and t.ByteSize() > _LARGE_INITIALIZER_BYTES:
                        graph.initializer.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
                    else:
                        graph.initializer.append(t)

            light = shell_of(model, "graph", lambda m: m.graph.CopyFrom(shell_of(model.graph, "initializer",
                                                                                    initializers)))
            inferred = onnx_si.infer_shapes(light, *args, **kwargs)
            if without_value_info(inferred) != without_value_info(light):
                return onnx_si.infer_shapes(model, *args, **kwargs)
            model.graph.ClearField("value_info")
            model.graph.value_info.extend(inferred.graph.value_info)
            return model

    qonnx_infer_shapes.si = _ShapeInference
    try:
        yield
    finally:
        qonnx_infer_shapes.si = onnx_si
