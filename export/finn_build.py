"""Files for FINN: the QONNX model with FINN's integer pixel input, the FINN build configuration that continues
this estimate where Vivado exists, and the copy of FINN's estimate reports into the output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PIXEL_INPUT = "pixels"
FINN_BUILD_OUTPUTS = ("estimate_reports", "stitched_ip", "bitfile", "pynq_driver", "deployment_package")
RUN_TO_RUN = ("time_per_step.json", "build.log")  # wall times and timestamps: kept beside the package, not in it


def write_finn_input_model(qonnx_path: Path, out_path: Path, input_bits: int) -> Path:
    """Copy of the QONNX model whose input is integer pixels (UINT<input_bits>), scaled by a leading Mul.

    FINN needs an integer network input; our models take pixels / (2^bits − 1), so the Mul restores that scale
    and FINN's streamlining absorbs it into the first thresholds.
    """
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper

    model = ModelWrapper(str(qonnx_path))
    relu_before_quant(model)
    quant_before_flatten(model)
    unsigned_quant_after_relu(model)
    graph = model.graph
    old = graph.input[0]
    shape = [d.dim_value for d in old.type.tensor_type.shape.dim]
    graph.initializer.append(helper.make_tensor("pixel_scale", TensorProto.FLOAT, [], [1.0 / (2 ** input_bits - 1)]))
    graph.node.insert(0, helper.make_node("Mul", [PIXEL_INPUT, "pixel_scale"], [old.name], name="Mul_pixel_scale"))
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info(PIXEL_INPUT, TensorProto.FLOAT, shape))
    graph.value_info.append(helper.make_tensor_value_info(old.name, TensorProto.FLOAT, shape))
    model.set_tensor_datatype(PIXEL_INPUT, DataType[f"UINT{input_bits}"])
    model.save(str(out_path))
    return out_path


def _swap_into_order(model, first, second) -> None:
    """``first`` (x → a) feeds only ``second`` (a → y): make it ``second`` (x → t) → ``first`` (t → y)."""
    between = f"{second.name}_before_{first.name}"
    second.input[0], second.output[0], first.input[0], first.output[0] = (
        first.input[0], between, between, second.output[0])


def _sorted(model, changed: int) -> int:
    if changed:
        from qonnx.transformation.general import SortGraph

        model.graph.CopyFrom(model.transform(SortGraph()).graph)
    return changed


def _scalar_quant(model, node) -> bool:
    return node is not None and node.op_type == "Quant" and all(
        model.get_initializer(i) is not None and model.get_initializer(i).size == 1 for i in node.input[1:4])


def relu_before_quant(model) -> int:
    """In a qonnx ModelWrapper, turn each Quant (zero point 0) → Relu into Relu → Quant, where the Relu is the
    Quant's only reader — the same function: the quantizer is monotone with q(0) = 0, so max(q(x), 0) = q(max(x, 0)).
    Returns how many.

    Why: a functional ``torch.relu`` after a residual add is quantized by Brevitas as add → Quant → Relu; FINN fuses
    only Relu → Quant into thresholds, and its streamlining then moves the stranded scale Mul and a Transpose past
    each other forever (MoveScalarLinearPastInvariants / MoveTransposePastEltwise)."""
    changed = 0
    for relu in list(model.graph.node):
        quant = model.find_producer(relu.input[0]) if relu.op_type == "Relu" else None
        zero = model.get_initializer(quant.input[2]) if quant is not None and quant.op_type == "Quant" else None
        if zero is None or len(model.find_consumers(quant.output[0])) != 1 or float(abs(zero).max()) != 0.0:
            continue
        _swap_into_order(model, quant, relu)
        changed += 1
    return _sorted(model, changed)


def quant_before_flatten(model) -> int:
    """Turn each Flatten → per-tensor Quant into Quant → Flatten, where the Quant is the Flatten's only reader (an
    element-wise map with scalar parameters commutes with a reshape). Returns how many.

    Why: Brevitas requantizes a classifier's input after ``torch.flatten`` of a re-quantized tensor; FINN then meets
    Transpose → Flatten → MultiThreshold → MatMul and cannot fold the NHWC→NCHW transpose into the MatMul's weights
    (unmapped "Transpose_0, Flatten_0")."""
    changed = 0
    for flatten in list(model.graph.node):
        readers = model.find_consumers(flatten.output[0]) if flatten.op_type == "Flatten" else None
        if not readers or len(readers) != 1 or not _scalar_quant(model, readers[0]):
            continue
        _swap_into_order(model, flatten, readers[0])
        changed += 1
    return _sorted(model, changed)


def unsigned_quant_after_relu(model) -> int:
    """In a qonnx ModelWrapper, make each signed, non-narrow b-bit Quant (b ≥ 3) whose input is a Relu's output an
    unsigned (b−1)-bit Quant with the same scale and zero point — the same function: the Relu leaves only the
    non-negative half of the signed range, [0, 2^(b−1) − 1], which is the unsigned (b−1)-bit range. Returns how many.

    Why: Brevitas gives both inputs of an add (or concat) one shared signed quantizer, so a branch that comes out of a
    ReLU meets Relu → signed Quant, which FINN's QONNX conversion refuses ("FINN only supports unsigned and
    non-narrow Quant nodes for Relu activations"). The scale stays the one both branches share."""
    import numpy as np

    changed = 0
    for node in model.graph.node:
        if node.op_type != "Quant":
            continue
        attrs = {a.name: a for a in node.attribute}
        src = model.find_producer(node.input[0])
        bits = model.get_initializer(node.input[3])
        if (src is None or src.op_type != "Relu" or attrs["signed"].i != 1 or attrs["narrow"].i != 0
                or bits is None or float(bits) < 3):
            continue
        name = f"{node.name}_unsigned_bit_width"
        model.set_initializer(name, np.asarray(float(bits) - 1, dtype=np.float32))
        node.input[3] = name
        attrs["signed"].i = 0
        changed += 1
    return changed


