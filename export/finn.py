"""FINN (finn-plus) estimate-only dataflow build of a QONNX model: per-layer cycles and LUT/BRAM/URAM/DSP,
network latency and throughput. No Vivado is needed or called.

FINN assumes a FINN CLI session and a Vivado install; three things are set up in-process instead (toolchain.md):
its global settings (FINN_BUILD_DIR inside our build folder), the Vivado simulator probe (``finn.xsi.SimEngine``
set to None before the builder is imported) and ``get_vivado_root`` (asked for build metadata at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pfq_edge.errors import ToolchainError
from pfq_edge.progress import progress_bar

RESOURCES = ("LUT", "BRAM_18K", "URAM", "DSP")
PIXEL_INPUT = "pixels"


@dataclass
class FinnEstimate:
    """FINN's estimates: ``layers`` rows {layer, cycles, LUT, BRAM_18K, URAM, DSP}, ``totals`` per resource,
    ``latency_us`` (critical path at the clock), ``throughput_fps`` (1 / slowest layer), ``folding`` (PE/SIMD)."""

    part: str
    clock_mhz: float
    layers: list[dict]
    totals: dict
    critical_path_cycles: int
    max_cycles: int
    bottleneck: str
    latency_us: float
    throughput_fps: float
    folding: dict = field(default_factory=dict)
    report_dir: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _finn_builder(build_dir: Path):
    """Import FINN's builder with its settings pointed at ``build_dir`` and its Vivado probes disabled."""
    os.environ["FINN_BUILD_DIR"] = str(build_dir / "finn_tmp")
    os.environ["FINN_SETTINGS"] = str(build_dir / "finn_settings.yaml")  # absent: FINN falls back to defaults
    (build_dir / "finn_tmp").mkdir(parents=True, exist_ok=True)
    import finn.util.settings as finn_settings
    import finn.xsi

    finn_settings.initialize_dummy_settings()
    finn.xsi.SimEngine = None
    import finn.builder.build_dataflow as build_dataflow
    import finn.builder.build_dataflow_config as config

    build_dataflow.get_vivado_root = lambda: "none"  # only used for metadata; no Vivado here
    return build_dataflow, config


def prepare_for_finn(qonnx_path: Path, out_path: Path, input_bits: int) -> Path:
    """Copy of the QONNX model whose input is integer pixels (UINT<input_bits>), scaled by a leading Mul.

    FINN needs an integer network input; our models take pixels / (2^bits − 1), so the Mul restores that scale
    and FINN's streamlining absorbs it into the first thresholds.
    """
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper

    model = ModelWrapper(str(qonnx_path))
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


def finn_estimate(qonnx_path: Path, fpga, input_bits: int, build_dir: Path) -> FinnEstimate:
    """Run FINN's estimate-only dataflow build on ``qonnx_path`` for ``fpga`` (FpgaSpec: part, clock, target fps
    or folding file). Reports land in ``build_dir/finn/report``; FINN's log in ``build_dir/finn/build.log``.

    Raises ToolchainError with FINN's error if the build fails (e.g. a layer FINN cannot map).
    """
    build_dir = Path(build_dir).resolve()
    out_dir = build_dir / "finn"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = prepare_for_finn(qonnx_path, build_dir / "model_finn_input.onnx", input_bits)
    log_path = out_dir / "build.log"
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        build_dataflow, config = _finn_builder(build_dir)
        from finn.builder import build_dataflow_steps as steps_lib

        names = list(config.estimate_only_dataflow_steps)
        with progress_bar("FINN estimate build", total=len(names)) as advance:
            cfg = config.DataflowBuildConfig(
                output_dir=str(out_dir),
                synth_clk_period_ns=1000.0 / fpga.clock_mhz,
                fpga_part=fpga.part,
                target_fps=fpga.target_fps,
                folding_config_file=Path(fpga.folding_file).resolve() if fpga.folding_file else None,
                steps=[_with_progress(getattr(steps_lib, n), advance) for n in names],
                generate_outputs=[config.DataflowOutputType.ESTIMATE_REPORTS],
                save_intermediate_models=True,
            )
            try:
                rc = build_dataflow.build_dataflow_cfg(str(model_path), cfg)
            except Exception as exc:  # FINN re-raises under pytest; otherwise it returns -1 (handled below)
                raise ToolchainError(f"FINN estimate build failed: {str(exc).strip().splitlines()[0][:200]}") from None
    if rc != 0:
        kept = _keep_log(log_path)
        raise ToolchainError(f"FINN estimate build failed: {finn_error(log_path)} (FINN's log: {kept})")
    return read_estimates(out_dir / "report", fpga)


