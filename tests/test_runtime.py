"""CPU/GPU targets: QCDQ export, TVM builds (host, AArch64, CUDA), golden checks, the latency harness (issue 5).

Real Brevitas, onnxruntime, TVM and (when installed) nvcc on a tiny depthwise-separable CNN and real images.
"""

import json
import os
import time

import brevitas.nn as qnn
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from conftest import randomize_bn, tiny_dscnn
from pfq_edge.errors import GoldenCheckError, ModelError, ProfileError
from pfq_edge.export.qcdq import check_qcdq_bit_widths, export_qcdq
from pfq_edge.golden import TOLERANCES, golden_check
from pfq_edge.runners.latency import measure, run_outputs, time_calls
from pfq_edge.runners.onnx import run_onnxruntime
from pfq_edge.targets.backends import backend_for
from pfq_edge.targets.backends.tvm.driver import build_tvm, elf_info, nvcc_version
from pfq_edge.quantize import calibrate, quantize_model
from pfq_edge.targets.profile import QuantSpec, RuntimeSpec, load_profile, with_overrides
from pfq_edge.train import predict

EXPORT_ATOL, EXPORT_MAX_FLIPPED = TOLERANCES["export"].atol, TOLERANCES["export"].max_mismatch_fraction


@pytest.fixture(scope="module", params=[8, 4], ids=["W8A8", "W4A4"])
def qcdq(request, tmp_path_factory, images):
    qm = quantize_model(randomize_bn(tiny_dscnn()), QuantSpec(weight_bit_width=request.param,
                                                             act_bit_width=request.param))
    calibrate(qm, images)
    path = export_qcdq(qm, images[:1], tmp_path_factory.mktemp("qcdq") / "m.qcdq.onnx")
    return request.param, qm, path


def test_qcdq_is_standard_onnx_and_matches_brevitas(qcdq, images):
    bits, qm, path = qcdq
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert all(op.domain in ("", "ai.onnx") for op in model.opset_import)  # no QONNX custom ops
    if bits < 8:  # below 8 bits the integer range is held by a Clip between Q and DQ: 4-bit unsigned = 0..15
        clips = [n for n in model.graph.node if n.op_type == "Clip" and "act" in n.output[0]]
        init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        assert clips and int(init[clips[0].input[2]]) == 15
    result = golden_check("qcdq", predict(qm, images).numpy(), run_onnxruntime(path, images.numpy()),
                          atol=EXPORT_ATOL, max_mismatch_fraction=EXPORT_MAX_FLIPPED)
    assert result.argmax_agreement == 1.0


def test_qcdq_biases_are_constants_so_onnxruntime_fusions_compute_the_graph(qcdq, images):
    """onnxruntime 1.25.1 drops a run-time bias from a fused 1×1 QLinearConv; biases listed as graph inputs (as
    Brevitas writes them) are run-time values, so the export keeps them as constants only."""
    _, _, path = qcdq
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [model.graph.input[0].name]
    written = run_onnxruntime(path, images.numpy(), level="off")
    fused = run_onnxruntime(path, images.numpy(), level="all")
    # onnxruntime's fused integer kernels may move every logit by a rounding step (measured on this machine's
    # kernels at W8A8: 7.2e-3 on all 64 images, with float or int32 biases alike; the compile's "onnxruntime level"
    # tolerance allows it): the classification must not move, and a dropped bias would move the logits by far more
    result = golden_check("all vs off", written, fused, atol=EXPORT_ATOL, max_mismatch_fraction=1.0)
    assert result.argmax_agreement == 1.0 and result.max_abs_diff < 0.05, result.as_dict()


def test_int32_biases_make_onnxruntime_optimizations_exact(images, tmp_path):
    """With float biases onnxruntime (level basic on) rounds them to the int32 grid input scale × weight scale itself
    and so computes another model; quantized on that grid in Brevitas (the CPU profiles' bias = "int32") they are
    exported as int32 DequantizeLinear and every level computes the graph as written."""
    diffs = {}
    for bias in ("float", "int32"):
        qm = quantize_model(randomize_bn(tiny_dscnn()), QuantSpec(weight_bit_width=4, act_bit_width=4, bias=bias))
        calibrate(qm, images)
        path = export_qcdq(qm, images[:1], tmp_path / f"{bias}.onnx")
        model = onnx.load(str(path))
        init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        int32_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
                    and init[n.input[0]].dtype == np.int32]
        biased = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3]
        assert biased and len(int32_dq) == (len(biased) if bias == "int32" else 0)
        written = run_onnxruntime(path, images.numpy(), level="off")
        golden_check("qcdq", predict(qm, images).numpy(), written, atol=EXPORT_ATOL,
                     max_mismatch_fraction=EXPORT_MAX_FLIPPED)
        diffs[bias] = [float(np.abs(run_onnxruntime(path, images.numpy(), level=lv) - written).max())
                       for lv in ("basic", "all")]
    assert max(diffs["int32"]) < 1e-5, diffs
    assert min(diffs["float"]) > 1e-3, diffs  # the failure mode the int32 grid removes


