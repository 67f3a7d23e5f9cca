"""Branchy networks as users bring them (issue 16): a concat of two branches with constant filters — one removed
exactly through the concat, one neutralized because its constant meets zero padding — through PfQ, Brevitas, the
export golden checks, FINN (DuplicateStreams, StreamingConcat) and TVM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import plant_constant, randomize_bn

USERLAND = Path(__file__).resolve().parents[1] / "examples" / "userland"
ENV = {**os.environ, "PFQ_EDGE_QUIET": "1"}


def run(*args):
    return subprocess.run([sys.executable, "-m", "pfq_edge", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=USERLAND, timeout=900)


@pytest.fixture(scope="module")
def concat_weights(tmp_path_factory):
    from user_models import concat_net

    torch.manual_seed(0)
    model = randomize_bn(concat_net(num_classes=10).eval())
    plant_constant(model.stem[0], model.stem[1], [3], [0.5])     # read by branch a's padded 3×3 conv: neutralized
    plant_constant(model.a[0], model.a[1], [1, 2], [0.5, -0.3])  # through the concat into a 1×1 conv: removed
    path = tmp_path_factory.mktemp("branchy") / "concat.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _check_pfq(report):
    prune = report["stages"]["prune"]
    assert prune["exact"] and prune["golden"]["passed"] and prune["golden"]["max_abs_diff"] <= 1e-4
    assert prune["filters_removed"] == 2
    neutralized = prune["neutralized"]
    assert [n["conv"] for n in neutralized] == ["stem.0"] and "zero padding" in neutralized[0]["reason"]
    assert report["stages"]["export"]["golden"]["passed"]


@pytest.mark.parametrize("target", ["fpga", "cpu"])
def test_concat_with_constant_filters_compiles(concat_weights, tmp_path, target):
    out = tmp_path / target
    proc = run("compile", "--target", target, "--model", "user_models:concat_net", "--model-arg", "num_classes=10",
               "--weights", concat_weights, "--epochs", "0", "--channel-multiple", "1", "--out", out)
    assert proc.returncode in (0, 9), proc.stderr[-2000:]  # 9: a budget missed, output complete
    report = json.loads((out / "report.json").read_text())
    _check_pfq(report)
    export = report["stages"]["export"]["golden"]
    assert export["max_abs_diff"] < 1e-3 and export["argmax_agreement"] == 1.0  # no float64 arbiter needed
    if target == "fpga":
        kinds = {row["layer"].rsplit("_", 2)[0] for row in report["stages"]["estimate"]["layers"]}
        assert {"DuplicateStreams", "StreamingConcat", "MVAU"} <= kinds
        config = json.loads((out / "finn_build" / "dataflow_build_config.json").read_text())
        assert "finn_steps.step_pfq_streamline_branchy" in config["steps"] and "step_streamline" not in config["steps"]
        assert (out / "finn_build" / "finn_steps.py").is_file()


def test_the_mobilenetv2_zoo_model_compiles_for_fpga_with_finn_golden_checks(tmp_path):
    """fashion-mbv2 (inverted residual blocks, identity adds, ReLU6, global average pooling; 52 constant filters):
    PfQ exact and hardware-aware (64 filters removed, the rest neutralized so that channel counts stay multiples of
    8), FINN streams its forks and joins, FINN's own graphs match QONNX, and the design is no larger than the
    unpruned architecture's."""
    out = tmp_path / "mbv2"
    proc = run("compile", "--target", "fpga", "--model", "fashion-mbv2", "--epochs", "0", "--out", out)
    assert proc.returncode in (0, 9), proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    prune = report["stages"]["prune"]
    assert prune["exact"] and prune["filters_removed"] == 64 and prune["golden"]["max_abs_diff"] <= 1e-4
    assert prune["channel_multiple"] == 8 and all(r["channels_after"] % 8 == 0 for r in prune["layers"])
    estimate = report["stages"]["estimate"]
    kinds = {row["layer"].rsplit("_", 2)[0] for row in estimate["layers"]}
    assert {"DuplicateStreams", "ElementwiseAdd", "GlobalAccPool", "VVAU", "MVAU"} <= kinds
    assert [g["stage"].split(" vs")[0] for g in estimate["golden"]] == [
        "FINN graph after step_qonnx_to_finn", "FINN graph after streamlining", "FINN graph after step_convert_to_hw"]
    assert all(g["passed"] for g in estimate["golden"]) and estimate["verdicts"]["fit"]["verdict"] == "fits"
    # no resource above the unpruned design's, at the profile's target fps or more (measured: 25,319 vs 25,922 LUT,
    # 10,482 vs 10,629 fps — folding for the unpruned 10,629 fps would have cost more than the unpruned design)
    unpruned = estimate["unpruned"]
    assert unpruned["pfq_vs_unpruned"]["larger"] == [] and estimate["throughput_fps"] >= unpruned["profile_target_fps"]