def _with_progress(step, advance):
    def run(model, cfg):
        result = step(model, cfg)
        advance(1)
        return result

    run.__name__ = step.__name__
    return run


def finn_error(log_path: Path) -> str:
    """FINN's own error message from its build log, on one line (the exception after its rich traceback)."""
    lines = log_path.read_text(errors="replace").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", lines[i]):
            tail = [ln.strip() for ln in lines[i:] if ln.strip() and not ln.startswith("[")]
            return " ".join(tail)[:300]
    errors = [ln.split("ERROR", 1)[1].strip() for ln in lines if "ERROR" in ln]
    return errors[-1][:300] if errors else "no error message in the log"


def _keep_log(log_path: Path) -> Path:
    """Copy the build log out of the staging folder, which is removed when the compile fails."""
    fd, kept = tempfile.mkstemp(prefix="pfq-edge-finn-", suffix=".log")
    with os.fdopen(fd, "wb") as f:
        f.write(log_path.read_bytes())
    return Path(kept)


def read_estimates(report_dir: Path, fpga) -> FinnEstimate:
    """Parse FINN's estimate reports in ``report_dir`` into a FinnEstimate for the profile's clock."""
    cycles = json.loads((report_dir / "estimate_layer_cycles.json").read_text())
    resources = json.loads((report_dir / "estimate_layer_resources.json").read_text())
    perf = json.loads((report_dir / "estimate_network_performance.json").read_text())
    folding_path = report_dir / "auto_folding_config.json"
    folding = json.loads(folding_path.read_text()) if folding_path.exists() else {}
    layers = [{"layer": name, "cycles": int(cycles.get(name, 0)), **{r: float(res.get(r, 0)) for r in RESOURCES}}
              for name, res in resources.items() if name != "total"]
    totals = {r: float(resources.get("total", {}).get(r, sum(row[r] for row in layers))) for r in RESOURCES}
    period_us = 1.0 / fpga.clock_mhz
    return FinnEstimate(
        part=fpga.part, clock_mhz=fpga.clock_mhz, layers=layers, totals=totals,
        critical_path_cycles=int(perf["critical_path_cycles"]), max_cycles=int(perf["max_cycles"]),
        bottleneck=str(perf.get("max_cycles_node_name", "")),
        latency_us=perf["critical_path_cycles"] * period_us,
        throughput_fps=1e6 / (perf["max_cycles"] * period_us),
        folding=folding, report_dir=str(report_dir),
    )


FINN_BUILD_OUTPUTS = ("estimate_reports", "stitched_ip", "bitfile", "pynq_driver", "deployment_package")


def write_finn_build_config(qonnx_path: Path, fpga, input_bits: int, folding: dict, folder: Path) -> list[Path]:
    """A FINN build to continue where Vivado exists: ``folder``/model.onnx (the QONNX model with its integer pixel
    input), folding_config.json (the folding this estimate chose, so the bitfile matches it) and
    dataflow_build_config.json (FINN's own DataflowBuildConfig: board, part, clock, every output up to the PYNQ
    deployment package; paths relative to the folder). Run ``finn build dataflow_build_config.json model.onnx`` in
    it. Returns the three paths."""
    from finn.builder.build_dataflow_config import DataflowBuildConfig, DataflowOutputType, ShellFlowType

    folder.mkdir(parents=True, exist_ok=True)
    model = prepare_for_finn(qonnx_path, folder / "model.onnx", input_bits)
    (folder / "folding_config.json").write_text(json.dumps(folding, indent=2, sort_keys=True) + "\n")
    cfg = DataflowBuildConfig(output_dir="output", model_path=Path("model.onnx"),
                              synth_clk_period_ns=1000.0 / fpga.clock_mhz, board=fpga.board, fpga_part=fpga.part,
                              shell_flow_type=ShellFlowType.VIVADO_ZYNQ,
                              folding_config_file=Path("folding_config.json"),
                              generate_outputs=[DataflowOutputType(x) for x in FINN_BUILD_OUTPUTS])
    doc = json.loads(cfg.to_json())
    (folder / "dataflow_build_config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return [model, folder / "folding_config.json", folder / "dataflow_build_config.json"]
