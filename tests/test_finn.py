"""FINN (finn-plus) estimate-only build on a small real network, and our fit/budget checks."""

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import randomize_bn, tiny_dscnn
from pfq_edge.errors import ProfileError
from pfq_edge.targets.backends.finn.driver import finn_estimate
from pfq_edge.export.qonnx import export_qonnx
from pfq_edge.quantize import calibrate, quantize_model
from pfq_edge.targets.backends.finn.fit import board_capacity, fpga_verdicts
from pfq_edge.targets.profile import load_profile


def fpga_qonnx(model, images, path):
    """``model`` (its BN statistics randomized) quantized with the fpga profile, calibrated on ``images`` and
    exported to QONNX at ``path``; returns the path."""
    qm = quantize_model(randomize_bn(model), load_profile("fpga").quant)
    calibrate(qm, images)
    return export_qonnx(qm, images[:1], path)


@pytest.fixture(scope="module")
def estimate(tmp_path_factory, images):
    profile = load_profile("fpga")
    work = tmp_path_factory.mktemp("finn")
    path = fpga_qonnx(tiny_dscnn(), images, work / "m.onnx")
    return profile, finn_estimate(path, profile.fpga, profile.quant.input_bit_width, work / "build")


def test_estimate_reports_layers_resources_and_performance(estimate):
    profile, est = estimate
    kinds = {row["layer"].split("_")[0] for row in est.layers}
    assert {"MVAU", "VVAU"} <= kinds  # pointwise and depthwise convs mapped to FINN's compute units
    assert est.totals["LUT"] > 0 and est.critical_path_cycles >= est.max_cycles > 0
    assert est.latency_us == pytest.approx(est.critical_path_cycles / profile.fpga.clock_mhz)
    assert est.throughput_fps == pytest.approx(profile.fpga.clock_mhz * 1e6 / est.max_cycles)
    perf = json.loads(open(f"{est.report_dir}/estimate_network_performance.json").read())
    assert perf["critical_path_cycles"] == est.critical_path_cycles


def test_fit_and_budget_verdicts(estimate):
    profile, est = estimate
    v = fpga_verdicts(est, profile)
    assert v["fit"]["verdict"] == "fits" and v["latency"]["verdict"] == "meets"
    huge = dataclasses.replace(est, totals={**est.totals, "LUT": 60000.0}, latency_us=1e6)
    v = fpga_verdicts(huge, profile)
    assert v["fit"]["verdict"] == "does not fit" and v["fit"]["over"] == ["LUT"]
    assert v["latency"]["verdict"] == "misses"


def test_board_capacity_from_finn():
    assert board_capacity("Pynq-Z1")["LUT"] == 53200
    with pytest.raises(ProfileError, match="unknown FPGA board"):
        board_capacity("Nope-Board")


def test_folding_file_instead_of_target_fps(estimate, tmp_path, images):
    """A PE/SIMD folding file (here FINN's own auto folding) reproduces the same cycles."""
    profile, est = estimate
    folding = tmp_path / "folding.json"
    folding.write_text(json.dumps(est.folding))
    fpga = profile.fpga.model_copy(update={"target_fps": None, "folding_file": str(folding)})
    path = fpga_qonnx(tiny_dscnn(), images, tmp_path / "m.onnx")
    again = finn_estimate(path, fpga, profile.quant.input_bit_width, tmp_path / "build")
    assert again.max_cycles == est.max_cycles and again.critical_path_cycles == est.critical_path_cycles


