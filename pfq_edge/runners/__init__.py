"""Running models, in one place: every engine a compile executes besides torch training.

    onnx.py     qonnx execution of QONNX models; onnxruntime sessions (QCDQ) at an optimization level, and the
                check of which level computes the model
    latency.py  fresh-process execution and the latency harness for TVM libraries, onnxruntime and torch.export
                archives (``python -m pfq_edge.runners.latency``)

Torch models themselves run through ``pfq_edge.train.predict``. Nothing here writes an artefact (export/ does).
"""
