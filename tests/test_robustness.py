"""Bad input and hostile conditions, as a user meets them (issue 6 item 6): models that cannot be traced or use
layers pfq-edge does not handle, truncated weights, a compile killed with SIGKILL, a golden check that fails, and
several targets in one compile."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import ENV, one_line_error, run

MODELS = '''
import torch
from torch import nn


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if y.sum() > 0:  # data-dependent control flow
            y = y * 2
        return self.fc(y.amax(dim=(2, 3)))


class WithGru(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.rnn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GRU(8, 10, batch_first=True)

    def forward(self, x):
        return self.rnn(torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2))[0][:, -1]


def data_dependent():
    return DataDependent().eval()


def with_gru():
    return WithGru().eval()


def tiny_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(1.0)
        model[1].running_var[0] = 1e-7  # below eps = 1e-5, yet the channel varies with the input
        model[1].weight.fill_(1.0)
    return model
'''


@pytest.mark.parametrize("factory, words", [("data_dependent", "cannot trace"),
                                            ("with_gru", "layer 'rnn' (GRU) is not supported")])
def test_untraceable_model_or_unsupported_layer_is_one_line(tmp_path, factory, words):
    (tmp_path / "models6.py").write_text(MODELS)
    proc = subprocess.run([sys.executable, "-m", "pfq_edge", "compile", "--target", "fpga", "--epochs", "0",
                           "--model", f"models6:{factory}", "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=600, env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 4 and one_line_error(proc) and words in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_truncated_weights_are_refused(tmp_path):
    from pfq_edge.zoo import WEIGHTS_DIR

    data = (WEIGHTS_DIR / "fashion-dscnn.safetensors").read_bytes()
    w = tmp_path / "cut.safetensors"
    w.write_bytes(data[:len(data) // 2])
    proc = run("compile", "--target", "fpga", "--weights", str(w), "--out", str(tmp_path / "o"))
    assert proc.returncode == 4 and one_line_error(proc) and "cut.safetensors" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_compile_killed_with_sigkill_leaves_no_package_and_the_rerun_succeeds(tmp_path):
    out = tmp_path / "o"
    args = [sys.executable, "-m", "pfq_edge", "compile", "--target", "fpga", "--epochs", "0", "--out", str(out)]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".o.*.partial")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # well into the stages
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() and not list(tmp_path.glob("**/*.tar.gz"))  # nothing half-written where users look
    again = run("compile", "--target", "fpga", "--epochs", "0", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert run("verify", str(next(out.glob("*.tar.gz")))).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # the killed run's staging folder is gone


def test_a_failing_golden_check_stops_the_compile_loudly(tmp_path):
    # a channel with running_var below BN's epsilon that still carries signal: the bn-epsilon rule replaces it by
    # its mean, the data guard (pruned vs original on the calibration images) must fail the compile
    (tmp_path / "models6.py").write_text(MODELS)
    proc = subprocess.run([sys.executable, "-m", "pfq_edge", "compile", "--target", "fpga", "--epochs", "0",
                           "--pfq-rule", "bn-epsilon", "--model", "models6:tiny_variance", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=600,
                          env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 6 and one_line_error(proc) and "golden check" in proc.stderr, proc.stderr
    assert "data guard" in proc.stderr and not (tmp_path / "o").exists()


def test_several_targets_share_one_fine_tuning_per_setting(tmp_path):
    out = tmp_path / "multi"
    proc = run("compile", "--target", "fpga,cpu-aarch64,gpu-cuda", "--epochs", "1", "--train-samples", "256",
               "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert [t["target"] for t in result["targets"]] == ["fpga-pynq-z1", "cpu-aarch64", "gpu-cuda"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["targets"]) == 3 and (out / "summary.md").is_file() and (out / "accuracy_size.png").is_file()
    runs = {t: json.loads((out / t / "run.json").read_text())["timings_s"] for t in ("cpu-aarch64", "gpu-cuda")}
    reports = {t: json.loads((out / t / "report.json").read_text()) for t in ("fpga-pynq-z1", "cpu-aarch64",
                                                                              "gpu-cuda")}
    # cpu-aarch64 and gpu-cuda are both W8A8: one fine-tuning run (same timing, same loss); the W4A4 FPGA has its own
    assert runs["cpu-aarch64"]["finetune"] == runs["gpu-cuda"]["finetune"]
    loss = {t: r["stages"]["finetune"]["loss"] for t, r in reports.items()}
    assert loss["cpu-aarch64"] == loss["gpu-cuda"] != loss["fpga-pynq-z1"]
    for t in reports:
        assert run("verify", str(next((out / t).glob("*.tar.gz")))).returncode == 0
    text = (out / "summary.md").read_text()
    assert "FINN estimate" in text and "not measured (cross-compiled)" in text


def test_a_target_named_twice_is_refused(tmp_path):
    proc = run("compile", "--target", "fpga,fpga-pynq-z1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 5 and one_line_error(proc) and "named twice" in proc.stderr


@pytest.fixture(scope="module")
def exported_wide(tmp_path_factory):
    """The Adam-trained wide zoo model (6 constant filters) as a torch.export archive."""
    import torch

    from pfq_edge.zoo import load_model

    path = tmp_path_factory.mktemp("pt2") / "wide.pt2"
    model = load_model("fashion-dscnn-wide-adam").module
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)), str(path))
    return path


def test_torch_export_archive_is_a_model_input(exported_wide, images):
    import torch

    from pfq_edge.pfq.analyze import analyze_pfq
    from pfq_edge.zoo import load_model

    loaded, zoo = load_model(str(exported_wide)), load_model("fashion-dscnn-wide-adam")
    assert loaded.input_shape == (1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.module(images), zoo.module(images))
    removed = [analyze_pfq(m.module, images[:1])[1].plan.filters_removed for m in (loaded, zoo)]
    assert removed[0] == removed[1] == 12  # PfQ finds the same constant filters in the rebuilt modules
    from pfq_edge.quantize import calibrate, quantize_model
    from pfq_edge.targets.profile import QuantSpec

    quantized = []
    for m in (loaded, zoo):  # and Brevitas quantizes the rebuilt model exactly like the original
        q = quantize_model(m.module, QuantSpec())
        calibrate(q, images)
        with torch.no_grad():
            quantized.append(q(images))
    assert torch.equal(quantized[0], quantized[1])
    proc = run("analyze", str(exported_wide), "--channel-multiple", "1", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["filters_removed"] == 12


def _cat_add_mean(add_the_concat: bool = False):
    """Two branches concatenated, two convs of the concat added, a spatial mean: what a user's .pt2 holds as aten
    calls. ``add_the_concat``: the add takes the concat's output itself, which Brevitas cannot align."""
    import torch
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    class CatAddMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.fc = block(1, 8), block(1, 8), block(16, 16), block(16, 16), \
                nn.Linear(16, 10)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], dim=1)
            return self.fc((self.c(y) + (y if add_the_concat else self.d(y))).mean((2, 3)))

    torch.manual_seed(0)
    return CatAddMean().eval()


