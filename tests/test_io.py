import pytest

from pfq_edge.errors import OutputError
from pfq_edge.io import staged_dir


def test_failed_stage_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as work:
            (work / "half.txt").write_text("half")
            raise RuntimeError("stage failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="--force"):
        with staged_dir(out):
            pass
    with staged_dir(out, force=True) as work:
        (work / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
