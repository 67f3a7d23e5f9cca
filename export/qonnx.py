"""QONNX export of a Brevitas model, qonnx clean-up, and the golden check of QONNX execution against Brevitas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pfq_edge.errors import ToolchainError


def export_qonnx(qmodel: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``qmodel`` for inputs shaped like ``example`` (1, C, H, W) to QONNX at ``path`` and clean it with qonnx.

    Tries Brevitas' TorchScript exporter first (original weight names, smaller files), then the dynamo one.
    Raises ToolchainError with both exporters' first error lines if neither works.
    """
    from brevitas.export import export_qonnx as brevitas_export
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    path = Path(path)
    export_with_fallback(brevitas_export, "QONNX", qmodel, example, path)
    model = cleanup_model(ModelWrapper(str(path)))
    model.save(str(path))
    return path


def export_with_fallback(exporter, fmt: str, qmodel: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Run a Brevitas exporter (``export_qonnx`` / ``export_onnx_qcdq``) with its TorchScript backend, then dynamo.

    Raises ToolchainError naming ``fmt`` with both backends' first error lines if neither works.
    """
    errors = []
    qmodel.eval()
    for dynamo in (False, True):
        try:
            with torch.no_grad():
                exporter(qmodel, input_t=example, export_path=str(path), dynamo=dynamo)
            return
        except Exception as exc:  # brevitas/torch.onnx raise many types; we report and fall back
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {str(exc).strip().splitlines()[0][:160]}")
    raise ToolchainError(f"{fmt} export failed: " + "; ".join(errors))


def run_qonnx(path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Execute the QONNX model at ``path`` with qonnx on ``images`` (N, C, H, W) float32; returns outputs (N, ...).

    Raises ToolchainError (one line: the failing node and qonnx/onnxruntime's reason) if a node cannot execute.
    """
    import onnxruntime
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.util.cleanup import cleanup_model

    onnxruntime.set_default_logger_severity(4)  # a failing node is reported once, in our error, not in ORT's log
    base = ModelWrapper(str(path))
    in_name, out_name = base.graph.input[0].name, base.graph.output[0].name
    outs, models = [], {}
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        if len(chunk) not in models:
            models[len(chunk)] = cleanup_model(ModelWrapper(str(path)).transform(ChangeBatchSize(len(chunk))))
        try:
            outs.append(execute_onnx(models[len(chunk)], {in_name: chunk})[out_name])
        except Exception as exc:
            import re

            text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))  # onnxruntime colours its log
            raise ToolchainError(f"qonnx cannot execute the exported model {path.name}: {text[:240]}") from None
    return np.concatenate(outs)
