import os

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
    (out / "report.json").write_text("{}")
    with pytest.raises(OutputError, match="--force"):
        with staged_dir(out):
            pass
    with staged_dir(out, force=True) as work:
        (work / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_never_replaces_foreign_folders_or_the_current_one(tmp_path, monkeypatch):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("meow")
    with pytest.raises(OutputError, match="not a pfq-edge output folder"):
        with staged_dir(other, force=True):
            pass
    assert (other / "cat.jpg").exists()
    monkeypatch.chdir(other)
    with pytest.raises(OutputError, match="current directory"):
        with staged_dir(os.curdir, force=True):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        with staged_dir(tmp_path / "file", force=True):
            pass


def test_progress_lines_keep_coming_while_one_long_step_runs(monkeypatch, capsys):
    import time

    from pfq_edge import progress

    monkeypatch.delenv("PFQ_EDGE_QUIET", raising=False)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.2)
    with progress.progress_bar("long step", total=2) as advance:
        time.sleep(0.7)  # no advance for several intervals
        advance(1)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("long step: ")]
    assert len(lines) >= 3 and lines[0].startswith("long step: 0/2")


def test_progress_lines_name_the_unit_and_what_runs(monkeypatch, capsys):
    import time

    from pfq_edge import progress

    monkeypatch.delenv("PFQ_EDGE_QUIET", raising=False)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.2)
    with progress.progress_bar("FINN build", total=None, unit="FINN steps") as advance:
        advance(0, total=12)
        advance(0, now="step_tidy_up")
        advance(1)
        advance(0, now="step_streamline")
        time.sleep(0.5)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("FINN build: ")]
    assert lines and lines[0].startswith("FINN build: 1/12 FINN steps (8%), ") \
        and lines[0].endswith(" — step_streamline")