def test_residual_add_after_relus_maps_to_finn(tmp_path, images):
    """A residual add after 4-bit ReLUs (once refused: "FINN only supports unsigned and non-narrow Quant nodes for
    Relu"): the FINN input model's exact rewrites and the branchy streamlining map it to DuplicateStreams and an
    element-wise add."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.pool, self.fc = nn.MaxPool2d(28), nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.bn0(self.stem(x)))
            y = torch.relu(self.bn1(self.conv(x)) + x)
            return self.fc(torch.flatten(self.pool(y), 1))

    profile = load_profile("fpga")
    torch.manual_seed(0)
    path = fpga_qonnx(Residual().eval(), images, tmp_path / "r.onnx")
    est = finn_estimate(path, profile.fpga, profile.quant.input_bit_width, tmp_path / "build")
    kinds = {row["layer"].rsplit("_", 2)[0] for row in est.layers}
    assert {"DuplicateStreams", "ElementwiseAdd", "MVAU"} <= kinds and est.throughput_fps > 0


def test_a_model_finn_cannot_map_is_refused_before_the_build_with_the_node_named(tmp_path, images):
    """A float LeakyReLU (Brevitas has no quantizer for it): FINN cannot map it; the pre-flight lint names the node
    and the reason, and FINN's build never starts."""
    from torch import nn

    from pfq_edge.errors import ToolchainError

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                          nn.MaxPool2d(28), nn.Flatten(), nn.Linear(8, 10)).eval()
    profile = load_profile("fpga")
    path = fpga_qonnx(model, images, tmp_path / "l.onnx")
    with pytest.raises(ToolchainError, match=r"FINN cannot map 1 node .*before the build.*LeakyRelu_0 "
                                             r"\(LeakyRelu\): a float activation"):
        finn_estimate(path, profile.fpga, profile.quant.input_bit_width, tmp_path / "build")
    assert not (tmp_path / "build" / "finn" / "build.log").exists()


def test_a_node_left_unmapped_by_finns_conversion_is_named_with_its_reason(tmp_path, images):
    """nn.Upsample between two convs: FINN's streamlining leaves the Resize between layout transposes, so
    step_convert_to_hw does not map it (FINN itself then fails later on a bare AssertionError)."""
    from torch import nn

    from pfq_edge.errors import ToolchainError

    model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Upsample(scale_factor=2), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.MaxPool2d(28), nn.Flatten(), nn.Linear(8, 10)).eval()
    profile = load_profile("fpga")
    path = fpga_qonnx(model, images, tmp_path / "u.onnx")
    with pytest.raises(ToolchainError, match=r"did not map 1 node to HW layers \(after step_convert_to_hw\): "
                                             r"Resize_0 \(Resize between Shuffle and Shuffle\): FINN's "
                                             r"UpsampleNearestNeighbour .* still NCHW"):
        finn_estimate(path, profile.fpga, profile.quant.input_bit_width, tmp_path / "build")


def test_only_nodes_between_hw_layers_count_as_unmapped():
    from onnx import helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    from pfq_edge.errors import ToolchainError
    from pfq_edge.targets.backends.finn.lint import HW_DOMAIN, check_conversion, unmapped_after_conversion

    def graph(ops):
        nodes = [helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], name=f"{op}_{i}", domain=HW_DOMAIN if hw else "")
                 for i, (op, hw) in enumerate(ops)]
        io = [helper.make_tensor_value_info(n, 1, [1]) for n in ("t0", f"t{len(ops)}")]
        return ModelWrapper(qonnx_make_model(helper.make_graph(nodes, "g", io[:1], io[1:])))

    ends = graph([("Transpose", False), ("MVAU", True), ("MVAU", True), ("Mul", False)])
    assert unmapped_after_conversion(ends) == []  # host-side input transpose and output scale
    check_conversion(ends)
    middle = graph([("Transpose", False), ("MVAU", True), ("Mul", False), ("MVAU", True)])
    assert [n.name for n in unmapped_after_conversion(middle)] == ["Mul_2"]
    with pytest.raises(ToolchainError, match="Mul_2 \\(Mul between MVAU and MVAU\\): a floating-point scale"):
        check_conversion(middle)


def test_a_failing_finn_step_names_the_node_and_the_assertion():
    from onnx import helper

    from pfq_edge.targets.backends.finn.lint import describe_failure

    class Thresholding:  # the shape of FINN's custom ops: the node being processed is self.onnx_node
        def __init__(self):
            self.onnx_node = helper.make_node("Thresholding", ["x", "t"], ["y"], name="Thresholding_3")

        def hw_thresholds(self, t):
            if t < 0:  # a bare assert, as FINN's (pytest would rewrite an assert here to carry a message)
                raise AssertionError()
            return t

    try:
        Thresholding().hw_thresholds(-1)
    except AssertionError as exc:
        line = describe_failure(exc, "step_minimize_bit_width_initial")
    assert line.startswith("step_minimize_bit_width_initial at Thresholding_3 (Thresholding): AssertionError at ")
    assert line.endswith("(raise AssertionError())")


