"""The CLI as a user runs it: the end-to-end compile on real data, and one-line errors for bad input."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ENV = {**os.environ, "PFQ_EDGE_QUIET": "1"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pfq_edge", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=900)


def one_line_error(proc):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("pfq-edge: error:") and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "fpga"
    proc = run("compile", "--target", "fpga", "--epochs", "1", "--train-samples", "512", "--out", str(out),
               "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout)


def test_compile_writes_report_and_package(compiled):
    out, result = compiled
    s = result["summary"]
    for key in ("float_top1", "pfq_top1", "quantized_top1", "finetuned_top1", "filters_removed", "weight_bits",
                "latency_us", "throughput_fps", "LUT", "BRAM_18K", "DSP", "fit", "latency_verdict"):
        assert key in s, key
    assert s["float_top1"] >= 0.90  # the shipped float model
    assert s["fit"] in ("fits", "does not fit") and s["latency_verdict"] in ("meets", "misses")
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["export"]["golden"]["passed"] and report["stages"]["export"]["golden"]["images"] >= 256
    assert (out / "report.md").read_text().startswith("# pfq-edge compile")
    assert (out / "model.qonnx.onnx").is_file()
    assert (out / "finn_reports" / "estimate_layer_resources.json").is_file()


def test_manifest_hashes_match_the_files(compiled):
    out, _ = compiled
    archive = next(out.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members.pop("manifest.json"))
    sums = members.pop("SHA256SUMS").decode()
    assert set(manifest["files"]) == set(members)
    assert sums == "".join(f"{e['sha256']}  {n}\n" for n, e in sorted(manifest["files"].items()))
    for name, data in members.items():
        assert hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"], name
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == manifest["files"][name]["sha256"], name
    assert manifest["bits"].startswith("W4A4") and manifest["versions"]["brevitas"] == "0.13.4"


def test_existing_output_is_refused(compiled):
    out, _ = compiled
    proc = run("compile", "--target", "fpga", "--out", str(out))
    assert proc.returncode == 8 and one_line_error(proc) and "--force" in proc.stderr


def test_unknown_target(tmp_path):
    proc = run("compile", "--target", "nosuch", "--out", str(tmp_path / "o"))
    assert proc.returncode == 5 and one_line_error(proc)
    assert "fpga-pynq-z1" in proc.stderr and "fpga-zcu104" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_bad_stage_is_one_line(tmp_path):
    proc = run("compile", "--target", "fpga", "--stages", "W4A4,W9A9", "--out", str(tmp_path / "o"))
    assert proc.returncode == 5 and one_line_error(proc) and "'W9A9'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_data(tmp_path):
    proc = run("compile", "--target", "fpga", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 3 and one_line_error(proc) and "dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10])
def test_unreadable_weights(tmp_path, content):
    w = tmp_path / "w.safetensors"
    w.write_bytes(content)
    proc = run("compile", "--target", "fpga", "--weights", str(w), "--out", str(tmp_path / "o"))
    assert proc.returncode == 4 and one_line_error(proc)


def test_pickle_with_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    w = tmp_path / "w.pt"
    w.write_bytes(pickle.dumps({"x": Evil()}))
    proc = run("compile", "--target", "fpga", "--weights", str(w), "--out", str(tmp_path / "o"))
    assert proc.returncode == 4 and one_line_error(proc)
    assert not marker.exists()


def test_targets_json():
    proc = run("targets", "--json")
    assert proc.returncode == 0
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert {"fpga-pynq-z1", "fpga-zcu104"} <= names


def test_model_with_wrong_input_or_output_is_refused(tmp_path):
    proc = run("compile", "--target", "fpga", "--model", "torch.nn:Identity", "--out", str(tmp_path / "o"))
    assert proc.returncode == 4 and one_line_error(proc) and "expected" in proc.stderr


def test_brevitas_layer_with_int32_bias_and_float_input_is_named(tmp_path):
    # shared/cases 7: a first layer fed raw pixels with an int32-quantized bias and no input quantizer
    (tmp_path / "case7.py").write_text(
        "import torch\nfrom torch import nn\nimport brevitas.nn as qnn\nfrom brevitas.quant import Int32Bias\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = qnn.QuantConv2d(1, 8, 3, bias=True, bias_quant=Int32Bias, weight_bit_width=4)\n"
        "        self.pool = nn.AdaptiveMaxPool2d(1)\n"
        "        self.fc = nn.Linear(8, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))\n"
        "def make():\n    return M().eval()\n")
    proc = subprocess.run([sys.executable, "-m", "pfq_edge", "compile", "--target", "fpga", "--model", "case7:make",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                          env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 4 and one_line_error(proc) and "layer 'conv'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_interrupt_exits_130_and_leaves_nothing(tmp_path):
    import signal
    import time

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "pfq_edge", "compile", "--target", "fpga", "--epochs", "0",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, code, words", [
    (["--pfq-rule", "sigma"], 5, "pfq.rule"),
    (["--weight-bits", "9"], 5, "quant.weight_bit_width"),
    (["--granularity", "per-layer"], 5, "quant.weight_granularity"),
    (["--distill", "1.5"], 5, "finetune.distill_alpha"),
    (["--val-images", "60000"], 5, "validation_images"),
    (["--resume"], 2, "--checkpoint"),
])
def test_bad_workflow_options_give_one_line(tmp_path, args, code, words):
    proc = run("compile", "--target", "fpga", "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == code and one_line_error(proc) and words in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_checkpoint_that_is_a_folder_is_refused(tmp_path):
    proc = run("compile", "--target", "fpga", "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path))
    assert proc.returncode == 8 and one_line_error(proc) and "directory" in proc.stderr


def test_resume_continues_the_run_and_refuses_another(tmp_path):
    ckpt = tmp_path / "ck" / "qat.pt"
    base = ["compile", "--target", "fpga", "--epochs", "1", "--train-samples", "512", "--checkpoint", str(ckpt),
            "--val-images", "500", "--json"]
    first = run(*base, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert ckpt.is_file()
    again = run(*base, "--resume", "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "b"))
    assert b["stages"]["finetune"]["resumed_after_epoch"] == 1 and a["stages"]["finetune"]["resumed_after_epoch"] == 0
    assert b["stages"]["accuracy"]["finetuned"] == a["stages"]["accuracy"]["finetuned"]
    assert a["stages"]["finetune"]["validation_top1"] == b["stages"]["finetune"]["validation_top1"]
    other = run(*base, "--resume", "--weight-bits", "3", "--out", str(tmp_path / "c"))
    assert other.returncode == 4 and one_line_error(other) and "another run" in other.stderr
    assert not (tmp_path / "c").exists()


def test_analyze_rules_differ_on_the_adam_wide_model():
    counts = {}
    for rule in ("exact", "bn-epsilon"):
        proc = run("analyze", "fashion-dscnn-wide-adam", "--rule", rule, "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["rule"] == rule
        counts[rule] = doc["constant_total"]
    assert counts["exact"] == 6 and counts["bn-epsilon"] > counts["exact"]
    bad = run("analyze", "fashion-dscnn-wide-adam", "--rule", "sigma")
    assert bad.returncode == 2 and one_line_error(bad)


def test_list_steps_names_every_step_of_a_target():
    proc = run("compile", "--target", "fpga", "--list-steps")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == ("fpga-pynq-z1: load → prune → quantize → finetune → export → estimate → "
                                           "package")
    assert "Golden checks: export." in proc.stdout
    steps = json.loads(run("compile", "--target", "cpu-aarch64", "--list-steps", "--json").stdout)
    assert [s["step"] for s in steps["cpu-aarch64"]] == ["load", "prune", "quantize", "finetune", "export", "build",
                                                         "measure", "package"]
    assert steps["cpu-aarch64"][5]["golden"] == ["tvm build"] and steps["cpu-aarch64"][5]["requires"] == ["export"]
    misspelt = run("compile", "--target", "fpga", "--list-steps", "--to-step", "finetun")
    assert one_line_error(misspelt) and "'finetun' is not a step" in misspelt.stderr and not misspelt.stdout


def test_stop_after_finetune_then_resume_gives_the_same_package(compiled, tmp_path):
    # the `compiled` fixture ran the same inputs without stopping
    out = tmp_path / "qat"
    args = ["compile", "--target", "fpga", "--epochs", "1", "--train-samples", "512", "--out", str(out)]
    stopped = run(*args, "--to-step", "finetune", "--json")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert json.loads(stopped.stdout)["next_step"] == "export"
    assert {p.name for p in (out / "steps").iterdir()} == {"state.json", "quantized.safetensors",
                                                           "finetuned.safetensors"}
    assert not list(out.glob("*.tar.gz")) and not (out / "model.qonnx.onnx").exists()
    saved = out / "steps" / "finetuned.safetensors"
    original = saved.read_bytes()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved))
    tensors[next(k for k in tensors if k.endswith("weight"))].zero_()  # valid file, other weights
    save_file(tensors, str(saved))
    tampered = run(*args, "--from-step", "export")
    assert tampered.returncode == 2 and one_line_error(tampered), tampered.stderr
    assert "finetuned.safetensors is missing or does not match its sha256" in tampered.stderr
    saved.write_bytes(original)
    resumed = run(*args, "--from-step", "export")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    package = next(compiled[0].glob("*.tar.gz")).name
    assert (out / package).read_bytes() == (compiled[0] / package).read_bytes()
    assert (out / "report.json").read_bytes() == (compiled[0] / "report.json").read_bytes()
    # resuming with inputs the reused steps depend on changed is refused, naming the difference; nothing changes
    before = (out / package).read_bytes()
    other = run(*args[:-2], "--train-samples", "256", "--out", str(out), "--from-step", "estimate")
    assert other.returncode == 2 and one_line_error(other), other.stderr
    assert "finetune.train_samples was 512, now 256" in other.stderr
    assert (out / package).read_bytes() == before
    # ... while a setting that only later steps read may change: FINN again for another folding goal, no QAT
    from pfq_edge.targets.profile import load_profile

    profile = tmp_path / "faster.toml"
    profile.write_text(Path(load_profile("fpga").source).read_text().replace("target_fps = 10000",
                                                                             "target_fps = 15000"))
    refold = run("compile", "--target", str(profile), *args[3:], "--from-step", "estimate", "--json")
    assert refold.returncode == 0, refold.stderr[-2000:]
    fps = {json.loads((d / "report.json").read_text())["summary"]["throughput_fps"] for d in (out, compiled[0])}
    assert len(fps) == 2 and "finetune" not in json.loads((out / "run.json").read_text())["timings_s"]


@pytest.mark.parametrize("args, words", [
    (["--to-step", "synthesis"], "'synthesis' is not a step of 'fpga-pynq-z1'; its steps: load, prune"),
    (["--from-step", "export"], "holds no steps/ to resume from"),
    (["--to-step", "quantize", "--from-step", "export"], "comes before --from-step"),
    (["--target", "fpga,cpu-aarch64", "--to-step", "finetune"], "apply to one target; 2 targets given"),
])
def test_bad_step_options_give_one_line(tmp_path, args, words):
    target = [] if "--target" in args else ["--target", "fpga"]
    proc = run("compile", *target, "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2 and one_line_error(proc) and words in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_resume_notices_a_factory_whose_code_changed(tmp_path):
    # `module:factory` is named the same after its code changed: the loaded model's state dict is compared too
    source = "import torch\nfrom pfq_edge.zoo import fashion_dscnn\n\ndef net():\n    torch.manual_seed(SEED)\n" \
             "    return fashion_dscnn((8, 16, 16)).eval()\n"
    (tmp_path / "mynets.py").write_text(source.replace("SEED", "0"))
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    args = [sys.executable, "-m", "pfq_edge", "compile", "--target", "fpga", "--model", "mynets:net", "--epochs", "0",
            "--out", str(tmp_path / "o")]
    first = subprocess.run([*args, "--to-step", "prune"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "mynets.py").write_text(source.replace("SEED", "1"))
    again = subprocess.run([*args, "--from-step", "quantize"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and one_line_error(again) and "compiled from another model" in again.stderr, \
        again.stderr
    assert (tmp_path / "o" / "steps" / "state.json").is_file() and not (tmp_path / "o" / "report.json").exists()