def write_finn_reports(report_dir: Path, build_log: Path, folder: Path) -> tuple[list[Path], list[Path]]:
    """Copy FINN's estimate reports (``report_dir``) and its ``build_log`` into ``folder``. Returns (files for the
    package, files kept beside it: RUN_TO_RUN)."""
    shutil.copytree(report_dir, folder)
    shutil.copy(build_log, folder / "build.log")
    files = sorted(folder.iterdir())
    return [f for f in files if f.name not in RUN_TO_RUN], [f for f in files if f.name in RUN_TO_RUN]


def write_finn_build_config(qonnx_path: Path, fpga, input_bits: int, folding: dict, folder: Path,
                            clip_thresholds: bool = False, branchy: bool = False) -> list[Path]:
    """A FINN build to continue where Vivado exists: ``folder``/model.onnx (the QONNX model with its integer pixel
    input), folding_config.json (the folding this estimate chose, so the bitfile matches it) and
    dataflow_build_config.json (FINN's own DataflowBuildConfig: board, part, clock, every output up to the PYNQ
    deployment package; paths relative to the folder). Run ``finn build dataflow_build_config.json model.onnx`` in
    it. Returns the three paths. Needs FINN imported for its config class (inside ``finn_session``).
    ``clip_thresholds`` / ``branchy``: the build lists FINN's default steps with finn_steps.py's threshold clipping
    after ``step_streamline`` / its branchy streamlining in place of it (finn_steps.py copied into the folder; run
    with ``PYTHONPATH=.``), as the estimate ran."""
    from finn.builder.build_dataflow_config import (DataflowBuildConfig, DataflowOutputType, ShellFlowType,
                                                    default_build_dataflow_steps)

    folder.mkdir(parents=True, exist_ok=True)
    model = write_finn_input_model(qonnx_path, folder / "model.onnx", input_bits)
    (folder / "folding_config.json").write_text(json.dumps(folding, indent=2, sort_keys=True) + "\n")
    cfg = DataflowBuildConfig(output_dir="output", model_path=Path("model.onnx"),
                              synth_clk_period_ns=1000.0 / fpga.clock_mhz, board=fpga.board, fpga_part=fpga.part,
                              shell_flow_type=ShellFlowType.VIVADO_ZYNQ,
                              folding_config_file=Path("folding_config.json"),
                              generate_outputs=[DataflowOutputType(x) for x in FINN_BUILD_OUTPUTS])
    doc = json.loads(cfg.to_json())
    files = [model, folder / "folding_config.json", folder / "dataflow_build_config.json"]
    if clip_thresholds or branchy:
        steps = list(default_build_dataflow_steps)
        if clip_thresholds:
            steps.insert(steps.index("step_streamline") + 1, "finn_steps.step_pfq_clip_thresholds")
        if branchy:
            steps[steps.index("step_streamline")] = "finn_steps.step_pfq_streamline_branchy"
        doc["steps"] = steps
        shutil.copy(Path(__file__).parent / "device" / "finn_steps.py", folder / "finn_steps.py")
        files.append(folder / "finn_steps.py")
    (folder / "dataflow_build_config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return files