def test_finn_session_restores_what_it_changes(tmp_path, monkeypatch):
    import os

    import finn.util.settings as finn_settings
    import finn.xsi

    from pfq_edge.targets.backends.finn.driver import finn_session

    monkeypatch.setenv("FINN_BUILD_DIR", "/somewhere/else")
    monkeypatch.delenv("FINN_SETTINGS", raising=False)
    settings, sim = finn_settings._SETTINGS, vars(finn.xsi).get("SimEngine", "unset")
    with finn_session(tmp_path) as (build_dataflow, _):
        assert os.environ["FINN_BUILD_DIR"] == str(tmp_path / "finn_tmp") and finn.xsi.SimEngine is None
        assert build_dataflow.get_vivado_root() == "none"
    assert os.environ["FINN_BUILD_DIR"] == "/somewhere/else" and "FINN_SETTINGS" not in os.environ
    assert finn_settings._SETTINGS is settings and vars(finn.xsi).get("SimEngine", "unset") == sim
    with pytest.raises(Exception, match="XILINX_VIVADO"):  # FINN's own probe again: no Vivado here
        build_dataflow.get_vivado_root()


def test_finn_graphs_match_qonnx_and_a_tampered_step_is_named(estimate, tmp_path, images):
    import shutil

    from qonnx.core.modelwrapper import ModelWrapper

    from pfq_edge.errors import GoldenCheckError
    from pfq_edge.runners.onnx import run_qonnx
    from pfq_edge.targets.backends.finn.driver import finn_golden_checks, finn_session

    profile, est = estimate
    build = Path(est.report_dir).parents[1]  # <build>/finn/report
    qonnx = build.parent / "m.onnx"
    x = images[:16].numpy()
    reference = run_qonnx(qonnx, x)
    with finn_session(tmp_path / "s"):
        results = finn_golden_checks(build, reference, x, profile.quant.input_bit_width)
    assert [r.stage.split(" vs")[0] for r in results] == [
        "FINN graph after step_qonnx_to_finn", "FINN graph after streamlining", "FINN graph after step_convert_to_hw"]
    assert all(r.passed and r.max_abs_diff < 1e-4 for r in results)
    # a fault in FINN's HW graph: one Thresholding layer's thresholds moved above every input (its output: 0)
    tampered = tmp_path / "build"
    shutil.copytree(build, tampered)
    path = tampered / "finn" / "intermediate_models" / "step_convert_to_hw.onnx"
    model = ModelWrapper(str(path))
    node = next(n for n in model.graph.node if n.op_type.startswith("Thresholding"))
    model.set_initializer(node.input[1], model.get_initializer(node.input[1]) + 1e4)
    model.save(str(path))
    with finn_session(tmp_path / "s"), pytest.raises(GoldenCheckError, match="after step_convert_to_hw"):
        finn_golden_checks(tampered, reference, x, profile.quant.input_bit_width)


def test_a_finn_graph_that_diverges_stops_the_build_at_that_step(tmp_path, images, monkeypatch):
    # The checks run inside the build: a fault FINN's streamlining would bring (here one threshold tensor moved above
    # every input) fails the compile right after that step, before HW conversion and folding.
    from pfq_edge.errors import GoldenCheckError
    from pfq_edge.runners.onnx import run_qonnx
    from pfq_edge.targets.backends.finn.driver import FinnGoldenChecks, finn_session

    profile = load_profile("fpga")
    path = fpga_qonnx(tiny_dscnn(), images, tmp_path / "m.onnx")
    x = images[:8].numpy()
    with finn_session(tmp_path / "s"):
        import finn.builder.build_dataflow_steps as finn_steps

    streamline = finn_steps.step_streamline

    def step_streamline(model, cfg):
        model = streamline(model, cfg)
        node = next(n for n in model.graph.node if n.op_type == "MultiThreshold")
        model.set_initializer(node.input[1], model.get_initializer(node.input[1]) + 1e4)
        return model

    monkeypatch.setattr(finn_steps, "step_streamline", step_streamline)
    checks = FinnGoldenChecks(run_qonnx(path, x), x, profile.quant.input_bit_width)
    with pytest.raises(GoldenCheckError, match="after streamlining"):
        finn_estimate(path, profile.fpga, profile.quant.input_bit_width, tmp_path / "build", golden=checks)
    assert [r.passed for r in checks.results] == [True]  # step_qonnx_to_finn passed, streamlining failed
    saved = {p.stem for p in (tmp_path / "build" / "finn" / "intermediate_models").glob("*.onnx")}
    assert "step_tidy_up" in saved and "step_convert_to_hw" not in saved


