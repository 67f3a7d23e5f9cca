"""Brevitas quantization stage: bit widths from the spec, the input quantizer, logical size."""

import pytest
import torch
from torch import nn

from conftest import randomize_bn, tiny_dscnn
from pfq_edge.quantize import calibrate, quantize_model, weight_bits
from pfq_edge.targets.profile import QuantSpec


def _quant_layers(qm):
    return [m for m in qm.modules() if hasattr(m, "weight_quant") and getattr(m, "weight", None) is not None]


def test_bn_is_folded_and_bit_widths_follow_the_spec(images):
    model = randomize_bn(tiny_dscnn())
    qm = quantize_model(model, QuantSpec(weight_bit_width=3, act_bit_width=5, bn="fold"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qm.modules())
    bits = [int(m.quant_weight().bit_width) for m in _quant_layers(qm)]
    assert set(bits[1:-1]) == {3} and bits[0] == bits[-1] == 8  # below 4 bits the first conv and classifier stay 8-bit
    qm3 = quantize_model(model, QuantSpec(weight_bit_width=3, act_bit_width=5, first_layer_weight_bit_width=3,
                                          last_layer_weight_bit_width=3))
    assert {int(m.quant_weight().bit_width) for m in _quant_layers(qm3)} == {3}
    acts = [m for m in qm.modules() if type(m).__name__ == "QuantReLU"]
    assert acts and {int(a.act_quant.bit_width()) for a in acts} == {5}
    # the float model is untouched (folding works on a copy)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_input_quantizer_is_inserted_with_pixel_step(images):
    # shared/cases 7: the first conv is fed raw pixels; the stage inserts an 8-bit input quantizer (step 1/255)
    model = randomize_bn(tiny_dscnn())
    qm = quantize_model(model, QuantSpec())
    first = next(m for m in qm.modules() if type(m).__name__ == "QuantIdentity")
    q = first(images[:4])
    assert int(q.bit_width) == 8 and not bool(q.signed)
    assert float(q.scale) == pytest.approx(1 / 255, rel=1e-6)
    # integer pixels are represented exactly
    assert torch.allclose(q.value, images[:4], atol=1e-6)


def test_quantized_model_tracks_float_at_8_bits(images):
    model = randomize_bn(tiny_dscnn())
    qm = quantize_model(model, QuantSpec(weight_bit_width=8, act_bit_width=8))
    calibrate(qm, images)
    with torch.no_grad():
        ref, out = model(images), qm(images)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("bits,expected", [(8, 8_388_608), (4, 4_194_304), (2, 2_097_152)])
def test_logical_size_follows_bit_width(bits, expected):
    # shared/cases 5: QuantLinear(1024, 1024) weight storage in bits; biases are reported apart
    model = nn.Sequential(nn.Flatten(), nn.Linear(1024, 1024)).eval()
    qm = quantize_model(model, QuantSpec(weight_bit_width=bits))
    size = weight_bits(qm)
    assert size["weight_bits"] == expected
    assert size["bias_params"] == 1024


class _ReadsBatchSize(nn.Module):
    """EfficientNet's forward shape: the input is also read for its batch size (``x.size(0)``) before the stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        n = x.size(0)
        return self.head(self.stem(x).mean((2, 3)).reshape(n, -1))


def test_a_normalised_input_has_one_quantizer_when_the_forward_reads_its_size():
    # Found on EfficientNet-Lite0 → FINN: with two quantizers in a row (the 8-bit input one, then the stem's own at the
    # activation width) 7.8 % of the stem's inputs sat on rounding ties that FINN's thresholds break the other way,
    # and FINN's graph after step_qonnx_to_finn agreed with QONNX on 92 % of images.
    from pfq_edge.datasets.normalize import with_input_normalization

    model = with_input_normalization(randomize_bn(_ReadsBatchSize()).eval(), [0.5] * 3, [0.25] * 3)
    qm = quantize_model(model, QuantSpec(weight_bit_width=4, act_bit_width=4))
    nodes = list(qm.graph.nodes)
    stem = next(n for n in nodes if n.op == "call_module" and type(qm.get_submodule(n.target)).__name__ == "QuantConv2d")
    quants = [n for n in nodes[:nodes.index(stem)]
              if n.op == "call_module" and type(qm.get_submodule(n.target)).__name__ == "QuantIdentity"]
    assert len(quants) == 1 and int(qm.get_submodule(quants[0].target).act_quant.bit_width()) == 8
    x = torch.rand(2, 3, 8, 8)
    calibrate(qm, x)
    assert qm(x).shape == (2, 3)


def test_bn_statistics_are_reestimated_on_the_quantized_convs_outputs(images):
    from pfq_edge.quantize import reestimate_bn

    qm = quantize_model(randomize_bn(tiny_dscnn()), QuantSpec(weight_bit_width=3, act_bit_width=3, bn="keep"))
    x = images[:64]
    calibrate(qm, x)
    bn = next(m for m in qm.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(getattr(inp[0], "value", inp[0]).detach()))
    with torch.no_grad():
        qm(x)
    hook.remove()
    mean, var = seen[0].mean((0, 2, 3)), seen[0].var((0, 2, 3))
    assert not torch.allclose(bn.running_mean, mean, atol=1e-3)  # the float network's statistics
    assert reestimate_bn(qm, x) == sum(isinstance(m, nn.BatchNorm2d) for m in qm.modules()) > 0
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert not bn.training and bn.momentum == 0.1  # back in eval mode with its momentum