@pytest.mark.parametrize("name", ["fashion-resnet", "cat-add-mean"])
def test_a_torch_export_archive_with_adds_and_concats_quantizes_like_the_eager_model(name, tmp_path, images):
    """User report: a .pt2 ResNet hung in FINN's streamlining and a .pt2 concat was not mapped, while the same
    eager models compiled: the archive's aten.add / aten.cat / aten.mean reached Brevitas, which requantizes only
    operator.add / torch.cat inputs. The rebuilt model must quantize exactly like the eager one."""
    import operator

    import torch

    from pfq_edge.quantize import calibrate, quantize_model
    from pfq_edge.targets.profile import QuantSpec
    from pfq_edge.zoo import load_model

    eager = load_model(name).module if name != "cat-add-mean" else _cat_add_mean()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(eager, (torch.zeros(1, 1, 28, 28),)), str(path))
    rebuilt = load_model(str(path)).module
    targets = {n.target for n in rebuilt.graph.nodes if n.op in ("call_function", "call_method")}
    assert not any("aten" in str(t) for t in targets), targets
    assert operator.add in targets and (name == "fashion-resnet" or {torch.cat, "mean"} <= targets)
    q = quantize_model(rebuilt, QuantSpec())
    for add in (n for n in q.graph.nodes if n.target is operator.add):  # both inputs requantized to one scale
        assert all(x.op == "call_module" and type(q.get_submodule(x.target)).__module__.startswith("brevitas")
                   for x in add.all_input_nodes), add.format_node()
    if name == "fashion-resnet":  # its eager code calls torch.relu, which Brevitas leaves float: not the same graph
        return
    outputs = []
    for m in (rebuilt, eager):
        q = quantize_model(m, QuantSpec())
        calibrate(q, images)
        with torch.no_grad():
            outputs.append(q(images))
    assert torch.equal(outputs[0], outputs[1])


