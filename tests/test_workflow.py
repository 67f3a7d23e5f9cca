"""Issue 4 workflow options: profile overrides, per-layer bits, BN fold/keep, CLE + bias correction, the two PfQ
rules and the data guard, distillation, early stopping, checkpoint/resume — on real Fashion-MNIST."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compilation, randomize_bn, tiny_dscnn
from pfq_edge.data import Split
from pfq_edge.errors import GoldenCheckError, ModelError, ProfileError
from pfq_edge.pipeline import CompileConfig, effective_profile
from pfq_edge.quantize import calibrate, correct_bias, quantize_model, weight_bits
from pfq_edge.steps import prune
from pfq_edge.targets.profile import QuantSpec, load_profile, with_overrides
from pfq_edge.train import TrainConfig, accuracy, predict, train
from pfq_edge.zoo import load_model


def test_overrides_replace_profile_keys_and_are_validated():
    p = with_overrides(load_profile("fpga"), {"quant": {"weight_bit_width": 3, "act_bit_width": None},
                                              "pfq": {"rule": "bn-epsilon"}, "finetune": {"epochs": 0}})
    assert (p.quant.weight_bit_width, p.quant.act_bit_width, p.pfq.rule, p.finetune.epochs) == (3, 4, "bn-epsilon", 0)
    with pytest.raises(ProfileError, match="quant.weight_bit_width"):
        with_overrides(load_profile("fpga"), {"quant": {"weight_bit_width": 1}})
    with pytest.raises(ProfileError, match="pfq.rule"):
        effective_profile(CompileConfig("m", "fpga", Path("o"), overrides={"pfq": {"rule": "sigma"}}))


def test_profile_file_sections(tmp_path):
    text = Path(load_profile("fpga").source).read_text()
    f = tmp_path / "p.toml"
    f.write_text(text.replace('rule = "exact"', 'rule = "off"').replace("epochs = 2", "epochs = 5"))
    p = load_profile(str(f))
    assert p.pfq.rule == "off" and p.finetune.epochs == 5
    f.write_text(text.replace("patience = 2", "patience = 2\nwarmup = 3"))
    with pytest.raises(ProfileError, match="finetune.warmup"):
        load_profile(str(f))


def test_first_and_last_layer_bits_and_logical_size():
    model = randomize_bn(tiny_dscnn())
    qm = quantize_model(model, QuantSpec(weight_bit_width=3, first_layer_weight_bit_width=8,
                                         last_layer_weight_bit_width=6))
    layers = weight_bits(qm)["layers"]
    assert [r["bit_width"] for r in layers] == [8] + [3] * (len(layers) - 2) + [6]
    assert weight_bits(qm)["weight_bits"] == sum(r["params"] * r["bit_width"] for r in layers)
    first = qm.get_submodule(layers[0]["layer"]).quant_weight()
    assert int(first.int().abs().max()) > 7  # really 8-bit integers, not 3-bit ones


def test_bn_keep_leaves_bn_float_and_fold_removes_it(images):
    model = randomize_bn(tiny_dscnn())
    kept = quantize_model(model, QuantSpec(bn="keep"))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in kept.modules()) == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quantize_model(model, QuantSpec()).modules())
    calibrate(kept, images)
    assert predict(kept, images).shape == (64, 10)


def test_equalization_bias_correction_and_mse_scales_lift_w4a4_ptq(train_split, test_split):
    # The Adam-trained model: per-tensor W4A4 PTQ with Brevitas' stats-initialised scales is poor; CLE + bias
    # correction recovers most of it, and so do MSE-initialised scales alone (scale_init "auto" at 4 bits).
    model, test = load_model("fashion-dscnn-adam").module, test_split.subset(2000)
    calib = train_split.images[:512]
    accs = {}
    for name, spec in (("stats", QuantSpec(scale_init="stats")), ("mse", QuantSpec()),
                       ("cle", QuantSpec(scale_init="stats", equalize=True, bias_correction=True))):
        qm = quantize_model(model, spec)
        calibrate(qm, calib)
        if spec.bias_correction:
            correct_bias(qm, calib)
        accs[name] = accuracy(qm, test)
    assert QuantSpec().resolved_scale_init() == "mse" and QuantSpec(weight_bit_width=8, act_bit_width=8).resolved_scale_init() == "stats"
    assert accs["cle"] > accs["stats"] + 0.10, accs  # measured 60.5 % → 84.2 % on all 10,000
    assert accs["mse"] > accs["stats"] + 0.10, accs  # measured 60.5 % → 83.3 % on 2,000


def _informative_small_var(model):
    """Give 6 filters of one pointwise layer σ² ≤ ε but a large post-BN spread (γ large): range-inflating, not
    constant — exactly what the bn-epsilon rule takes and the exact rule leaves."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        bns[4].running_var[:6] = bns[4].eps / 2
        bns[4].weight[:6] = 50.0
    return model