def test_a_finn_build_that_does_not_finish_is_stopped_with_its_step_named(tmp_path, images, monkeypatch):
    from pfq_edge.errors import ToolchainError
    from pfq_edge.targets.backends.finn import driver

    profile = load_profile("fpga")
    path = fpga_qonnx(tiny_dscnn(), images, tmp_path / "m.onnx")
    monkeypatch.setattr(driver, "FINN_TIME_LIMIT_S", 1)  # a transformation loop, as FINN's streamlining can spin
    with pytest.raises(ToolchainError, match=r"stopped: step_\w+ did not finish within 1 s") as err:
        finn_estimate(path, profile.fpga, profile.quant.input_bit_width, tmp_path / "build")
    kept = Path(str(err.value).rsplit("FINN's log: ", 1)[1].rstrip(")"))
    assert kept.stat().st_size > 0  # what FINN printed up to the stop


def test_zero_estimates_are_bounded_and_a_zero_compute_core_makes_the_estimate_incomplete(estimate):
    from pfq_edge.targets.backends.finn.zero_estimates import kind_of

    profile, est = estimate
    zero_kinds = {kind_of(b["layer"]) for b in est.bounded}
    assert "FMPadding" in zero_kinds and all(b["LUT"] > 0 for b in est.bounded)  # FINN said 0 for each of them
    rows = {r["layer"]: r for r in est.layers}
    assert all(rows[b["layer"]]["LUT"] == b["LUT"] and rows[b["layer"]]["bounded"] for b in est.bounded)
    assert est.totals["LUT"] == pytest.approx(est.finn_totals["LUT"] + sum(b["LUT"] for b in est.bounded))
    assert fpga_verdicts(est, profile)["fit"]["verdict"] == "fits"
    # an MVAU estimated at 0 everywhere (Xilinx/finn#1309): no verdict rests on it
    broken = dataclasses.replace(est, layers=[dict(r) for r in est.layers])
    mvau = next(r for r in broken.layers if r["layer"].startswith("MVAU"))
    mvau.update(LUT=0.0, BRAM_18K=0.0, URAM=0.0, DSP=0.0)
    fit = fpga_verdicts(broken, profile)["fit"]
    assert fit["verdict"] == "estimate incomplete" and fit["incomplete"] == [mvau["layer"]]


def test_thresholds_rounded_in_one_pass_give_finns_own_result():
    """finn_steps' speed-up of FINN's RoundAndClipThresholds (all MultiThresholds at once instead of one per pass)
    leaves the same thresholds and threshold data types as FINN's own transformation."""
    import numpy as np
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    from pfq_edge.export.device.finn_steps import _thresholds_rounded_in_one_pass
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds

    def model():
        nodes = [helper.make_node("MultiThreshold", [f"x{i}", f"t{i}"], [f"x{i + 1}"], domain="qonnx.custom_op.general",
                                  out_dtype="UINT4", name=f"MultiThreshold_{i}") for i in range(3)]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("x0", "x3")]
        m = ModelWrapper(qonnx_make_model(helper.make_graph(nodes, "g", io[:1], io[1:])))
        rng = np.random.default_rng(0)
        for i in range(3):
            m.set_initializer(f"t{i}", rng.uniform(-20, 30, (2, 15)).astype(np.float32))
        m.set_tensor_datatype("x0", DataType["INT4"])
        for i in (1, 2):
            m.set_tensor_datatype(f"x{i}", DataType["UINT4"])
        return m

    ref = model().transform(RoundAndClipThresholds())
    with _thresholds_rounded_in_one_pass():
        ours = model().transform(RoundAndClipThresholds())
    for i in range(3):
        assert np.array_equal(ours.get_initializer(f"t{i}"), ref.get_initializer(f"t{i}"))
        assert ours.get_tensor_datatype(f"t{i}") == ref.get_tensor_datatype(f"t{i}")
    assert not np.array_equal(ref.get_initializer("t0"), model().get_initializer("t0"))  # there was work to do
    assert RoundAndClipThresholds.apply.__qualname__ == "RoundAndClipThresholds.apply"  # FINN's own, restored


