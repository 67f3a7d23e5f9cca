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
