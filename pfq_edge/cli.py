"""Command-line interface: ``pfq-edge compile | analyze | prune | verify | report | targets``.

Heavy libraries (torch, brevitas, FINN) are imported inside the commands so that ``--help`` stays fast.
Errors the user can fix print one line on stderr and exit with the code of their kind (docs/cli.md, "Exit codes").
Help is click's plain layout (``rich_markup_mode=None``): it wraps at any terminal width and never cuts an option.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pfq_edge import interrupt
from pfq_edge.errors import PfqError, ProfileError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="PfQ pruning, low-bit quantization and compilation of PyTorch CNNs for edge targets.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"pfq-edge {version('pfq-edge')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    """PfQ pruning, low-bit quantization and compilation of PyTorch CNNs for edge targets."""


def _console():
    """rich Console on stdout; when stdout is not a terminal (a pipe, a file) tables are not cut to 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


BUDGET_MISSED_EXIT = 9  # the compile succeeded, but the result misses its profile's fit or latency budget


def _fail(message: str, code: int) -> None:
    typer.echo(f"pfq-edge: error: {message}", err=True)
    sys.exit(code)


def _info(message: str) -> None:
    """Stage progress on stderr, also in logs and pipes (stdout keeps only the result); PFQ_EDGE_QUIET=1 hides it."""
    if not os.environ.get("PFQ_EDGE_QUIET"):
        typer.echo(message, err=True)


# Options shared by compile, analyze and prune: (flag, default, help); ``_shared(key)`` makes a fresh typer.Option.
_SHARED_OPTIONS = {
    "data": ("--data", None, "Images: fashion-mnist (default), an image folder DIR/{train,test}/<class>/*.png|jpg, "
                             "an .npz (x_train, y_train, x_test, y_test), package.module:factory (Python datasets) "
                             "or a data .toml (docs/data.md)."),
    "image_size": ("--image-size", None, "Resize images to H[,W] pixels (bilinear, antialiased)."),
    "center_crop": ("--center-crop", False, "With --image-size: resize the shorter side, cut out the middle."),
    "channels": ("--channels", None, "Convert images to 1 (grey) or 3 (RGB) channels."),
    "mean": ("--mean", None, "Per-channel mean of pixels in [0, 1], comma list (with --std); applied inside the "
                             "compiled model."),
    "std": ("--std", None, "Per-channel std of pixels in [0, 1], comma list (with --mean)."),
    "model_arg": ("--model-arg", None, "KEY=VALUE keyword argument for a module:factory model (Python literal; "
                                       "repeatable), e.g. num_classes=5."),
    "at_padding": ("--at-padding", "neutralize", "A constant filter whose constant meets zero padding (a padded "
                                                 "conv reads it at the borders): neutralize it (exact; what compile "
                                                 "does) | remove it too (border outputs change: prune --check "
                                                 "measures it)."),
}


def _shared(key: str):
    flag, default, text = _SHARED_OPTIONS[key]
    return typer.Option(default, flag, help=text)


def _numbers(text: Optional[str], option: str, kind=float) -> Optional[tuple]:
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise PfqError(f"{option} {text!r}: expected comma-separated numbers") from None
    if not values:
        raise PfqError(f"{option} {text!r}: expected comma-separated numbers")
    return values


def _data_spec(data, data_dir, image_size, center_crop, channels, mean, std):
    from pfq_edge.datasets import make_spec
    from pfq_edge.errors import DataError

    size = _numbers(image_size, "--image-size", int)
    if size is not None and len(size) not in (1, 2):
        raise DataError(f"--image-size {image_size!r}: expected H or H,W")
    return make_spec(data, data_dir, image_size=size, center_crop=center_crop, channels=channels,
                     mean=_numbers(mean, "--mean"), std=_numbers(std, "--std"))


def _model_args(values: Optional[list[str]]) -> dict:
    """``--model-arg KEY=VALUE`` pairs as a dict; values are Python literals (ast.literal_eval)."""
    import ast

    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise PfqError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. num_classes=5")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise PfqError(f"--model-arg {item!r}: the value must be a Python literal (number, string in quotes, "
                           f"tuple, list, True/False/None)") from None
    return out


