"""Fine-tuning under torchrun: 2 CPU processes (gloo) follow the same trajectory as 1, and only rank 0 writes."""

import json
import os
import subprocess
import sys

ENV = {**os.environ, "PFQ_EDGE_QUIET": "1"}
# the Adam-trained model with stats-initialised scales: its W4A4 PTQ is poor, so one short epoch visibly trains
ARGS = ["compile", "--target", "fpga", "--model", "fashion-dscnn-adam", "--scale-init", "stats", "--epochs", "1",
        "--train-samples", "2048", "--json"]


def _compile(out, nproc: int):
    launcher = [sys.executable, "-m", "pfq_edge"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pfq_edge"]
    proc = subprocess.run([*launcher, *ARGS, "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_give_the_accuracy_of_one(tmp_path):
    one, two = _compile(tmp_path / "one", 1), _compile(tmp_path / "two", 2)
    assert two.stdout.count('"summary"') == 1  # rank 1 printed nothing
    summary = {n: json.loads(p.stdout)["summary"] for n, p in (("one", one), ("two", two))}
    reports = {n: json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two")}
    assert reports["one"]["stages"]["finetune"]["processes"] == 1
    assert reports["two"]["stages"]["finetune"]["processes"] == 2
    # each global batch of 128 is split 64 + 64 and the gradients summed: the same steps up to summation order
    loss1, loss2 = reports["one"]["stages"]["finetune"]["loss"][0], reports["two"]["stages"]["finetune"]["loss"][0]
    assert abs(loss1 - loss2) < 1e-3 * loss1
    assert abs(summary["one"]["finetuned_top1"] - summary["two"]["finetuned_top1"]) <= 0.005
    assert summary["two"]["finetuned_top1"] > summary["two"]["quantized_top1"] + 0.1  # it really trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray output from rank 1