def test_hardware_aware_pfq_keeps_the_fpga_design_at_or_below_the_unpruned_one(tmp_path, images):
    """Ten constant filters of a 32-channel pointwise conv (and the depthwise conv after it). Removing all of them
    leaves 22 = 2·11 channels, which FINN's target_fps folding divides badly; with the FPGA profile's channel multiple
    (8 at W4) PfQ removes eight (24 channels) and neutralizes two: the function unchanged, and a design no larger and
    no slower than the unpruned model's and smaller than the all-removed one."""
    import copy

    import torch
    from torch import nn

    from conftest import plant_constant
    from pfq_edge.pfq.apply import apply_plan
    from pfq_edge.pfq.graph import trace
    from pfq_edge.pfq.plan import plan_pfq
    from pfq_edge.steps import channel_multiple

    profile = load_profile("fpga")
    multiple = channel_multiple(profile)
    assert multiple == 8
    model = randomize_bn(tiny_dscnn((16, 32, 32)))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    dead = list(range(1, 20, 2))
    plant_constant(convs[2], bns[2], dead, [-0.5] * len(dead))  # dead ReLU filters of the first pointwise conv
    designs, counts, plans = {}, {}, {}
    for name, mult in (("unpruned", None), ("all removed", 1), ("hardware-aware", multiple)):
        m = copy.deepcopy(model)
        if mult is not None:
            plans[name] = plan_pfq(trace(m, images[:1]), channel_multiple=mult)
            apply_plan(m, plans[name])
            with torch.no_grad():
                assert torch.allclose(m(images), model(images), atol=1e-5)
        counts[name] = [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
        path = fpga_qonnx(m, images, tmp_path / f"{len(designs)}.onnx")  # FINN's resources: shapes and bits
        designs[name] = finn_estimate(path, profile.fpga, profile.quant.input_bit_width, tmp_path / f"b{len(designs)}")
    assert counts["all removed"][2:4] == [22, 22] and counts["hardware-aware"][2:4] == [24, 24]
    aware, unpruned, every = designs["hardware-aware"], designs["unpruned"], designs["all removed"]
    assert aware.totals["LUT"] <= unpruned.totals["LUT"] and aware.throughput_fps >= unpruned.throughput_fps
    assert aware.totals["LUT"] < every.totals["LUT"]
    plan = plans["hardware-aware"]
    assert plan.filters_removed == 16 and len(plan.neutralized) == 1 and len(plan.neutralized[0].channels) == 2
    assert "kept for folding" in plan.neutralized[0].reason


def test_fast_branchy_streamlining_gives_finns_own_graph(tmp_path, images, monkeypatch):
    """finn_steps' speed-ups of FINN's streamlining (ComposedTransformation's clean-up skipped where it would give the
    same graph back; shape inference without the weights' values — here for every weight, not only large ones) give
    byte for byte the graph FINN's own transformations give, on a residual block with a depthwise convolution and a
    global average pool."""
    import contextlib
    import copy

    import torch
    from qonnx.core.modelwrapper import ModelWrapper
    from torch import nn

    from pfq_edge.export.device import finn_steps
    from pfq_edge.export.finn_build import write_finn_input_model
    from pfq_edge.targets.backends.finn.driver import finn_session

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.bn0(self.stem(x)))
            y = torch.relu(self.bn1(self.dw(x)) + x)
            return self.fc(torch.flatten(self.pool(y), 1))

    torch.manual_seed(0)
    path = write_finn_input_model(fpga_qonnx(Block().eval(), images, tmp_path / "b.onnx"), tmp_path / "in.onnx", 8)
    with finn_session(tmp_path) as (_, config):
        from finn.builder import build_dataflow_steps as steps

        cfg = config.DataflowBuildConfig(output_dir=str(tmp_path / "o"), synth_clk_period_ns=10.0,
                                         generate_outputs=[])
        tidy = steps.step_tidy_up(steps.step_qonnx_to_finn(ModelWrapper(str(path)), cfg), cfg)
        monkeypatch.setattr(finn_steps, "_LARGE_INITIALIZER_BYTES", 0)
        ours = finn_steps.step_pfq_streamline_branchy(ModelWrapper(copy.deepcopy(tidy.model)), cfg)
        for name in ("_composed_cleanup_only_after_changes", "_shapes_inferred_without_weights"):
            monkeypatch.setattr(finn_steps, name, contextlib.nullcontext)
        finns = finn_steps.step_pfq_streamline_branchy(ModelWrapper(copy.deepcopy(tidy.model)), cfg)
    assert ours.model.SerializeToString() == finns.model.SerializeToString()
    assert ours.get_nodes_by_op_type("MultiThreshold") and not ours.get_nodes_by_op_type("GlobalAveragePool")
