"""QONNX export of a Brevitas model and qonnx clean-up; Brevitas' exporter fallback shared with QCDQ.

The exported model runs with ``pfq_edge.runners.onnx.run_qonnx``."""

from __future__ import annotations

from pathlib import Path

import torch

from pfq_edge.errors import ToolchainError, first_line


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
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {first_line(exc, 160)}")
    raise ToolchainError(f"{fmt} export failed: " + "; ".join(errors))