@app.command("compile")
def compile_cmd(
    target: str = typer.Option(..., "--target", "-t", help="Profile name or alias (see `pfq-edge targets`) or a "
                                                            "profile .toml file; several, comma-separated, "
                                                            "write one folder each under --out."),
    model: str = typer.Option("fashion-dscnn", "--model", "-m", help="Zoo name or package.module:factory."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="State dict: .safetensors, or a torch file "
                                                                    "loaded with weights_only=True."),
    model_arg: Optional[list[str]] = _shared("model_arg"),
    data: Optional[str] = _shared("data"),
    image_size: Optional[str] = _shared("image_size"),
    center_crop: bool = _shared("center_crop"),
    channels: Optional[int] = _shared("channels"),
    mean: Optional[str] = _shared("mean"),
    std: Optional[str] = _shared("std"),
    weight_bits: Optional[int] = typer.Option(None, "--weight-bits",
                                              help="Weight bit width 2–8 (profile quant.weight_bit_width)."),
    act_bits: Optional[int] = typer.Option(None, "--act-bits",
                                           help="Activation bit width 2–8 (profile quant.act_bit_width)."),
    first_layer_bits: Optional[int] = typer.Option(None, "--first-layer-bits",
                                                   help="Weight bit width of the first conv (default: 8 below "
                                                        "4-bit weights, else --weight-bits)."),
    last_layer_bits: Optional[int] = typer.Option(None, "--last-layer-bits",
                                                  help="Weight bit width of the last layer (default: 8 below "
                                                       "4-bit weights, else --weight-bits)."),
    granularity: Optional[str] = typer.Option(None, "--granularity", help="Weight scales: per-tensor | "
                                                                           "per-channel (profile)."),
    bn: Optional[str] = typer.Option(None, "--bn", help="auto (profile: keep below 4-bit weights, else fold) | fold "
                                                        "BN before fine-tuning | keep it float."),
    bn_reestimate: Optional[bool] = typer.Option(None, "--bn-reestimate/--no-bn-reestimate", show_default=False,
                                                 help="With --bn keep: re-estimate BN statistics after quantizer "
                                                      "insertion (profile; on)."),
    equalize: Optional[bool] = typer.Option(None, "--equalize/--no-equalize", show_default=False,
                                            help="Cross-layer equalization before quantization (profile; off)."),
    bias_correction: Optional[bool] = typer.Option(None, "--bias-correction/--no-bias-correction",
                                                   show_default=False, help="Bias correction after calibration "
                                                                            "(profile; off)."),
    pfq_rule: Optional[str] = typer.Option(None, "--pfq-rule", help="exact (default) | bn-epsilon | near-constant "
                                                                     "(both guarded approximations) | off."),
    channel_multiple: Optional[int] = typer.Option(None, "--channel-multiple", min=1, max=1024,
                                                   help="Hardware-aware PfQ: pruned layers keep channel counts that "
                                                        "are multiples of gcd(count, N), the other constant filters "
                                                        "are neutralized (profile; FPGA: 8 at W4, CPU/GPU: 1)."),
    scale_init: Optional[str] = typer.Option(None, "--scale-init", help="Learned quantization scales start from "
                                                                         "auto (profile; mse at ≤ 4 bits, else "
                                                                         "stats) | mse | stats (max / percentile)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="QAT fine-tuning epochs, 0 skips it (profile; 2)."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples",
                                                help="Training images per fine-tuning epoch, 0 = all (profile; 0)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Fine-tuning learning rate, Adam (profile; 1e-3)."),
    schedule: Optional[str] = typer.Option(None, "--schedule",
                                           help="LR schedule: cosine | constant (profile; cosine)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of fine-tuning (profile; 0)."),
    distill: Optional[float] = typer.Option(None, "--distill", help="Knowledge-distillation weight α in [0, 1] "
                                                                     "from the float model, 0 = off (profile; 0)."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Staged fine-tuning: QAT first at these bit widths "
                                                                 "in turn, e.g. W4A4 or W4A4,W3A3; 'none' = off "
                                                                 "(profile; off)."),
    stage_epochs: Optional[int] = typer.Option(None, "--stage-epochs", min=1,
                                               help="Epochs of each --stages stage (profile; 1)."),
    val_images: Optional[int] = typer.Option(None, "--val-images", help="Hold out this many training images for "
                                                                         "early stopping, 0 = off (profile; 0)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Epochs without validation gain before "
                                                                     "stopping (profile; 2)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Fine-tuning checkpoint file, written "
                                                                          "after every epoch."),
    resume: bool = typer.Option(False, "--resume", help="Continue fine-tuning from --checkpoint."),
    tune_trials: Optional[int] = typer.Option(None, "--tune-trials", help="CPU targets: TVM MetaSchedule tuning "
                                                                           "trials, 0 = untuned (profile; 0)."),
    tuning_db: Optional[Path] = typer.Option(None, "--tuning-db", help="CPU targets: reuse this MetaSchedule "
                                                                        "database folder (default: --out's "
                                                                        "tvm_tuning/ if it exists)."),
    compare_unpruned: Optional[bool] = typer.Option(None, "--compare-unpruned/--no-compare-unpruned",
                                                    show_default=False,
                                                    help="FPGA targets: also build the unpruned architecture with "
                                                         "FINN and report both designs (profile; on)."),
    out: Path = typer.Option(Path("pfq-out"), "--out", "-o", help="Output folder (written atomically)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Fashion-MNIST IDX folder "
                                                                      "(default /usr/share/datasets/fashion-mnist)."),
    list_steps: bool = typer.Option(False, "--list-steps", help="Print the target's steps and exit."),
    to_step: Optional[str] = typer.Option(None, "--to-step", help="Stop after this step; --out keeps what "
                                                                   "later steps need (steps/)."),
    from_step: Optional[str] = typer.Option(None, "--from-step", help="Resume from this step with the steps/ "
                                                                       "of an earlier --out of the same inputs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report summary as JSON on stdout."),
) -> None:
    """Prune (PfQ), quantize, fine-tune, export and compile a model for a target; write report and package.

    FPGA targets: QONNX + FINN estimate. CPU/GPU targets: QCDQ ONNX + TVM library, golden-checked, with latency
    against onnxruntime and torch. Exit 9: done, but the result misses the profile's budget (fit or latency).
    Options marked "profile" override the keys of the profile's quant, pfq, finetune and runtime sections (docs/workflow.md,
    "Workflow options"). Runs unchanged under `torchrun --nproc_per_node=N -m pfq_edge compile …` (rank 0 writes)."""
    from pfq_edge import dist
    from pfq_edge.pipeline import CompileConfig, budget_missed, compile_targets, effective_profiles

    targets = [t.strip() for t in target.split(",")]
    if not all(targets):
        raise PfqError(f"--target {target!r} has an empty name")
    overrides = {
        "quant": {"weight_bit_width": weight_bits, "act_bit_width": act_bits, "weight_granularity": granularity,
                  "first_layer_weight_bit_width": first_layer_bits, "last_layer_weight_bit_width": last_layer_bits,
                  "bn": bn, "bn_reestimate": bn_reestimate, "equalize": equalize, "bias_correction": bias_correction,
                  "scale_init": scale_init},
        "pfq": {"rule": pfq_rule, "channel_multiple": channel_multiple},
        "finetune": {"epochs": epochs, "train_samples": train_samples, "lr": lr, "schedule": schedule,
                     "seed": seed, "distill_alpha": distill, "validation_images": val_images, "patience": patience,
                     "stages": _stage_list(stages), "stage_epochs": stage_epochs},
        "runtime": {"tune_trials": tune_trials},
        "fpga": {"compare_unpruned": compare_unpruned},
    }
    cfg = CompileConfig(model=model, target=targets[0], out=out, weights=weights, overrides=overrides,
                        data_dir=data_dir, force=force, checkpoint=checkpoint, resume=resume, tuning_db=tuning_db,
                        to_step=to_step, from_step=from_step, model_args=_model_args(model_arg),
                        data=_data_spec(data, data_dir, image_size, center_crop, channels, mean, std))
    cfg.check()
    profiles = effective_profiles(cfg, targets)  # fail fast on a bad target or option, before heavy imports
    if list_steps:
        from pfq_edge.pipeline import check_step_names

        check_step_names(cfg, profiles)  # a misspelt --to-step is named here too
        _print_steps(profiles, as_json)
        return
    if resume and not checkpoint.is_file():
        _info(f"--resume: no checkpoint at {checkpoint} yet; fine-tuning starts from epoch 1")
    elif resume:
        from pfq_edge.train import read_checkpoint

        read_checkpoint(checkpoint)  # a corrupt file fails now, not after minutes of work
    done = compile_targets(cfg, targets, log=_info)
    if dist.rank_and_world()[0] != 0:
        return
    if "package" not in done[0].results:
        _print_stopped(done[0], as_json)
        return
    from pfq_edge.report import summary

    if len(done) == 1:
        if as_json:
            typer.echo(json.dumps({"out": str(out), "summary": summary(done[0])}, indent=2))
        else:
            _print_summary(done[0], out)
    elif as_json:
        typer.echo(json.dumps({"out": str(out), "targets": [{"target": c.profile.name,
                                                             "folder": str(out / c.profile.name),
                                                             "summary": summary(c)} for c in done]}, indent=2))
    else:
        _print_multi_summary(out)
    missed = [f"{c.profile.name}: {m}" for c in done if (m := budget_missed(c))]
    if missed:
        _fail(f"budget missed: {'; '.join(missed)}; the output in {out} is complete", BUDGET_MISSED_EXIT)


