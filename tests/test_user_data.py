"""A user's own model and data end to end: a 3×32×32 RGB CNN with 5 classes from an image folder (Fashion-MNIST
written as RGB PNGs) through analyze, prune, compile --target fpga and --target cpu, and the CPU package's run.py
on the folder's test split; scikit-learn's digits (8×8) as .npz into FPGA."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from userdata import digits_npz, fashion_folder, train_weights

USERLAND = Path(__file__).resolve().parents[1] / "examples" / "userland"
ENV = {**os.environ, "PFQ_EDGE_QUIET": "1"}
NORM = ["--mean", "0.29", "--std", "0.35"]


def run(*args):
    # from the user's project folder: module:factory imports from the working directory
    return subprocess.run([sys.executable, "-m", "pfq_edge", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=USERLAND, timeout=900)


def one_line_error(proc, code=3):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return proc.returncode == code and len(lines) == 1 and lines[0].startswith("pfq-edge: error:")


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """(image folder, trained weights) of the 5-class 3×32×32 RGB model."""
    from pfq_edge.datasets import make_spec
    from user_models import rgb_net

    root = tmp_path_factory.mktemp("user")
    folder = fashion_folder(root / "clothes", 60, 12, size=32, rgb=True)
    weights = train_weights(rgb_net, make_spec(str(folder), mean=(0.29,), std=(0.35,)), root / "rgb5.safetensors",
                            epochs=4)
    return folder, weights


def test_compile_fpga_from_an_image_folder(rgb, tmp_path):
    folder, weights = rgb
    out = tmp_path / "fpga"
    proc = run("compile", "--target", "fpga", "--model", "user_models:rgb_net", "--weights", weights, "--data",
               folder, *NORM, "--epochs", "0", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    load = report["stages"]["load"]
    assert (load["train_images"], load["test_images"]) == (300, 60)
    assert load["dataset"]["kind"] == "image-folder" and load["dataset"]["input_shape"] == [3, 32, 32]
    with tarfile.open(next(out.glob("*.tar.gz"))) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(next(n for n in names if n.endswith("manifest.json"))))
        readme = tar.extractfile(next(n for n in names if n.endswith("README.md"))).read().decode()
    assert "top-1 (60 test images)" in readme and "convert to 3 channel(s)" in readme
    assert "The accelerator takes UINT8 pixels (N, 3, 32, 32)" in readme and "mean [0.29, 0.29, 0.29]" in readme
    assert manifest["classes"] == ["Coat", "Dress", "Pullover", "T-shirt-top", "Trouser"]
    assert manifest["runtime"]["input_shape"] == [3, 32, 32]
    assert manifest["runtime"]["accelerator_input"].startswith("UINT8 pixels (N, 3, 32, 32)")
    assert manifest["model"]["input_normalization"]["mean"] == [0.29] * 3
    assert manifest["dataset"]["images"]["test"] == 60 and len(manifest["dataset"]["sha256"]) == 64
    assert any(n.endswith("finn_build/finn_steps.py") for n in names)
    acc = manifest["accuracy"]
    assert acc["float"] > 0.6 and abs(acc["quantized_ptq"] - acc["float"]) < 0.1  # 5 classes: chance is 0.2


def test_compile_cpu_and_run_py_reproduces_deployed_top1(rgb, tmp_path):
    folder, weights = rgb
    out = tmp_path / "cpu"
    proc = run("compile", "--target", "cpu", "--model", "user_models:rgb_net", "--weights", weights, "--data",
               folder, *NORM, "--epochs", "1", "--out", out, "--json")
    assert proc.returncode in (0, 9), proc.stderr[-2000:]  # 9: latency budget missed, output complete
    with tarfile.open(next(out.glob("*.tar.gz"))) as tar:
        tar.extractall(tmp_path / "pkg", filter="data")
    pkg = next(p.parent for p in (tmp_path / "pkg").rglob("manifest.json"))
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["accuracy"]["finetuned"] > 0.6
    ran = subprocess.run([sys.executable, "run.py", str(folder / "test"), "--json"], capture_output=True,
                         text=True, cwd=pkg, timeout=300)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["images"] == 60 and result["top1"] == pytest.approx(manifest["accuracy"]["deployed"], abs=1e-9)
    one = subprocess.run([sys.executable, "run.py", str(next((folder / "test" / "Coat").iterdir()))],
                         capture_output=True, text=True, cwd=pkg, timeout=300)
    assert one.returncode == 0 and one.stdout.split("\t")[0] == "0"


def test_analyze_and_prune_a_three_channel_model(rgb, tmp_path):
    folder, weights = rgb
    proc = run("analyze", "user_models:rgb_net", "--weights", weights, "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["layers"][0]["channels_before"] == 8
    proc = run("prune", "user_models:rgb_net", "--weights", weights, "--out", tmp_path / "p.safetensors",
               "--check", "20", "--data", folder, *NORM, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["check"]["images"] == 20


def test_data_that_does_not_fit_the_model(rgb, tmp_path):
    folder, weights = rgb
    proc = run("compile", "--target", "fpga", "--model", "user_models:rgb_net", "--model-arg", "num_classes=7",
               "--data", folder, "--epochs", "0", "--out", tmp_path / "o")
    assert one_line_error(proc) and "7 logits" in proc.stderr and "5 classes" in proc.stderr
    grey = fashion_folder(tmp_path / "grey", 4, 2, size=32)
    proc = run("compile", "--target", "fpga", "--model", "user_models:rgb_net", "--weights", weights, "--data", grey,
               "--epochs", "0", "--out", tmp_path / "o")
    assert one_line_error(proc) and "--channels 3" in proc.stderr
    proc = run("compile", "--target", "fpga", "--model", "user_models:rgb_net", "--weights", weights, "--data",
               fashion_folder(tmp_path / "big", 4, 2, size=48, rgb=True), "--epochs", "0", "--out", tmp_path / "o")
    assert one_line_error(proc) and "(2, 3, 48, 48)" in proc.stderr and "--image-size" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_whole_pickled_model_gets_a_hint(tmp_path):
    import torch

    from user_models import rgb_net

    torch.save(rgb_net(), tmp_path / "whole.pt")
    proc = run("analyze", "user_models:rgb_net", "--weights", tmp_path / "whole.pt")
    assert one_line_error(proc, 4) and "state_dict" in proc.stderr


def test_digits_npz_compiles_for_fpga(tmp_path):
    from pfq_edge.datasets import make_spec
    from user_models import digits_net

    npz = digits_npz(tmp_path / "digits.npz")
    weights = train_weights(digits_net, make_spec(str(npz)), tmp_path / "digits.safetensors", epochs=6)
    out = tmp_path / "fpga"
    proc = run("compile", "--target", "fpga", "--model", "user_models:digits_net", "--weights", weights, "--data",
               npz, "--epochs", "1", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout)["summary"]
    assert s["float_top1"] > 0.8 and s["finetuned_top1"] > 0.7


def test_efficientnet_lite0_with_a_new_head_on_an_image_folder_for_cpu(rgb, tmp_path):
    # the README's EfficientNet-Lite0 scenario, smaller: ImageNet backbone, a 5-class head trained on its features,
    # 32×32 images resized to 64×64 by the data pipeline, the user profile effnet-cpu.toml, no fine-tuning
    from pfq_edge.datasets import make_spec
    from user_models import effnet_lite0

    folder, _ = rgb
    spec = tmp_path / "effnet.toml"
    spec.write_text(f'[data]\nsource = "{folder}"\nimage_size = [64, 64]\nmean = [0.485, 0.456, 0.406]\n'
                    f'std = [0.229, 0.224, 0.225]\n')
    weights = train_weights(effnet_lite0, make_spec(str(spec)), tmp_path / "effnet.safetensors", epochs=30, head="_fc")
    out = tmp_path / "effnet"
    proc = run("compile", "--target", "effnet-cpu.toml", "--model", "user_models:effnet_lite0", "--weights", weights,
               "--data", spec, "--epochs", "0", "--out", out)
    # 9: only the profile's latency budget missed, output complete (it depends on the machine's load, not the code)
    assert proc.returncode == 0 or (proc.returncode == 9 and "budget missed" in proc.stderr), proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    acc, stages = report["stages"]["accuracy"], report["stages"]
    assert stages["load"]["dataset"]["input_shape"] == [3, 64, 64] and stages["prune"]["filters_removed"] == 130
    assert acc["float"] > 0.5 and acc["quantized_ptq"] >= acc["float"] - 0.05  # per-channel W8A8 keeps it
    assert stages["export"]["golden"]["passed"] and abs(acc["deployed"] - acc["quantized_ptq"]) <= 0.05