def _prune_state(model, rule, tmp_path, test_split, train_split, min_agreement=0.98):
    return compilation(model, overrides={"pfq": {"rule": rule, "min_agreement": min_agreement, "channel_multiple": 1}},
                       test=test_split.subset(1000), train=train_split.subset(2048), tmp_path=tmp_path)


def test_bn_epsilon_rule_takes_small_variance_filters_and_the_guard_measures_it(tmp_path, test_split, train_split):
    model = _informative_small_var(copy.deepcopy(load_model("fashion-dscnn-adam").module))
    exact = prune(_prune_state(model, "exact", tmp_path, test_split, train_split)).report()
    assert exact["filters_removed"] == 0 and exact["exact"]
    # a loose tolerance passes and records the measured agreement on calibration images
    loose = prune(_prune_state(model, "bn-epsilon", tmp_path, test_split, train_split, min_agreement=0.05)).report()
    assert loose["rule"] == "bn-epsilon" and not loose["exact"]
    assert loose["filters_removed"] >= 6
    agreement = loose["guard"]["argmax_agreement"]
    assert 0 < agreement < 1  # these filters carried signal: the float output really changed
    # a tolerance above what was measured refuses, naming the guard
    with pytest.raises(GoldenCheckError, match="bn-epsilon data guard"):
        prune(_prune_state(model, "bn-epsilon", tmp_path, test_split, train_split,
                                 min_agreement=min(1.0, agreement + 0.005)))


def _tiny_qat_setup(train_split):
    torch.manual_seed(0)
    model = randomize_bn(tiny_dscnn())
    qm = quantize_model(model, QuantSpec())
    calibrate(qm, train_split.images[:256])
    return model, qm


def test_checkpoint_resume_continues_exactly(tmp_path, train_split):
    data = train_split.subset(768)
    cfg = TrainConfig(epochs=3, lr=1e-3, seed=3)
    _, full = _tiny_qat_setup(train_split)
    train(full, data, cfg)

    _, part = _tiny_qat_setup(train_split)
    ckpt = tmp_path / "qat.pt"

    def stop_after_two(epoch, loss):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(part, data, cfg, on_epoch=stop_after_two, checkpoint=ckpt, checkpoint_key="run-a")
    _, resumed = _tiny_qat_setup(train_split)
    result = train(resumed, data, cfg, checkpoint=ckpt, checkpoint_key="run-a", resume=True)
    assert result.resumed_after_epoch == 2 and len(result.losses) == 3
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ModelError, match="another run"):
        train(resumed, data, cfg, checkpoint=ckpt, checkpoint_key="run-b", resume=True)


