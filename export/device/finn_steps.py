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

    with _thresholds_rounded_in_one_pass():
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
