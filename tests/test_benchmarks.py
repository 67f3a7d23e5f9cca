"""The accuracy benchmark's smoke mode (what CI runs of benchmarks/pfq_accuracy.py): real runs, real files."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pfq_accuracy  # noqa: E402


def test_smoke_table(tmp_path):
    assert pfq_accuracy.main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "pfq_accuracy.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"qat", "pfq-eps+qat", "cle-bc"}
    assert len(doc["runs"]) == 6 and {r["seed"] for r in doc["runs"]} == {0, 1}
    qat, cle = rows["qat"], rows["cle-bc"]
    assert qat["weight_bits"] == 261_632 and qat["filters_removed"] == 0  # W4 × 65,408 weights of fashion-dscnn
    # the default model has no σ² ≤ ε filter either: the bn-epsilon rule leaves plain QAT, reported as such
    assert rows["pfq-eps+qat"]["same_as"] == "qat" and rows["pfq-eps+qat"]["top1_mean"] == qat["top1_mean"]
    assert cle["top1_std"] == 0 and cle["top1_mean"] == cle["ptq_mean"]  # PTQ only: the seed changes nothing
    assert cle["ptq_mean"] > qat["ptq_mean"] + 0.1  # CLE + bias correction lifts W4A4 PTQ (60 % → 84 % measured)
    md = (tmp_path / "pfq_accuracy.md").read_text()
    assert "| fashion-dscnn | W4A4 | cle-bc |" in md and "--smoke" in md
    assert (tmp_path / "pfq_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
