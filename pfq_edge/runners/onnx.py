"""Execution of exported ONNX models: QONNX with qonnx (node by node), QCDQ with onnxruntime.

Both take images (N, C, H, W) float32 and return the model's outputs (N, ...); both raise ToolchainError with one
line when a model cannot be loaded or run.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np

from pfq_edge.errors import ToolchainError, one_line
from pfq_edge.io import redirect_fd

ORT_LEVELS = {"off": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


@contextlib.contextmanager
def _native_stderr_captured():
    """onnxruntime's C++ log of a failing node goes to file descriptor 2: catch it for the call (the failure is
    reported once, in our error) and restore the descriptor — onnxruntime's global logger level stays as it is."""
    with tempfile.TemporaryFile() as sink, redirect_fd(2, sink.fileno()):
        yield


def run_qonnx(path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Execute the QONNX model at ``path`` with qonnx on ``images`` (N, C, H, W) float32; returns outputs (N, ...).

    Raises ToolchainError (one line: the failing node and qonnx/onnxruntime's reason) if a node cannot execute.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.util.cleanup import cleanup_model

    base = ModelWrapper(str(path))
    in_name, out_name = base.graph.input[0].name, base.graph.output[0].name
    outs, models = [], {}
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        if len(chunk) not in models:
            models[len(chunk)] = cleanup_model(ModelWrapper(str(path)).transform(ChangeBatchSize(len(chunk))))
        try:
            with _native_stderr_captured():
                outs.append(execute_onnx(models[len(chunk)], {in_name: chunk})[out_name])
        except Exception as exc:
            raise ToolchainError(f"qonnx cannot execute the exported model {Path(path).name}: {one_line(exc)}") \
                from None
    return np.concatenate(outs)


def ort_session(path: Path, level: str = "all", threads: int = 0):
    """An onnxruntime CPU session for ``path`` at graph-optimization ``level`` (off | basic | extended | all)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(path: Path, images: np.ndarray, level: str = "off", threads: int = 0) -> np.ndarray:
    """Run the ONNX model at ``path`` with onnxruntime (CPU) on ``images`` (N, C, H, W) float32, in chunks of the
    model's static batch; returns outputs (N, ...).

    ``level`` "off" runs the graph as written: the reference semantics of the QCDQ model. "all" is onnxruntime's
    default, what a deployment runs; its QDQ fusions (integer kernels) are not bit-exact, so the compile measures
    them (``onnxruntime_levels``). Raises ToolchainError (one line) if onnxruntime cannot load or run the model.
    """
    try:
        session = ort_session(path, level, threads)
        meta = session.get_inputs()[0]
        batch = meta.shape[0] if isinstance(meta.shape[0], int) else len(images)
        if len(images) % batch:
            raise ToolchainError(f"{len(images)} images are not a multiple of the model's batch {batch}")
        return np.concatenate([session.run(None, {meta.name: images[i:i + batch]})[0]
                               for i in range(0, len(images), batch)])
    except ToolchainError:
        raise
    except Exception as exc:
        raise ToolchainError(f"onnxruntime cannot run {Path(path).name}: {one_line(exc)}") from None


def onnxruntime_levels(path: Path, images, reference, exact=None) -> tuple[dict, str]:
    """onnxruntime at level "all" (what a deployment runs) and "basic" (the last before QDQ fusion) on ``images``
    (N, C, H, W) float32, each checked against ``reference``, the logits (N, classes) of the graph as written (level
    off), with the golden table's "onnxruntime level" tolerance (recorded, never raised). Returns ({level:
    GoldenResult.as_dict()}, the first level that passed, else "off").

    From level extended on, onnxruntime fuses Q/DQ into integer kernels that requantize exact int32 sums, where the
    graph as written rounds float32 sums: activations on a rounding boundary land one step apart, so most images
    move a little (counted, not bounded). What a level must not do is change the classification: ≥ 99% top-1
    agreement, which caught onnxruntime 1.25.1 dropping run-time biases (16.8%). ``exact``: the float64 arbiter
    (pfq_edge.golden.check), asked where the float32 comparison fails.
    """
    from pfq_edge.golden import check

    levels = {level: check("onnxruntime level", f"onnxruntime, optimization level {level}, vs the QCDQ graph",
                           reference, run_onnxruntime(path, images, level=level), exact=exact).as_dict()
              for level in ("all", "basic")}
    return levels, next((k for k, v in levels.items() if v["passed"]), "off")
