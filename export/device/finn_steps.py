"""A FINN build step pfq-edge adds after ``step_streamline`` for models that normalise their input (mean/std
inside the model): the absorbed normalisation gives the first thresholds values below 0 on an unsigned pixel
input, which FINN's Thresholding layer refuses. FINN's own ``RoundAndClipThresholds`` rounds them up and clips them
to the input range, an exact change on integer inputs (x ≥ t ⇔ x ≥ ceil(t), and every pixel ≥ 0 passes t < 0).

pfq-edge runs it in its estimate; ``finn_build/`` ships this file so that FINN's builder finds the step by its
dotted name (run ``PYTHONPATH=. finn build …`` in that folder).
"""


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

    model = step_resnet_streamline(model, cfg)
    if model.get_nodes_by_op_type("GlobalAveragePool"):
        model = model.transform(InferGlobalAccPoolLayer()).transform(InferDataTypes())
        model = model.transform(AbsorbMulIntoMultiThreshold()).transform(StreamlinePlus())
    # as FINN's own step_streamline does for max pooling, then the transposes left before a flatten
    for t in (MakeMaxPoolNHWC(), AbsorbTransposeIntoMultiThreshold(), MakeMaxPoolNHWC(),
              AbsorbConsecutiveTransposes(), InferDataLayouts(), AbsorbTransposeIntoFlatten()):
        model = model.transform(t)
    return model.transform(InferDataLayouts()).transform(RemoveUnusedTensors())