def _print_steps(profiles, as_json: bool) -> None:
    """``--list-steps``: each target's steps with what they require, their golden checks and what they do."""
    from pfq_edge.pipeline import steps_for

    rows = {p.name: [{"step": s.name, "requires": list(s.requires), "golden": list(s.golden), "does": s.summary}
                     for s in steps_for(p)] for p in profiles}
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for name, steps in rows.items():
        typer.echo(f"{name}: {' → '.join(s['step'] for s in steps)}")
        for s in steps:
            checks = f" Golden checks: {', '.join(s['golden'])}." if s["golden"] else ""
            typer.echo(f"  {s['step']:<9} {s['does']}{checks}")


def _print_stopped(c, as_json: bool) -> None:
    """After ``--to-step``: where the compile stopped and how to go on."""
    from pfq_edge.pipeline import steps_for

    names = [s.name for s in steps_for(c.profile)]
    last = list(c.results)[-1]
    following = names[names.index(last) + 1]
    if as_json:
        typer.echo(json.dumps({"out": str(c.final), "stopped_after": last, "next_step": following,
                               "accuracy": c.accuracy}, indent=2))
        return
    typer.echo(f"stopped after step {last}; {c.final}/steps/ holds what the next steps need; to continue, run the "
               f"same command with --from-step {following} in place of --to-step {last}")