def test_an_add_of_a_concat_output_is_refused_in_one_line_not_looped(tmp_path):
    """Found with such a model: Brevitas' scale alignment of adds and concats has no solution when an add takes a
    concat's output, and it retried up to 9,999 whole-graph passes (hours). pfq-edge caps the passes and names it."""
    import torch

    model = _cat_add_mean(add_the_concat=True)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)), str(path))
    started = time.monotonic()
    proc = run("compile", "--target", "cpu", "--model", str(path), "--epochs", "0", "--out", str(tmp_path / "o"))
    assert proc.returncode == 4 and one_line_error(proc) and "concat's output" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - started < 300 and not (tmp_path / "o").exists()


def test_torch_export_archive_with_code_in_a_pickle_is_refused(tmp_path):
    import zipfile

    import torch
    from torch.export.pt2_archive import _package

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    saved = _package._should_use_pickle
    _package._should_use_pickle = lambda t: True  # weights stored as pickles, which torch.export.load unpickles
    try:
        good = tmp_path / "good.pt2"
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
        model(torch.zeros(1, 1, 28, 28))
        torch.export.save(torch.export.export(model.eval(), (torch.zeros(1, 1, 28, 28),)), str(good))
    finally:
        _package._should_use_pickle = saved
    import pickle

    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, pickle.dumps(Evil()) if item.filename.endswith("weights/weight_0") else data)
    proc = run("analyze", str(bad))
    assert proc.returncode == 4 and one_line_error(proc) and "bad.pt2" in proc.stderr, proc.stderr
    assert not marker.exists()
    (tmp_path / "truncated.pt2").write_bytes(good.read_bytes()[:3000])
    (tmp_path / "garbage.pt2").write_text("not an archive")
    for name in ("truncated.pt2", "garbage.pt2"):
        proc = run("analyze", str(tmp_path / name))
        assert proc.returncode == 4 and one_line_error(proc) and name in proc.stderr, proc.stderr


@pytest.mark.parametrize("then", ["carries on", "reports a failure"])
def test_ctrl_c_swallowed_by_a_tool_still_interrupts_the_compile(then, monkeypatch):
    # FINN's build_dataflow turns KeyboardInterrupt into a failed build; a torch.onnx export error makes us retry
    # with the other exporter. Seen: SIGINT 18 s into an FPGA compile exited 7, and once a compile finished (exit 0).
    from pfq_edge import interrupt
    from pfq_edge.compilation import Compilation, CompileConfig
    from pfq_edge.errors import ToolchainError
    from pfq_edge.pipeline import run_steps
    from pfq_edge.steps import Step
    from pfq_edge.targets.profile import load_profile

    monkeypatch.setattr(interrupt, "_received", None)
    ran = []

    def stage_tool(state):
        try:
            interrupt._handler(signal.SIGINT, None)  # what Ctrl-C does inside the tool
        except KeyboardInterrupt:
            pass
        if then == "reports a failure":
            raise ToolchainError("FINN estimate build failed: no error message in the log")
        return state

    def stage_next(state):
        ran.append("next")
        return state

    c = Compilation(config=CompileConfig("m", "fpga", Path("o")), profile=load_profile("fpga"), work=Path("."),
                    final=Path("o"))
    with pytest.raises(KeyboardInterrupt):
        run_steps(c, [Step("tool", stage_tool), Step("next", stage_next)])
    assert ran == [] and "tool" not in c.results


def test_a_model_file_names_the_package_by_its_stem():
    """User report: a .pt2 model gave pfq-edge--tmp-mine-resnet_dead.pt2-fpga-pynq-z1.tar.gz."""
    from pfq_edge.steps import _slug

    assert _slug("/tmp/mine/resnet_dead.pt2") == "resnet_dead" and _slug("out/pruned.safetensors") == "pruned"
    assert _slug("fashion-dscnn") == "fashion-dscnn" and _slug("mymodels:resnet_tiny") == "mymodels-resnet_tiny"
