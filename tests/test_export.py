"""QONNX export and the golden check, with real Brevitas and qonnx."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from conftest import randomize_bn, tiny_dscnn
from pfq_edge.errors import GoldenCheckError
from pfq_edge.export.qonnx import export_qonnx
from pfq_edge.golden import TOLERANCES, check, golden_check
from pfq_edge.runners.onnx import run_qonnx
from pfq_edge.quantize import calibrate, quantize_model
from pfq_edge.targets.profile import QuantSpec
from pfq_edge.train import predict, predict_float64

EXPORT = TOLERANCES["export"]
EXPORT_ATOL, EXPORT_MIN_AGREEMENT, EXPORT_MAX_FLIPPED = EXPORT.atol, EXPORT.min_agreement, EXPORT.max_mismatch_fraction


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images):
    qm = quantize_model(randomize_bn(tiny_dscnn()), QuantSpec())
    calibrate(qm, images)
    path = export_qonnx(qm, images[:1], tmp_path_factory.mktemp("q") / "m.onnx")
    return qm, path


def test_qonnx_execution_matches_brevitas(exported, images):
    qm, path = exported
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Quant" in ops and "Conv" in ops
    result = golden_check("export", predict(qm, images).numpy(), run_qonnx(path, images.numpy(), batch_size=50),
                          atol=1e-3)
    assert result.passed and result.max_abs_diff < 1e-4 and result.argmax_agreement == 1.0


def test_golden_check_fails_on_a_tampered_model(exported, images, tmp_path):
    qm, path = exported
    model = onnx.load(str(path))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    quant_inputs = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Quant"}
    name = next(quant_inputs[w] for w in conv_weights if w in quant_inputs)
    init = next(i for i in model.graph.initializer if i.name == name)
    w = numpy_helper.to_array(init).copy()
    init.CopyFrom(numpy_helper.from_array(-w, name))  # flip the sign of the first conv's weights
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(GoldenCheckError, match="export"):
        golden_check("export", predict(qm, images).numpy(), run_qonnx(bad, images.numpy()), atol=EXPORT_ATOL,
                     min_agreement=EXPORT_MIN_AGREEMENT, max_mismatch_fraction=EXPORT_MAX_FLIPPED)
    # the float64 arbiter does not rescue a real fault
    with pytest.raises(GoldenCheckError, match="against the float64 computation"):
        check("export", "export", predict(qm, images).numpy(), run_qonnx(bad, images.numpy()),
              exact=lambda: predict_float64(qm, images))


def test_float64_twin_computes_the_quantized_model(exported, images):
    qm, _ = exported
    exact = predict_float64(qm, images)
    assert exact.dtype == np.float64 and next(qm.parameters()).dtype == torch.float32  # a copy ran, not qm
    assert (exact.argmax(1) == predict(qm, images).numpy().argmax(1)).mean() >= 0.99


def _deep_net_logits(seed: int, exact: np.ndarray, shifted: float, flips: int) -> np.ndarray:
    """``exact`` as a float32 runtime of a deep quantized net computes it: ``shifted`` of the images moved by
    one-step flips (0.05–0.4), ``flips`` near-ties decided the other way."""
    rng = np.random.default_rng(seed)
    out = exact.astype(np.float32).copy()
    moved = rng.choice(len(out), int(shifted * len(out)), replace=False)
    out[moved] += rng.uniform(0.05, 0.4, size=(len(moved), 1)) * rng.choice([-1, 1], size=out[moved].shape)
    for i in rng.choice(len(out), flips, replace=False):
        top2 = np.argsort(out[i])[-2:]
        out[i, top2] = out[i, top2[::-1]]
    return out


def test_float64_arbiter_judges_where_float32_rounding_compounds():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(200, 5))
    exact[np.arange(200), rng.integers(0, 5, 200)] += 3
    reference = _deep_net_logits(1, exact, shifted=0.45, flips=3)   # Brevitas float32
    candidate = _deep_net_logits(2, exact, shifted=0.45, flips=2)   # onnxruntime, other sums, other flips
    calls = []

    def arbiter():
        calls.append(1)
        return exact

    with pytest.raises(GoldenCheckError):  # the float32 comparison alone refuses it
        check("export", "export", reference, candidate)
    result = check("export", "export", reference, candidate, exact=arbiter)
    assert result.passed and result.arbiter["passed"] and calls == [1]
    for who, logits in (("candidate", candidate), ("reference", reference)):
        assert result.arbiter[who]["top1_flips"] == (logits.argmax(1) != exact.argmax(1)).sum() >= 2
    # a scale fault on top of the same noise: every image off the exact logits by more than the reference is
    with pytest.raises(GoldenCheckError, match="against the float64 computation"):
        check("export", "export", reference, candidate * 1.5, exact=arbiter)
    # where float32 agrees, the arbiter is never computed
    calls.clear()
    assert check("export", "export", reference, reference.copy(), exact=arbiter).arbiter is None and not calls


def test_golden_check_tolerates_rare_flips_but_not_systematic_error():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 10)).astype(np.float32)
    ref[np.arange(200), rng.integers(0, 10, 200)] += 5  # a clear winner per image
    flipped = ref.copy()
    flipped[:10, 3] += 0.3  # one-step flips in 5% of the images; top-1 unchanged
    ok = golden_check("export", ref, flipped, atol=EXPORT_ATOL, min_agreement=EXPORT_MIN_AGREEMENT,
                      max_mismatch_fraction=EXPORT_MAX_FLIPPED)
    assert ok.passed and ok.mismatched_images == 10 and ok.max_abs_diff == pytest.approx(0.3, rel=1e-5)
    with pytest.raises(GoldenCheckError):
        golden_check("export", ref, ref * 1.01, atol=EXPORT_ATOL, min_agreement=EXPORT_MIN_AGREEMENT,
                     max_mismatch_fraction=EXPORT_MAX_FLIPPED)  # every image off: a scale bug
    with pytest.raises(GoldenCheckError):
        golden_check("prune", ref, flipped, atol=1e-4)  # an exact stage allows no flip


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("bias", [True, False])
def test_single_conv_with_and_without_bias(granularity, bias, tmp_path):
    # shared/cases 6: Conv2d(1→64, k5) on 1×1×32×32, 4-bit weights; QONNX equals Brevitas within one output step
    torch.manual_seed(0)

    class OneConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 64, 5, bias=bias)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x))

    qm = quantize_model(OneConv().eval(), QuantSpec(weight_bit_width=4, weight_granularity=granularity))
    x = torch.rand(8, 1, 32, 32)
    calibrate(qm, x)
    path = export_qonnx(qm, x[:1], tmp_path / "conv.onnx")
    with torch.no_grad():
        ref = qm(x)
    step = float(qm.get_submodule("act").act_quant.scale())
    out = run_qonnx(path, x.numpy())
    assert np.abs(out - ref.numpy()).max() <= step
    assert (out.reshape(8, -1).argmax(1) == ref.numpy().reshape(8, -1).argmax(1)).all()


def test_residual_basic_block_exports_and_passes_golden_check(tmp_path, images):
    # shared/cases 8: 4-bit conv-BN-ReLU-conv-BN + identity skip + ReLU through QONNX export
    class BasicBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
            self.bn0 = nn.BatchNorm2d(8)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.bn0(self.stem(x)))
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)) + x)
            return self.fc(torch.flatten(self.pool(y), 1))

    torch.manual_seed(0)
    qm = quantize_model(randomize_bn(BasicBlock().eval()), QuantSpec(weight_bit_width=4, act_bit_width=4))
    calibrate(qm, images)
    path = export_qonnx(qm, images[:1], tmp_path / "block.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Add" in ops
    result = golden_check("export", predict(qm, images).numpy(), run_qonnx(path, images.numpy()), atol=1e-3)
    assert result.passed


def test_a_node_qonnx_cannot_execute_is_a_toolchain_error(images, tmp_path):
    # The EfficientNet transfer model upsamples with F.interpolate(bilinear); qonnx's onnxruntime refuses the Resize
    # node the exporter writes. That must be exit 7 with the node named, not an internal error.
    from pfq_edge.errors import ToolchainError

    class Upsampled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_dscnn()

        def forward(self, x):
            return self.body(nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))

    qm = quantize_model(randomize_bn(Upsampled()), QuantSpec())
    calibrate(qm, images)
    path = export_qonnx(qm, images[:1], tmp_path / "up.onnx")
    with pytest.raises(ToolchainError, match="Resize") as err:  # onnxruntime 1.25.1 (constraints.txt)
        run_qonnx(path, images[:4].numpy())
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


class TwoBranchConcat(nn.Module):
    """stem → (3×3 conv branch, 1×1 conv branch) → concat → 1×1 conv → max pool → linear: Brevitas gives both concat
    inputs one shared quantizer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4))
        self.fc = nn.Linear(16 * 49, 10)

    def forward(self, x):
        y = self.stem(x)
        return self.fc(torch.flatten(self.mix(torch.cat([self.a(y), self.b(y)], 1)), 1))


def test_concat_quantizer_shared_by_both_branches_rounds_after_calibration(images, tmp_path):
    # issue 16: the concat model failed the export golden check on every image. Cause: Brevitas' calibration_mode
    # restored observer_only=True on the quantizer both concat inputs share, so Brevitas stopped rounding there.
    torch.manual_seed(0)
    qm = quantize_model(randomize_bn(TwoBranchConcat().eval()), QuantSpec())
    shared = qm.get_submodule("a.2").act_quant.fused_activation_quant_proxy.tensor_quant
    assert shared is qm.get_submodule("b.2").act_quant.fused_activation_quant_proxy.tensor_quant
    calibrate(qm, images)
    assert not shared.observer_only
    ref = predict(qm, images)
    with torch.no_grad():
        branch = qm.get_submodule("a.2")(torch.randn(4, 8, 7, 7))
    q = branch.value / branch.scale
    assert torch.allclose(q, q.round(), atol=1e-4)  # the branch output is on its 4-bit grid
    path = export_qonnx(qm, images[:1], tmp_path / "cat.onnx")
    result = golden_check("export", ref.numpy(), run_qonnx(path, images.numpy()), atol=1e-4)
    assert result.passed and result.max_abs_diff < 1e-4
