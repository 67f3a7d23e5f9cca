"""`pfq-edge analyze` / `pfq-edge prune` as a user runs them, and the pruned model file round trip."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import plant_constant
from pfq_edge.pfq.analyze import analyze_pfq
from pfq_edge.export.pruned import save_pruned
from pfq_edge.zoo import load_model


def run(*args):
    return subprocess.run([sys.executable, "-m", "pfq_edge", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture()
def planted_weights(tmp_path):
    """The shipped model with 4 dead and 2 positive-constant filters, saved as safetensors."""
    from safetensors.torch import save_file

    model = load_model("fashion-dscnn-adam").module
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    plant_constant(convs[4], bns[4], [0, 1, 2, 3], [-0.1, -0.2, -0.3, -0.4])
    plant_constant(convs[6], bns[6], [5, 6], [0.2, 0.4])
    path = tmp_path / "planted.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_analyze_json_and_plot(planted_weights, tmp_path):
    plot = tmp_path / "ranges.png"
    proc = run("analyze", "pfq_edge.zoo:fashion_dscnn", "--weights", str(planted_weights), "--bits", "3",
               "--channel-multiple", "1", "--plot", str(plot), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    # layer 12's four (ReLU(β < 0) = 0) go; layer 18's two (β > 0) reach the zero-padded depthwise conv 21:
    # neutralized, so that the borders keep their values
    assert doc["bits"] == 3 and doc["constant_total"] == 6 and doc["constant_removed"] == 4
    rows = {r["layer"]: r for r in doc["layers"]}
    assert rows["12"]["constant_filters"] == 4 and rows["12"]["channels_after"] == 124
    assert rows["15"]["channels_after"] == 124  # the depthwise conv behind them
    assert rows["18"]["channels_after"] == 128 and rows["18"]["neutralized_filters"] == 2
    left = {x["layer"]: x for x in doc["constant_left"]}
    assert left["18"]["filters"] == 2 and "zero padding in the zero-padded depthwise conv '21'" in left["18"]["reason"]
    # --at-padding remove (shared case 1): layer 18's two go as well, with the depthwise filters behind them, and
    # the removal is no longer exact (borders change); prune --check measures by how much
    removing = json.loads(run("analyze", "pfq_edge.zoo:fashion_dscnn", "--weights", str(planted_weights),
                              "--channel-multiple", "1", "--at-padding", "remove", "--json").stdout)
    assert removing["constant_removed"] == 6 and not removing["exact"] and not removing["neutralized"]
    assert {r["layer"]: r["channels_after"] for r in removing["layers"]}["21"] == 126
    text = run("analyze", "pfq_edge.zoo:fashion_dscnn", "--weights", str(planted_weights), "--channel-multiple", "1")
    assert "removal: exact" in text.stdout and "2 neutralized" in text.stdout and "2 at zero padding" in text.stdout
    # by default analyze plans what `compile --target fpga` does: 128 − 4 is no multiple of 8, so those 4 stay too
    fpga = json.loads(run("analyze", "pfq_edge.zoo:fashion_dscnn", "--weights", str(planted_weights), "--json").stdout)
    assert fpga["channel_multiple"] == 8 and fpga["constant_removed"] == 0
    assert sorted(n["why"] for n in fpga["neutralized"]) == ["folding", "zero padding"]
    assert [n["why"] for n in doc["neutralized"]] == ["zero padding"]
    r = rows["12"]
    assert r["step_before"] == pytest.approx(r["folded_max_abs_before"] / 3)  # 3-bit symmetric: 2^2 - 1 levels
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_writes_a_model_that_reloads_exactly(planted_weights, tmp_path, images):
    out = tmp_path / "pruned.safetensors"
    proc = run("prune", "pfq_edge.zoo:fashion_dscnn", "--weights", str(planted_weights), "-o", str(out),
               "--check", "300", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["filters_removed"] == 8 and doc["constant_total"] == 6 and doc["exact"]
    assert doc["check"]["images"] == 300 and doc["check"]["argmax_agreement"] == 1.0
    assert doc["check"]["max_abs_diff"] <= 1e-4  # judged as compile judges rule exact
    from pfq_edge.errors import ModelError

    with pytest.raises(ModelError, match="name it yourself"):  # a data file alone never imports user code
        load_model(str(out))
    reloaded = load_model("pfq_edge.zoo:fashion_dscnn", weights=out).module
    original = load_model("pfq_edge.zoo:fashion_dscnn", weights=planted_weights).module
    pruned, _ = analyze_pfq(original, images[:1])
    with torch.no_grad():
        assert torch.equal(reloaded(images), pruned(images))
    assert reloaded[12].out_channels == 124 and reloaded[18].out_channels == 128
    # the reloaded model is analysed like any other: only the two neutralized filters are still constant
    proc = run("analyze", "pfq_edge.zoo:fashion_dscnn", "--weights", str(out), "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["constant_total"] == 2 and doc["filters_removed"] == 0


def test_prune_refuses_bad_output_name(tmp_path):
    proc = run("prune", "fashion-dscnn", "-o", str(tmp_path / "x.pt"))
    assert proc.returncode == 8 and proc.stderr.startswith("pfq-edge: error:") and ".safetensors" in proc.stderr


def test_plain_safetensors_is_not_a_pruned_model(tmp_path):
    from pfq_edge.errors import ModelError
    from pfq_edge.zoo import WEIGHTS_DIR

    with pytest.raises(ModelError, match="not a pfq-edge pruned model"):
        load_model(str(WEIGHTS_DIR / "fashion-dscnn.safetensors"))


def test_save_pruned_records_spec_and_structure(tmp_path, images):
    from pfq_edge.zoo import pruned_metadata

    model = load_model("fashion-dscnn-adam").module
    pruned, analysis = analyze_pfq(model, images[:1])
    path = save_pruned(pruned, analysis.plan, "fashion-dscnn-adam", tmp_path / "p.safetensors")
    meta = pruned_metadata(path)
    assert meta["model"] == "fashion-dscnn-adam" and json.loads(meta["structure"])["out"] == {}


def test_prune_check_keeps_borders_exact_and_refuses_a_bad_approximation(tmp_path):
    """A positive constant into a 3×3 padded conv: rule exact neutralizes it (the function kept, check passes). Rule
    bn-epsilon on σ² ≤ ε filters that carry signal replaces them by β; --check refuses that, as compile would."""
    (tmp_path / "borderly.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                      nn.Conv2d(4, 10, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten()).eval()\n"
        "    with torch.no_grad():\n"
        "        m[0].weight[0] = 0\n"
        "        m[1].running_mean[0], m[1].running_var[0], m[1].bias[0] = 0.0, 0.0, 50.0\n"
        "    return m\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = tmp_path / "p.safetensors"

    def prune(*args):
        return subprocess.run([sys.executable, "-m", "pfq_edge", "prune", *args, "-o", str(out), "--check", "300"],
                              capture_output=True, text=True, timeout=300, env=env)

    proc = prune("borderly:make")
    assert proc.returncode == 0, proc.stderr
    assert "removal: exact" in proc.stdout and "1 neutralized" in proc.stdout and "top-1 agreement 100.00%" in proc.stdout
    out.unlink()
    model = load_model("fashion-dscnn-adam").module
    with torch.no_grad():
        model[13].running_var[:3] = 1e-6  # σ² ≤ ε, yet informative: the BN amplifies them
    weights = tmp_path / "informative.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    proc = prune("pfq_edge.zoo:fashion_dscnn", "--weights", str(weights), "--rule", "bn-epsilon")
    assert proc.returncode == 6 and proc.stderr.startswith("pfq-edge: error: golden check") and "98%" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("head,removed", [
    ("x.view(x.size(0), -1)", True), ("x.reshape(x.shape[0], -1)", True), ("x.mean((2, 3))", True),
    ("F.adaptive_avg_pool2d(x, 1).flatten(1)", True), ("x.view(-1, 4 * 28 * 28)", False)])
def test_heads_written_in_many_ways(tmp_path, head, removed, images):
    import torch.nn.functional as F  # noqa: F401  (used by the heads)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 if "28" not in head else 4 * 28 * 28, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            if "adaptive" not in head and "mean" not in head and "view(-1" not in head:
                x = F.adaptive_max_pool2d(x, 1)
            return self.fc(eval(head))

    torch.manual_seed(0)
    model = Net().eval()
    plant_constant(model.conv, model.bn, [2], [0.8])
    pruned, a = analyze_pfq(model, images[:1])
    assert (a.plan.filters_removed == 1) is removed and a.constant_removed + len(a.plan.neutralized) >= 1
    with torch.no_grad():
        assert torch.allclose(pruned(images), model(images), atol=1e-5)


def test_prune_creates_the_output_folder_and_foreign_weights_get_a_short_line(tmp_path):
    out = tmp_path / "new" / "folder" / "p.safetensors"
    proc = run("prune", "fashion-dscnn", "-o", str(out))
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    from pfq_edge.zoo import WEIGHTS_DIR

    proc = run("analyze", "pfq_edge.zoo:fashion_dscnn", "--weights",
               str(WEIGHTS_DIR / "efficientnet-lite0-fmnist-head.safetensors"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4 and len(lines) == 1 and len(lines[0]) < 300
    assert "missing (e.g." in lines[0] and "unexpected (e.g." in lines[0]


@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_a_wrong_input_shape_is_one_line_naming_the_cause(command, tmp_path):
    """User report: --input-shape with the wrong channel count printed torch.fx ShapeProp's traceback and a cut-off
    node dump instead of the cause."""
    out = ["--out", str(tmp_path / "p.safetensors")] if command == "prune" else []
    proc = run(command, "fashion-dscnn", "--input-shape", "3,28,28", *out)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 4 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "expected input[1, 3, 28, 28] to have 1 channels" in lines[0]
    assert not (tmp_path / "p.safetensors").exists()


def test_prune_at_padding_remove_is_checked_like_an_approximation(planted_weights, tmp_path):
    """--at-padding remove: the two positive constants that meet layer 21's zero padding go too; the borders then
    change (measured: max |Δlogit| 1.79, top-1 agreement 99 % on 300 images), so --check judges it by agreement."""
    out = tmp_path / "p.safetensors"
    proc = run("prune", "pfq_edge.zoo:fashion_dscnn", "--weights", str(planted_weights), "--channel-multiple", "1",
               "--at-padding", "remove", "--check", "300", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert not doc["exact"] and doc["check"]["passed"] and doc["check"]["atol"] is None
    assert 0.98 <= doc["check"]["argmax_agreement"] < 1.0 and doc["check"]["max_abs_diff"] > 1e-3
    assert out.is_file()
