"""`pfq-edge compile` for CPU/GPU targets as a user runs it: default model, real data, real TVM (issue 5)."""

import json
import re
import subprocess
import sys

import pytest

from test_cli import ENV, one_line_error, run
from pfq_edge.targets.profile import PROFILE_DIR


def profile_with_budget(tmp_path, latency_ms: float):
    text = re.sub(r"(?m)^latency_ms = .*$", f"latency_ms = {latency_ms}", (PROFILE_DIR / "cpu-x86.toml").read_text())
    path = tmp_path / f"cpu-{latency_ms:g}.toml"
    path.write_text(text.replace('name = "cpu-x86"', f'name = "cpu-budget-{latency_ms:g}"'))
    return path


@pytest.fixture(scope="module")
def cpu_compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu")
    out = tmp / "out"
    proc = run("compile", "--target", str(profile_with_budget(tmp, 1000.0)), "--epochs", "0", "--out", str(out),
               "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout)


def test_cpu_compile_writes_a_checked_library_and_latency_table(cpu_compiled):
    out, result = cpu_compiled
    report = json.loads((out / "report.json").read_text())
    build, measured = report["stages"]["build"], report["stages"]["measure"]
    assert (out / "model.host.so").is_file() and (out / "model.qcdq.onnx").is_file()
    golden = build["golden"]
    assert golden["passed"] and golden["images"] >= 256 and golden["argmax_agreement"] == 1.0
    assert report["stages"]["export"]["golden"]["passed"]
    engines = {e["engine"]: e for e in measured["engines"]}
    assert set(engines) == {"tvm", "onnxruntime", "torch"}
    assert len({e["pid"] for e in engines.values()}) == 3  # each engine in its own process
    for e in engines.values():
        assert e["warmup"] > 0 and e["repeats"] >= 20 and e["duration_s"] >= 1.0 and e["threads"] >= 1
        assert e["min_ms"] <= e["median_ms"] <= e["p90_ms"]
    assert measured["verdict"]["verdict"] == "meets" and result["summary"]["latency_verdict"] == "meets"
    text = (out / "report.md").read_text()
    assert "CPU/GPU build (QCDQ → TVM)" in text and "fresh process" in text and "**meets**" in text


def test_a_missed_latency_budget_is_exit_9_with_complete_output(tmp_path):
    out = tmp_path / "out"
    proc = run("compile", "--target", str(profile_with_budget(tmp_path, 1e-6)), "--epochs", "0", "--out", str(out))
    assert proc.returncode == 9 and one_line_error(proc) and "budget missed" in proc.stderr
    assert (out / "report.json").is_file() and (out / "model.host.so").is_file()
    assert json.loads((out / "report.json").read_text())["summary"]["latency_verdict"] == "misses"


@pytest.mark.parametrize("target, library, machine", [("cpu-aarch64", "model.aarch64-linux-gnu.so", "AArch64"),
                                                      ("gpu-cuda", "model.cuda.so", "AArch64")])
def test_cross_targets_write_their_library_and_claim_no_latency(tmp_path, target, library, machine):
    out = tmp_path / target
    proc = run("compile", "--target", target, "--epochs", "0", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    build = report["stages"]["build"]
    assert (out / library).read_bytes()[:4] == b"\x7fELF" and build["elf"]["machine"] == machine
    assert "golden" not in build and "cannot be loaded on this machine" in build["not_run"]
    assert report["stages"]["measure"]["engines"] == []
    assert report["summary"]["latency_verdict"] == "not measured"
    if target == "gpu-cuda":
        device = build["device_code"]
        text = (out / "report.md").read_text()
        assert "no GPU figure is claimed" in text
        assert device["compiled"] == (out / "model.sm_87.fatbin").is_file()


def test_tuning_options_are_checked_before_work(tmp_path):
    proc = run("compile", "--target", "fpga", "--tune-trials", "8", "--out", str(tmp_path / "o"))
    assert proc.returncode == 5 and one_line_error(proc) and "does not apply to fpga" in proc.stderr
    proc = run("compile", "--target", "cpu", "--tuning-db", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and one_line_error(proc) and "no MetaSchedule database" in proc.stderr
    (tmp_path / "database_tuning_record.json").write_text("")
    for target in ("cpu-aarch64", "gpu-cuda"):  # schedules measured here must never reach a cross-compiled library
        proc = run("compile", "--target", target, "--tuning-db", str(tmp_path), "--out", str(tmp_path / "o"))
        assert proc.returncode == 2 and one_line_error(proc) and "cross-compiled" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_cross_compiler_is_one_line(tmp_path):
    text = (PROFILE_DIR / "cpu-aarch64.toml").read_text().replace('cc = "aarch64-linux-gnu-gcc"', 'cc = "no-such-cc"')
    (tmp_path / "arm.toml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "pfq_edge", "compile", "--target", str(tmp_path / "arm.toml"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 7 and one_line_error(proc) and "no-such-cc" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_targets_lists_cpu_and_gpu_profiles():
    proc = run("targets", "--json")
    rows = {p["name"]: p for p in json.loads(proc.stdout)}
    assert rows["cpu-x86"]["kind"] == "cpu" and "cpu" in rows["cpu-x86"]["aliases"]
    assert rows["cpu-aarch64"]["mtriple"] == "aarch64-linux-gnu"
    assert rows["gpu-cuda"]["arch"] == "sm_87"


def test_run_py_in_the_cpu_package_gives_the_accuracy_the_manifest_states(cpu_compiled, tmp_path, test_split):
    import tarfile

    import numpy as np

    out, _ = cpu_compiled
    pkg = tmp_path / "device"
    pkg.mkdir()
    with tarfile.open(next(out.glob("pfq-edge-*.tar.gz"))) as tar:
        tar.extractall(pkg, filter="data")
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["runtime"]["library"] == "model.host.so" and manifest["kind"] == "cpu"
    assert manifest["latency"]["engines"]["tvm"]["median_ms"] > 0
    images = (test_split.images[:, 0].numpy() * 255).round().astype(np.uint8)  # pixels as a device has them
    np.savez(tmp_path / "test.npz", images=images, labels=test_split.labels.numpy())
    done = subprocess.run([sys.executable, "run.py", str(tmp_path / "test.npz"), "--json"], cwd=pkg,
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["engine"] == "tvm" and result["images"] == 10_000
    assert result["top1"] == manifest["accuracy"]["deployed"]  # the same library on the same images
    assert abs(result["top1"] - manifest["accuracy"]["quantized_ptq"]) < 0.01  # and it is the quantized model
    proc = run("verify", str(next(out.glob("pfq-edge-*.tar.gz"))))
    assert proc.returncode == 0 and "OK" in proc.stdout