def test_early_stopping_keeps_the_best_validation_epoch(train_split):
    _, qm = _tiny_qat_setup(train_split)
    val = Split(train_split.images[-500:], train_split.labels[-500:])
    # a learning rate far too high makes validation accuracy wander, so the best epoch is rarely the last
    result = train(qm, train_split.subset(512), TrainConfig(epochs=4, lr=0.05, schedule="constant", patience=1),
                   validation=val)
    best = result.best_epoch  # 0 = the quantized model before fine-tuning (val_top1[0])
    assert result.val_top1[best] == max(result.val_top1)
    assert accuracy(qm, val) == pytest.approx(result.val_top1[best])
    assert result.stopped_early == (len(result.val_top1) < 5)


def test_distillation_with_alpha_one_ignores_the_labels(train_split):
    teacher, _ = _tiny_qat_setup(train_split)
    data = train_split.subset(256)
    shuffled = Split(data.images, data.labels[torch.randperm(len(data), generator=torch.Generator().manual_seed(1))])
    cfg = TrainConfig(epochs=1, distill_alpha=1.0)
    _, a = _tiny_qat_setup(train_split)
    _, b = _tiny_qat_setup(train_split)
    train(a, data, cfg, teacher=teacher)
    train(b, shuffled, cfg, teacher=teacher)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(x, y)
    _, c = _tiny_qat_setup(train_split)
    train(c, shuffled, TrainConfig(epochs=1, distill_alpha=0.5), teacher=teacher)
    assert any(not torch.allclose(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_transfer_weights_carries_weights_and_bn_not_scales(train_split):
    from pfq_edge.quantize import transfer_weights

    model, w4 = _tiny_qat_setup(train_split)
    train(w4, train_split.subset(256), TrainConfig(epochs=1, lr=1e-2))
    w2 = quantize_model(model, QuantSpec(weight_bit_width=2, act_bit_width=2, bn="keep"))
    with pytest.raises(ModelError, match="between stages"):  # BN kept here, folded there: other layers
        transfer_weights(w4, w2)
    w2 = quantize_model(model, QuantSpec(weight_bit_width=2, act_bit_width=2, bn="fold"))
    copied = transfer_weights(w4, w2)
    layers = [n for n, m in w2.named_modules() if getattr(m, "weight_quant", None) is not None]
    assert copied == 2 * len(layers)  # every conv/linear weight and bias (BN folded: no BN left)
    for name in layers:
        assert torch.equal(w2.get_submodule(name).weight, w4.get_submodule(name).weight), name
    calibrate(w2, train_split.images[:256])  # its own scales, from the trained weights at its bit widths
    assert {int(w2.get_submodule(n).quant_weight().bit_width) for n in layers} == {2, 8}  # 8: first/last layer


def test_transfer_weights_into_a_residual_model_keeps_its_adds_working(test_split):
    """User report: --stages on a model with residual adds failed with Brevitas' "Scaling factors are different"."""
    from pfq_edge.quantize import transfer_weights

    model, images = load_model("fashion-resnet").module, test_split.images[:64]
    w4 = quantize_model(model, QuantSpec(weight_bit_width=4, act_bit_width=4))
    calibrate(w4, images)
    w3 = quantize_model(model, QuantSpec(weight_bit_width=3, act_bit_width=3, bn="fold"))
    transfer_weights(w4, w3)
    calibrate(w3, images)
    assert accuracy(w3, Split(images, test_split.labels[:64])) > 0.05  # it runs through every add


def test_staged_finetuning_trains_at_each_stage_then_rebuilds_the_target(train_split, test_split):
    """--stages W4A4 before a W2A2 target: a W4A4 model is fine-tuned first, its weights start a fresh W2A2 model
    (scales calibrated anew), which is then fine-tuned; the report says so."""
    from pfq_edge.report import method
    from pfq_edge.steps import finetune, quantize

    model = load_model("fashion-dscnn-adam").module  # no constant filters: W4A4 PTQ ~83 %, W2A2 ~15 %
    overrides = {"quant": {"weight_bit_width": 2, "act_bit_width": 2, "bn": "fold"}, "pfq": {"rule": "off"},
                 "finetune": {"epochs": 1, "train_samples": 512, "stages": ["W4A4"], "stage_epochs": 1}}
    c = compilation(model, overrides=overrides, test=test_split.subset(500), train=train_split.subset(2048))
    c.pruned_model = model
    c.results["quantize"] = quantize(c)
    before = {n: p.detach().clone() for n, p in c.qmodel.named_parameters() if n.endswith(".weight")}
    result = finetune(c)
    c.results["finetune"] = result
    stage = result.staged["stages"][0]
    assert stage["bits"] == "W4A4" and stage["epochs"] == 1
    assert stage["ptq_top1"] > 0.7 and c.results["quantize"].ptq_top1 < 0.3  # W4A4 works here, W2A2 PTQ does not
    layers = [n for n, m in c.qmodel.named_modules() if getattr(m, "weight_quant", None) is not None]
    assert [int(c.qmodel.get_submodule(n).quant_weight().bit_width) for n in layers][1:-1] == [2] * (len(layers) - 2)
    assert all(not torch.equal(p, before[n]) for n, p in c.qmodel.named_parameters() if n in before)
    report = result.report()
    assert report["staged"]["stages"] == result.staged["stages"] and report["stages"] == ["W4A4"]
    assert "QAT in stages W4A4 (1 epoch each), then QAT 1 epoch" in method(c)


def test_bn_auto_keeps_bn_below_4_bits_and_stages_keep_it_as_the_target_does(train_split, test_split):
    """bn "auto" (the profiles' default): BN kept unfolded below 4-bit weights (measured best there), folded at 4
    bits and above; a W4A4 stage before a W2A2 target keeps BN too, or its weights could not carry over."""
    from pfq_edge.report import method
    from pfq_edge.steps import finetune, quantize

    assert QuantSpec().resolved_bn() == "fold" and QuantSpec(weight_bit_width=8).resolved_bn() == "fold"
    assert QuantSpec(weight_bit_width=3).resolved_bn() == "keep"
    assert QuantSpec(weight_bit_width=2, bn="fold").resolved_bn() == "fold"
    assert load_profile("fpga").quant.bn == "auto"
    model = load_model("fashion-dscnn-adam").module
    overrides = {"quant": {"weight_bit_width": 2, "act_bit_width": 2}, "pfq": {"rule": "off"},
                 "finetune": {"epochs": 1, "train_samples": 256, "stages": ["W4A4"], "stage_epochs": 1}}
    c = compilation(model, overrides=overrides, test=test_split.subset(200), train=train_split.subset(1024))
    c.pruned_model = model
    c.results["quantize"] = quantize(c)
    result = finetune(c)  # the W4A4 stage's kept BN carries over into the W2A2 model
    c.results["finetune"] = result
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert bns and sum(isinstance(m, nn.BatchNorm2d) for m in c.qmodel.modules()) == bns
    assert result.staged["stages"][0]["bits"] == "W4A4" and "BN kept (re-estimated)" in method(c)


def test_stages_are_validated():
    with pytest.raises(ProfileError, match="W4A4"):
        with_overrides(load_profile("fpga"), {"finetune": {"stages": ["W9A4"]}})
    low = {"weight_bit_width": 2, "act_bit_width": 2}
    for stages, why in ((["W6A6", "W8A8"], "step down from the stage before it"),  # stages step down
                        (["W4A4", "W4A4"], "step down from the stage before it")):
        with pytest.raises(ProfileError, match=why) as err:
            with_overrides(load_profile("fpga"), {"quant": low, "finetune": {"stages": stages}})
        assert "(profile)" not in str(err.value)
    with pytest.raises(ProfileError, match="epochs is 0"):  # a stage would silently not run
        with_overrides(load_profile("fpga"), {"quant": low, "finetune": {"stages": ["W4A4"], "epochs": 0}})
    ok = with_overrides(load_profile("fpga"), {"quant": low, "finetune": {"stages": ["w8a8", "W4A4", "W3A2"]}})
    assert ok.finetune.stage_bits() == [(8, 8), (4, 4), (3, 2)]