def _print_summary(c, out: Path) -> None:
    from rich.table import Table

    from pfq_edge.report import summary, summary_rows

    table = Table(title=f"pfq-edge: {c.config.model} → {c.profile.name}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in summary_rows(summary(c), c.profile.kind):
        table.add_row(name, str(value))
    console = _console()
    console.print(table)
    console.print(f"output: {out}/ (report.md, report.json, {c.result('package').archive})")


def _print_multi_summary(out: Path) -> None:
    from rich.table import Table

    from pfq_edge.report import summary_rows_multi

    head, rows = summary_rows_multi(json.loads((out / "summary.json").read_text()))
    table = Table(title=f"pfq-edge: {len(rows)} targets")
    for col in head:
        table.add_column(col)
    for row in rows:
        table.add_row(*map(str, row))
    console = _console()
    console.print(table)
    console.print(f"output: {out}/ (summary.md, summary.json, one folder per target)")


def _check_rule(rule: str) -> None:
    from pfq_edge.pfq import RULES

    if rule not in RULES:
        raise PfqError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")


def _bits_for(target: str, bits: Optional[int]) -> int:
    from pfq_edge.targets.profile import load_profile

    return bits if bits is not None else load_profile(target).quant.weight_bit_width


def _act_bits_for(target: str, act_bits: Optional[int]) -> int:
    from pfq_edge.targets.profile import load_profile

    return act_bits if act_bits is not None else load_profile(target).quant.act_bit_width


def _multiple_for(target: str, bits: Optional[int], given: Optional[int]) -> int:
    """--channel-multiple, or what ``compile --target`` would use (its profile's, else its backend's at ``bits``)."""
    if given is not None:
        return given
    from pfq_edge.steps import channel_multiple
    from pfq_edge.targets.profile import load_profile

    profile = load_profile(target)
    if bits is not None:
        profile = profile.model_copy(update={"quant": profile.quant.model_copy(update={"weight_bit_width": bits})})
    return channel_multiple(profile)


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Argument(..., help="Zoo name (e.g. efficientnet-lite0), package.module:factory, a pruned "
                                          ".safetensors file or a torch.export archive (.pt2)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="State dict for a module:factory model."),
    model_arg: Optional[list[str]] = _shared("model_arg"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="C,H,W of one input image (default: "
                                                                          "the zoo's, or found from the model)."),
    target: str = typer.Option("fpga", "--target", "-t", help="Profile whose weight bit width sets the step."),
    bits: Optional[int] = typer.Option(None, "--bits", min=2, max=8, help="Weight bit width (overrides --target)."),
    tol: float = typer.Option(1e-6, "--tol", min=0.0, help="Post-BN std at or below which a filter is constant."),
    rule: str = typer.Option("exact", "--rule", help="PfQ rule: exact (post-BN std ≤ --tol) | bn-epsilon "
                                                     "(also σ² ≤ ε) | near-constant (below a quantization step at "
                                                     "--act-bits); the last two approximate: check them with data."),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", min=2, max=8,
                                           help="Activation bit width of rule near-constant (default: the fpga "
                                                "profile's, or --target's)."),
    channel_multiple: Optional[int] = typer.Option(None, "--channel-multiple", min=1, max=1024,
                                                   help="Hardware-aware PfQ: layers that lose filters keep channel "
                                                        "counts that are multiples of gcd(count, N); the constant "
                                                        "filters that would break it are neutralized instead "
                                                        "(default: what compile --target uses; fpga: 8 at W4)."),
    at_padding: str = _shared("at_padding"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of folded-weight range per layer."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Per layer: constant filters (pruned by PfQ), σ²≤ε filters that still carry signal (reported, kept),
    folded-weight range, per-tensor step and share of weights rounding to 0, before and after PfQ."""
    import torch

    from pfq_edge.pfq.analyze import analyze_pfq
    from pfq_edge.zoo import load_model

    _check_rule(rule)
    loaded = load_model(model, weights, _model_args(model_arg))
    shape = _input_shape(loaded, input_shape)
    _, analysis = analyze_pfq(loaded.module, torch.zeros(1, *shape), bits=_bits_for(target, bits), tol=tol,
                              rule=rule, act_bits=_act_bits_for(target, act_bits),
                              channel_multiple=_multiple_for(target, bits, channel_multiple),
                              padded=_at_padding(at_padding))
    if plot is not None:
        from pfq_edge.plots import plot_folded_ranges

        from pfq_edge.errors import OutputError

        try:
            plot_folded_ranges(analysis.layers, f"{model}: folded weight range before/after PfQ", plot)
        except OSError as exc:
            raise OutputError(f"cannot write plot {plot}: {exc.strerror}") from None
    if as_json:
        typer.echo(json.dumps({"model": model, **analysis.as_dict()}, indent=2))
        return
    _print_analysis(model, analysis, plot)


def _stage_list(text: str | None) -> list[str] | None:
    """--stages "W4A4,W3A3" as the profile's list; "none" (or "") clears it; None leaves the profile's."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",")]  # the profile validates and normalises them
    if [n.lower() for n in names] == ["none"]:
        return []
    if "" in names:
        raise ProfileError(f"--stages {text!r} has an empty entry; give bit-width pairs such as W4A4, or none")
    return names


def _at_padding(value: str) -> str:
    from pfq_edge.pfq.plan import PADDED

    if value not in PADDED:
        raise PfqError(f"--at-padding {value!r}: expected one of {', '.join(PADDED)}")
    return value


def _removal_kind(plan, checked: bool = False) -> str:
    """One line: is the pruned model the same function (exact), or an approximation to check with data?"""
    causes: dict[str, int] = {}
    for n in plan.neutralized:
        causes[n.why] = causes.get(n.why, 0) + len(n.channels)
    neutral = sum(causes.values())
    phrase = {"zero padding": "at zero padding", "shape": "for shapes", "folding": "for the channel multiple",
              "last channel": "as a layer's last channels", "behind a kept filter": "behind a kept filter"}
    by = ", ".join(f"{k} {phrase.get(why, why)}" for why, k in causes.items())
    kept = f"; {neutral} neutralized (weights zeroed, output β kept: {by})" if neutral else ""
    adds = sorted({a for g in plan.groups for a in g.adds})
    if adds:
        kept += f"; removed through {len(adds)} add{'s' if len(adds) > 1 else ''} (every member constant)"
    if plan.exact:
        # "exact" is judged from the BN statistics: a wrong running_var (0 with live weights) fools it, data does not
        return (f"removal: exact — by its BN statistics the pruned model computes the same function{kept}"
                + ("" if checked else "; prune --check N confirms it on images"))
    where = sorted({w for g in plan.groups for w in g.inexact})
    padding = f"constants meet zero padding in {', '.join(where[:3])}" if where else ""
    from pfq_edge.pfq import REPLACES

    replaced = REPLACES.get(plan.rule)
    why = (replaced + (f"; {padding}" if padding else "") if replaced else padding or "see the JSON's groups")
    return f"removal: APPROXIMATE — {why}{kept}" + ("" if checked else "; check it on your images (prune --check N)")


def _print_analysis(model: str, a, plot: Optional[Path]) -> None:
    from rich.table import Table

    table = Table(title=f"PfQ analysis: {model} (W{a.bits} per-tensor step)",
                  caption="ch: filters before→after PfQ; const: constant filters of the layer; removed: its "
                          "filters removed (constant, or tied to a removed filter of the layer before or after it); "
                          "neutral: constant filters kept with zeroed weights; σ²≤ε kept: running_var ≤ BN ε but "
                          "not constant (informative, kept); max|W'|: largest |folded weight|; step: per-tensor "
                          "quantization step max|W'| / (2^(bits−1) − 1); →0: weights that round to 0 at that step")
    for col in ("layer", "kind", "ch", "const", "removed", "neutral", "σ²≤ε kept", "max|W'| before→after",
                "step before→after", "→0 before→after"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in a.layers:
        table.add_row(r["layer"], r["kind"], f"{r['channels_before']}→{r['channels_after']}",
                      str(r["constant_filters"]), str(r["removed_filters"]), str(r.get("neutralized_filters", 0)),
                      str(r["range_inflating_filters"]),
                      f"{r['folded_max_abs_before']:.3g}→{r['folded_max_abs_after']:.3g}",
                      f"{r['step_before']:.3g}→{r['step_after']:.3g}",
                      f"{r['zero_fraction_before']:.0%}→{r['zero_fraction_after']:.0%}")
    console = _console()
    console.print(table)
    rule = {"exact": f"post-BN std ≤ {a.plan.tol:g}", "bn-epsilon": "rule bn-epsilon: σ² ≤ ε",
            "near-constant": "rule near-constant: activation band under half a step"}[a.plan.rule]
    console.print(f"constant filters ({rule}): {a.constant_total}; removed {a.constant_removed}; "
                  f"left {a.constant_total - a.constant_removed}. Filters removed in all layers, with the depthwise "
                  f"filters tied to them: {a.plan.filters_removed}.")
    if a.plan.channel_multiple > 1:
        console.print(f"hardware-aware PfQ: pruned channel counts stay multiples of {a.plan.channel_multiple} "
                      f"(--channel-multiple 1 removes every constant filter it can)")
    console.print(_removal_kind(a.plan))
    for left in a.constant_left:
        console.print(f"  left in {left['layer']}: {left['filters']} — {left['reason']}")
    for w in a.plan.warnings:
        console.print(f"  warning: {w}")
    if plot is not None:
        console.print(f"plot: {plot}")


@app.command("prune")
def prune_cmd(
    model: str = typer.Argument(..., help="Zoo name (e.g. efficientnet-lite0), package.module:factory, a pruned "
                                          ".safetensors file or a torch.export archive (.pt2)."),
    out: Path = typer.Option(..., "--out", "-o", help="Pruned model file (.safetensors)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="State dict for a module:factory model."),
    model_arg: Optional[list[str]] = _shared("model_arg"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="C,H,W of one input image (default: "
                                                                          "the data's, the zoo's, or found from "
                                                                          "the model)."),
    tol: float = typer.Option(1e-6, "--tol", min=0.0, help="Post-BN std at or below which a filter is constant."),
    rule: str = typer.Option("exact", "--rule", help="PfQ rule: exact (post-BN std ≤ --tol) | bn-epsilon "
                                                     "(also σ² ≤ ε) | near-constant (below a quantization step at "
                                                     "--act-bits); the last two approximate: check them with data."),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", min=2, max=8,
                                           help="Activation bit width of rule near-constant (default: the fpga "
                                                "profile's, or --target's)."),
    channel_multiple: int = typer.Option(1, "--channel-multiple", min=1, max=1024,
                                         help="Hardware-aware PfQ: layers that lose filters keep channel counts "
                                              "that are multiples of gcd(count, N); the constant filters that "
                                              "would break it are neutralized instead (default 1: any target; "
                                              "compile --target fpga uses 8 at W4)."),
    at_padding: str = _shared("at_padding"),
    check: int = typer.Option(0, "--check", min=0, help="Compare pruned vs original logits on this many test "
                                                         "images of --data."),
    data: Optional[str] = _shared("data"),
    image_size: Optional[str] = _shared("image_size"),
    center_crop: bool = _shared("center_crop"),
    channels: Optional[int] = _shared("channels"),
    mean: Optional[str] = _shared("mean"),
    std: Optional[str] = _shared("std"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Fashion-MNIST IDX folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Remove constant filters with compensation and write the pruned model (safetensors; reload it anywhere a
    model is expected, e.g. `pfq-edge analyze FILE`)."""
    import torch

    from pfq_edge.pfq.analyze import analyze_pfq
    from pfq_edge.errors import OutputError
    from pfq_edge.export.pruned import save_pruned
    from pfq_edge.zoo import load_model

    if out.suffix != ".safetensors":
        raise OutputError(f"--out must end in .safetensors, got {out}")
    _check_rule(rule)
    spec = _data_spec(data, data_dir, image_size, center_crop, channels, mean, std)
    loaded = load_model(model, weights, _model_args(model_arg))
    if check and spec.is_default and loaded.input_shape not in (None, (1, 28, 28)):
        spec = _fashion_mnist_as(loaded, data_dir)
    dataset = _check_data(loaded, spec, model) if check else None
    shape = tuple(dataset.shape) if dataset is not None else _input_shape(loaded, input_shape)
    pruned, analysis = analyze_pfq(loaded.module, torch.zeros(1, *shape), tol=tol, rule=rule,
                                   act_bits=_act_bits_for("fpga", act_bits), channel_multiple=channel_multiple,
                                   padded=_at_padding(at_padding))
    result = {"model": model, "out": str(out), "rule": rule, "filters_removed": analysis.plan.filters_removed,
              "constant_total": analysis.constant_total, "constant_left": analysis.constant_left,
              "exact": analysis.plan.exact, "warnings": analysis.plan.warnings}
    if check:
        # a removal at zero padding (--at-padding remove) is an approximation under any rule: judged like one
        judged = rule if analysis.plan.exact or rule != "exact" else "at-padding removal"
        result["check"] = _compare_on_images(loaded, pruned, check, dataset, judged)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # as compile -o does; only after every check passed
        save_pruned(pruned, analysis.plan, model, out, source_weights=loaded.weights,
                    model_args=_model_args(model_arg))
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror}") from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"constant filters: {analysis.constant_total} found, {analysis.constant_removed} removed; filters "
               f"removed in all layers, with the depthwise filters tied to them: {result['filters_removed']}; wrote {out}")
    typer.echo(_removal_kind(analysis.plan, checked=bool(check)))
    for w in analysis.plan.warnings:
        typer.echo(f"  warning: {w}")
    if check:
        c = result["check"]
        typer.echo(f"on {c['images']} real images: max |Δlogit| {c['max_abs_diff']:.3g}, top-1 agreement "
                   f"{c['argmax_agreement']:.2%}")


def _input_shape(loaded, text: Optional[str]) -> tuple[int, int, int]:
    """--input-shape C,H,W, else the model's known input shape, else one found by trying sizes (zoo.py)."""
    from pfq_edge.errors import ModelError
    from pfq_edge.zoo import find_input_shape

    if text is not None:
        shape = _numbers(text, "--input-shape", int)
        if len(shape) != 3 or min(shape) < 1:
            raise PfqError(f"--input-shape {text!r}: expected C,H,W, e.g. 3,32,32")
        return shape
    if loaded.input_shape is not None:
        return tuple(loaded.input_shape)
    shape = find_input_shape(loaded.module)
    if shape is None:
        raise ModelError(f"model {loaded.name!r}: no input size found that it runs on; pass --input-shape C,H,W")
    _info(f"input shape {shape} (from the model; --input-shape C,H,W sets it)")
    return shape


def _fashion_mnist_as(loaded, data_dir):
    """Fashion-MNIST resized and converted to a zoo model's input (ImageNet mean/std where its weights want it):
    ``prune --check`` of e.g. efficientnet-lite0 without --data."""
    from pfq_edge.data import IMAGENET_MEAN, IMAGENET_STD
    from pfq_edge.datasets import make_spec

    c, h, w = loaded.input_shape
    norm = bool(loaded.info.get("imagenet_norm")) and c == 3
    return make_spec(None, data_dir, image_size=(h, w), channels=c, mean=IMAGENET_MEAN if norm else None,
                     std=IMAGENET_STD if norm else None)


def _check_data(loaded, spec, name: str):
    """The data of ``prune --check``, checked against the model (DataError on a mismatch)."""
    from pfq_edge.compilation import InputSpec
    from pfq_edge.datasets import load_dataset
    from pfq_edge.steps import check_data_fits

    dataset = load_dataset(spec)
    check_data_fits(loaded.module, name, InputSpec(tuple(dataset.shape), tuple(dataset.classes),
                                                   dataset.normalization), dataset)
    return dataset


def _compare_on_images(loaded, pruned, n: int, dataset, rule: str) -> dict:
    """The compile's prune golden check of ``rule`` on the first ``n`` test images of ``dataset`` (rule bn-epsilon:
    the profile default's pfq.min_agreement); raises GoldenCheckError."""
    from pfq_edge.datasets.normalize import normalize
    from pfq_edge.steps import prune_golden_check
    from pfq_edge.targets.profile import PfqSpec
    from pfq_edge.train import predict

    images = dataset.test.take(n).images
    if dataset.normalization is not None:
        images = normalize(images, *dataset.normalization)
    ref, out = predict(loaded.module, images, batch_size=50), predict(pruned, images, batch_size=50)
    return prune_golden_check("prune --check (pruned vs original)", ref.numpy(), out.numpy(), rule,
                              PfqSpec().min_agreement).as_dict()


@app.command("targets")
def targets_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the built-in target profiles with their key facts."""
    from pfq_edge.targets.profile import builtin_profiles

    rows = [p.summary() for p in builtin_profiles().values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="pfq-edge targets")
    for col in ("name (aliases)", "kind", "bits", "device", "goal", "latency budget"):
        table.add_column(col)
    from pfq_edge.targets.backends import backend_for

    for r in rows:
        name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        device, goal = backend_for(r["kind"]).device_and_goal(r)
        table.add_row(name, r["kind"], f"{r['bits']}, {r['granularity']}", device, goal,
                      f"{r['latency_budget_ms']} ms")
    _console().print(table)


@app.command("verify")
def verify_cmd(
    package: Path = typer.Argument(..., help="A deployment package (.tar.gz) written by `pfq-edge compile`."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
) -> None:
    """Check a deployment package without extracting it: safe member names, manifest.json against its schema, the
    sha256 and size of every file, nothing unlisted. Exit 10 names every problem (a modified file by name)."""
    from pfq_edge.errors import PackageError
    from pfq_edge.export.package import verify_package

    result = verify_package(package)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif result["ok"]:
        typer.echo(f"{package}: OK ({result['files_checked']} files match manifest.json)")
    if not result["ok"]:
        for problem in result["problems"]:  # every problem, one line each
            typer.echo(f"pfq-edge: error: {package}: {problem}", err=True)
        raise typer.Exit(PackageError.exit_code)


@app.command("report")
def report_cmd(
    out: Path = typer.Argument(..., help="An output folder of `pfq-edge compile` (holds report.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json's summary as JSON on stdout."),
) -> None:
    """Re-render report.md and the PNG plots (plots/) of a compile's output folder from its report.json."""
    from pfq_edge.report import rerender

    doc = rerender(out)
    if as_json:
        typer.echo(json.dumps({"out": str(out), "plots": doc["plots"], "summary": doc["summary"]}, indent=2))
    else:
        typer.echo(f"wrote {out / 'report.md'} and {len(doc['plots'])} plots in {out / 'plots'}")


def main() -> None:
    """Console entry point: runs the app, turning PfqError into one line on stderr and its exit code."""
    import warnings

    # Harmless library chatter (toolchain.md): Brevitas' optional Hadamard kernel, a torch treespec deprecation.
    warnings.filterwarnings("ignore", message="fast_hadamard_transform")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=r"(brevitas|torch|qonnx|finn|onnx|onnxscript)\b")
    interrupt.install()  # Ctrl-C and SIGTERM clean up staged output, even inside tools that swallow them
    try:
        rc = app(standalone_mode=False)  # non-standalone: Ctrl-C and typer.Exit come back as an exit code
    except PfqError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        rc = 130
    except SystemExit:
        raise
    except Exception as exc:  # usage errors (typer's click) and anything unexpected
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            _fail(exc.format_message() or "missing command; see `pfq-edge --help`", exc.exit_code)
        if type(exc).__name__ == "Abort":
            rc = 130
        else:
            if os.environ.get("PFQ_EDGE_DEBUG"):
                raise
            from pfq_edge.errors import first_line

            typer.echo(f"pfq-edge: internal error: {type(exc).__name__}: {first_line(exc)} (set PFQ_EDGE_DEBUG=1 "
                       f"for the traceback)", err=True)
            sys.exit(1)
    if rc == 130:
        _fail("interrupted; no output was written", 130)
    sys.exit(rc if isinstance(rc, int) else 0)