def test_golden_check_fails_on_a_tampered_qcdq_model(qcdq, images, tmp_path):
    _, qm, path = qcdq
    model = onnx.load(str(path))
    weight = next(i for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.int8
                  and numpy_helper.to_array(i).ndim == 4)
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))  # first conv, sign flipped
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(GoldenCheckError, match="top-1 agreement"):
        golden_check("qcdq", predict(qm, images).numpy(), run_onnxruntime(bad, images.numpy()), atol=EXPORT_ATOL,
                     min_agreement=0.99, max_mismatch_fraction=EXPORT_MAX_FLIPPED)


class TwoBranches(nn.Module):
    """shared/cases 9: two 8-bit branches summed; the 9-bit sum goes straight into a conv."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(return_quant_tensor=True)
        self.a = qnn.QuantConv2d(1, 4, 3, padding=1)
        self.b = qnn.QuantConv2d(1, 4, 3, padding=1)
        self.requant = qnn.QuantIdentity(return_quant_tensor=True)  # 8-bit, shared: the sum has one scale
        self.head = qnn.QuantConv2d(4, 2, 1)

    def forward(self, x):
        x = self.inp(x)
        return self.head(self.requant(self.a(x)) + self.requant(self.b(x)))


def test_a_9_bit_sum_is_refused_with_its_name(images):
    model = TwoBranches().eval()
    with pytest.raises(ModelError, match=r"input of layer 'head' is 9-bit.*2–8-bit"):
        check_qcdq_bit_widths(model, images[:2])
    wide = nn.Sequential(qnn.QuantIdentity(bit_width=10, return_quant_tensor=True), qnn.QuantConv2d(1, 2, 3)).eval()
    with pytest.raises(ModelError, match=r"Tensor '0' is 10-bit"):
        check_qcdq_bit_widths(wide, images[:2])

    class SumOut(nn.Module):  # the 9-bit sum is the model's output
        def __init__(self):
            super().__init__()
            self.q = qnn.QuantIdentity(return_quant_tensor=True)

        def forward(self, x):
            return self.q(x) + self.q(x * 0.5)

    with pytest.raises(ModelError, match=r"model's output is 9-bit"):
        check_qcdq_bit_widths(SumOut().eval(), images[:2])


def test_a_residual_sum_requantized_by_our_quantizer_exports(images, tmp_path):
    # The same kind of sum in a float model: pfq-edge's quantizer requantizes it to 8 bits, so QCDQ can carry it.
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            y = torch.relu(self.bn0(self.stem(x)))
            z = torch.relu(self.bn1(self.conv(y)) + y)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))

    qm = quantize_model(randomize_bn(Residual().eval()), QuantSpec(weight_bit_width=8, act_bit_width=8))
    calibrate(qm, images)
    path = export_qcdq(qm, images[:1], tmp_path / "res.onnx")
    assert "Add" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert golden_check("qcdq", predict(qm, images).numpy(), run_onnxruntime(path, images.numpy()),
                        atol=EXPORT_ATOL, max_mismatch_fraction=EXPORT_MAX_FLIPPED).passed


@pytest.fixture(scope="module")
def host_build(qcdq, tmp_path_factory):
    bits, qm, path = qcdq
    out = tmp_path_factory.mktemp("tvm")
    return path, build_tvm(path, RuntimeSpec(tvm_target="llvm"), out)


def test_host_library_reloads_in_a_fresh_process_and_matches(host_build, images):
    path, build = host_build
    assert build.runs_here and build.elf == {"elf": True, "class": "ELF64", "type": "shared object",
                                             "machine": "x86-64"}
    x = images.numpy()
    out = run_outputs("tvm", build.library, x, batch_size=1)
    result = golden_check("tvm", run_onnxruntime(path, x), out, atol=EXPORT_ATOL, min_agreement=1.0,
                          max_mismatch_fraction=EXPORT_MAX_FLIPPED)
    assert result.argmax_agreement == 1.0 and result.max_abs_diff < 1.0


def test_tvm_golden_check_fails_against_another_model(host_build, qcdq, images, tmp_path):
    path, build = host_build
    x = images.numpy()
    other = np.roll(run_onnxruntime(path, x), 1, axis=1)  # the reference of a different model: classes shifted
    with pytest.raises(GoldenCheckError):
        golden_check("tvm", other, run_outputs("tvm", build.library, x, batch_size=1), atol=EXPORT_ATOL,
                     min_agreement=1.0, max_mismatch_fraction=EXPORT_MAX_FLIPPED)


def test_aarch64_cross_compile_is_an_aarch64_shared_object(qcdq, tmp_path):
    _, _, path = qcdq
    spec = load_profile("cpu-aarch64").runtime
    build = build_tvm(path, spec, tmp_path)
    assert not build.runs_here
    assert build.library.name == "model.aarch64-linux-gnu.so"
    assert elf_info(build.library) == {"elf": True, "class": "ELF64", "type": "shared object", "machine": "AArch64"}


def test_cuda_build_says_what_was_verified(qcdq, tmp_path):
    _, _, path = qcdq
    build = build_tvm(path, load_profile("gpu-cuda").runtime, tmp_path)
    assert not build.runs_here and build.elf["machine"] == "AArch64"  # Jetson host code
    device = build.device_code
    assert device["arch"] == "sm_87"
    if nvcc_version() is None:
        assert device["compiled"] is False and "nvcc" in device["reason"]
    else:
        assert device["compiled"] is True
        fatbin = (tmp_path / device["file"]).read_bytes()
        assert fatbin[:4] == bytes.fromhex("50ed55ba") and len(fatbin) == device["bytes"]  # fatbin magic


def test_tuning_database_is_kept_and_reused(images, tmp_path):
    # One quantized conv: one or two tuning tasks keep this real MetaSchedule run short.
    qm = nn.Sequential(qnn.QuantIdentity(return_quant_tensor=True), qnn.QuantConv2d(1, 4, 3)).eval()
    path = export_qcdq(qm, images[:1], tmp_path / "m.onnx")
    db = tmp_path / "tvm_tuning"
    first = build_tvm(path, RuntimeSpec(tvm_target="llvm", tune_trials=2), tmp_path / "a", tuning_db=db)
    assert first.tuning["trials_run"] == 2 and first.tuning["reused_trials"] == 0
    assert (db / "database_workload.json").is_file() and (db / "pfq-edge-tuning.json").is_file()
    records = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines()]
    # every candidate was built by our builder function and timed (a failed build is recorded as 1e10 s)
    assert records and all(max(r[1][1]) < 1.0 for r in records)
    again = build_tvm(path, RuntimeSpec(tvm_target="llvm", tune_trials=2), tmp_path / "b", tuning_db=db)
    assert again.tuning["trials_run"] == 0 and again.tuning["reused_trials"] == 2
    x = images[:8].numpy()
    out, ref = run_outputs("tvm", again.library, x, batch_size=1), run_onnxruntime(path, x)
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-3


def test_time_calls_drops_warmup_and_runs_until_the_minimum_duration():
    calls = []

    def fn(x):
        calls.append(time.perf_counter())
        time.sleep(0.05 if len(calls) <= 3 else 0.001)  # the first (warm-up) calls are slow

    result = time_calls(fn, None, warmup=3, min_time_s=0.2, min_repeats=5)
    assert len(calls) == 3 + result["repeats"] and result["warmup"] == 3
    assert result["duration_s"] >= 0.2 and result["repeats"] >= 5
    assert result["max_ms"] < 50  # the slow warm-up calls are not among the timed ones
    assert result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    few = time_calls(lambda x: time.sleep(0.03), None, warmup=0, min_time_s=0.0, min_repeats=4)
    assert few["repeats"] == 4  # the minimum count holds even when the minimum duration is already reached


def test_measure_runs_each_engine_in_its_own_process_with_its_threads(qcdq, host_build, images):
    _, _, path = qcdq
    _, build = host_build
    x = images[:1].numpy()
    pids = set()
    for engine, model in (("onnxruntime", path), ("tvm", build.library)):
        result = measure(engine, model, x, threads=1, warmup=2, min_time_s=0.05, min_repeats=5)
        assert result["engine"] == engine and result["threads"] == 1 and result["batch"] == 1
        assert result["warmup"] == 2 and result["repeats"] >= 5 and result["median_ms"] > 0
        pids.add(result["pid"])
    assert os.getpid() not in pids and len(pids) == 2


def test_cpu_profiles_and_their_options():
    cpu = load_profile("cpu")
    assert cpu.name == "cpu-x86" and cpu.export_format == "qcdq" and cpu.quant.weight_bit_width == 8
    assert with_overrides(cpu, {"runtime": {"tune_trials": 16}}).runtime.tune_trials == 16
    assert with_overrides(cpu, {"quant": {"weight_bit_width": 4, "act_bit_width": 4}}).quant.label() == "W4A4"
    with pytest.raises(ProfileError, match="tune_trials does not apply to fpga"):
        with_overrides(load_profile("fpga"), {"runtime": {"tune_trials": 16}})
    with pytest.raises(ProfileError, match="cannot be tuned on this machine"):
        with_overrides(load_profile("cpu-aarch64"), {"runtime": {"tune_trials": 8}})
    with pytest.raises(ProfileError, match="cannot use runtime.tvm_target 'cuda'"):
        with_overrides(cpu, {"runtime": {"tvm_target": "cuda", "arch": "sm_87"}})
    assert [load_profile(n).quant.bias for n in ("cpu-x86", "cpu-aarch64", "gpu-cuda", "fpga")] == [
        "int32", "int32", "int32", "float"]
    with pytest.raises(ProfileError, match="quant.bias must stay"):
        with_overrides(load_profile("fpga"), {"quant": {"bias": "int32"}})


def test_bad_runtime_keys_name_key_and_file(tmp_path):
    text = (load_profile("cpu").source and open(load_profile("cpu").source).read())
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('tvm_target = "llvm"', 'tvm_target = "vulkan"'))
    with pytest.raises(ProfileError, match=r"bad.toml.*runtime.tvm_target"):
        load_profile(str(bad))
    bad.write_text(text.replace("batch_size = 1\n", "batch_size = 0\n"))
    with pytest.raises(ProfileError, match=r"runtime.batch_size"):
        load_profile(str(bad))


def test_budget_verdicts():
    tvm, finn = backend_for("cpu"), backend_for("fpga")
    assert tvm.budget_missed({"latency_verdict": "meets", "latency_ms": 0.1, "latency_budget_ms": 1}) is None
    assert tvm.budget_missed({"latency_verdict": "not measured", "latency_budget_ms": 1}) is None
    assert "1.500 ms exceeds" in tvm.budget_missed({"latency_verdict": "misses", "latency_ms": 1.5,
                                                    "latency_budget_ms": 1.0})
    assert "does not fit" in finn.budget_missed({"fit": "does not fit", "latency_verdict": "meets", "latency_us": 5})
    assert "FINN latency 0.005 ms" in finn.budget_missed({"fit": "fits", "latency_verdict": "misses", "latency_us": 5})


def test_report_json_of_a_runtime_compile_renders(tmp_path):
    from pfq_edge.report import render_markdown

    doc = {"model": "m", "target": "cpu-x86", "kind": "cpu", "summary": {}, "timings_s": {}, "stages": {
        "export": {"file": "model.qcdq.onnx", "bytes": 10, "batch_size": 1, "onnxruntime_levels": {}},
        "build": {"target": {"kind": "llvm"}, "library": "model.host.so", "seconds": 1.0, "tuning": {},
                  "elf": {"class": "ELF64", "type": "shared object", "machine": "x86-64"}, "device_code": None,
                  "golden": {"stage": "b", "images": 256, "argmax_agreement": 1.0, "max_abs_diff": 0.01,
                             "mismatched_images": 0, "atol": 1e-3, "max_mismatch_fraction": 0.25, "passed": True}},
        "measure": {"batch_size": 1, "threads": 2, "engines": [
            {"label": "TVM", "engine": "tvm", "median_ms": 0.2, "p90_ms": 0.3, "min_ms": 0.1, "repeats": 9,
             "warmup": 10},
            {"label": "onnxruntime", "engine": "onnxruntime", "median_ms": 0.1, "p90_ms": 0.1, "min_ms": 0.1,
             "repeats": 9, "warmup": 10}],
                    "verdict": {"verdict": "meets", "latency_ms": 0.2, "budget_ms": 1.0}}}}
    text = render_markdown(json.loads(json.dumps(doc)))
    assert "| onnxruntime | 0.1000 |" in text and "| 2 |" in text and "**meets**" in text


def test_a_latency_whose_median_is_far_above_its_minimum_is_marked_noisy():
    """User report: torch eager median 192 ms, minimum 0.61 ms on a busy machine, shown as a real ratio."""
    from pfq_edge.targets.backends.tvm.report import runtime_section

    def engine(label, median, low):
        return {"label": label, "median_ms": median, "p90_ms": median, "min_ms": low, "max_ms": median,
                "repeats": 20, "warmup": 10}

    build = {"target": {"kind": "llvm"}, "library": "model.host.so", "elf": {}}
    measured = {"batch_size": 1, "threads": 2,
                "engines": [engine("TVM", 0.69, 0.65), engine("onnxruntime", 0.12, 0.11), engine("torch", 192.0, 0.61)]}
    text = "\n".join(runtime_section({"file": "m.onnx", "bytes": 1, "batch_size": 1}, build, measured))
    assert "**Noisy timing**: torch median 315× its minimum" in text and "onnxruntime median" not in text
    measured["engines"][2] = engine("torch", 0.9, 0.6)
    assert "Noisy" not in "\n".join(runtime_section({"file": "m.onnx", "bytes": 1, "batch_size": 1}, build, measured))
