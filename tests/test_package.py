"""Deployment packages as users get them (issue 6): byte-identical archives, `pfq-edge verify` against tampering
and unsafe members, the device-side run.py, `pfq-edge report` re-rendering."""

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from test_cli import ENV, one_line_error, run


def compile_twice(tmp, target):
    outs = []
    for name in ("a", "b"):
        out = tmp / name
        proc = run("compile", "--target", target, "--epochs", "0", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def fpga_twice(tmp_path_factory):
    return compile_twice(tmp_path_factory.mktemp("fpga"), "fpga")


def archive(out):
    return next(out.glob("pfq-edge-*.tar.gz"))


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_same_inputs_give_byte_identical_fpga_archives(fpga_twice):
    a, b = fpga_twice
    assert archive(a).read_bytes() == archive(b).read_bytes()
    # what differs between runs stays beside the package, not in it
    assert json.loads((a / "run.json").read_text())["timings_s"]["finetune"] >= 0
    names = set(members(archive(a)))
    assert "run.json" not in names and "finn_reports/build.log" not in names
    assert {"manifest.json", "SHA256SUMS", "README.md", "run.py", "report.json", "report.md", "model.qonnx.onnx",
            "finn_build/dataflow_build_config.json", "finn_build/model.onnx", "finn_build/folding_config.json",
            "plots/folded_range.png", "plots/accuracy_size.png", "plots/finn_layers.png"} <= names


def test_fpga_manifest_and_finn_build_config(fpga_twice):
    a, _ = fpga_twice
    files = members(archive(a))
    m = json.loads(files["manifest.json"])
    assert m["schema_version"] == 3 and m["kind"] == "fpga" and m["target"] == "fpga-pynq-z1"
    assert len(m["model"]["source_sha256"]) == 64 and m["pfq"]["rule"] == "exact"
    assert m["latency"]["source"].startswith("FINN") and m["latency"]["fit"] in ("fits", "does not fit")
    assert m["size"]["weight_bits"] > 0 and all(g["passed"] for g in m["golden"])
    assert m["versions"]["finn-plus"] != "not installed"
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    cfg = DataflowBuildConfig.from_json(files["finn_build/dataflow_build_config.json"].decode())
    assert cfg.fpga_part == "xc7z020clg400-1" and cfg.board == "Pynq-Z1" and cfg.synth_clk_period_ns == 10.0
    assert "bitfile" in [str(getattr(o, "value", o)) for o in cfg.generate_outputs]
    folding = json.loads(files["finn_build/folding_config.json"])
    assert folding == json.loads((a / "finn_reports" / "auto_folding_config.json").read_text())
    text = files["README.md"].decode()
    assert "finn build dataflow_build_config.json model.onnx" in text and "sha256sum -c SHA256SUMS" in text


def test_verify_accepts_the_package(fpga_twice):
    a, _ = fpga_twice
    proc = run("verify", str(archive(a)), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["files_checked"] == len(json.loads(members(archive(a))["manifest.json"])["files"])


def rewrite(src, dst, change):
    """Copy archive ``src`` to ``dst`` with ``change(tar_out, name, data)`` deciding each member (return True to
    skip the default copy)."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w:gz") as tar_out:
        for m in tar_in.getmembers():
            data = tar_in.extractfile(m).read()
            if not change(tar_out, m.name, data):
                tar_out.addfile(m, io.BytesIO(data))
    return dst


def add(tar, name, data=b"x", kind=tarfile.REGTYPE, link=""):
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_a_modified_file_is_named(fpga_twice, tmp_path):
    def tamper(tar, name, data):
        if name == "model.qonnx.onnx":
            add(tar, name, data[:-1] + bytes([data[-1] ^ 1]))
            return True
    bad = rewrite(archive(fpga_twice[0]), tmp_path / "bad.tar.gz", tamper)
    proc = run("verify", str(bad))
    assert proc.returncode == 10 and one_line_error(proc)
    assert "'model.qonnx.onnx'" in proc.stderr and "modified" in proc.stderr


@pytest.mark.parametrize("name, kind, link, words", [
    ("../evil.sh", tarfile.REGTYPE, "", "'..'"),
    ("/etc/evil", tarfile.REGTYPE, "", "absolute"),
    ("finn_build/../../evil", tarfile.REGTYPE, "", "'..'"),
    ("link", tarfile.SYMTYPE, "/etc/passwd", "not a regular file"),
])
def test_unsafe_members_are_refused(fpga_twice, tmp_path, name, kind, link, words):
    bad = rewrite(archive(fpga_twice[0]), tmp_path / "bad.tar.gz",
                  lambda tar, n, data: n == "README.md" and add(tar, name, kind=kind, link=link) and False)
    proc = run("verify", str(bad), "--json")
    assert proc.returncode == 10
    result = json.loads(proc.stdout)
    assert not result["ok"] and any(name in p and words in p for p in result["problems"]), result["problems"]
    assert not (tmp_path / "evil.sh").exists()


def test_unlisted_missing_and_schema_problems(fpga_twice, tmp_path):
    src = archive(fpga_twice[0])
    extra = rewrite(src, tmp_path / "extra.tar.gz", lambda tar, n, d: n == "README.md" and add(tar, "payload.bin"))
    gone = rewrite(src, tmp_path / "gone.tar.gz", lambda tar, n, d: n == "run.py")

    def old_schema(tar, name, data):
        if name == "manifest.json":
            doc = json.loads(data)
            del doc["latency"]
            add(tar, name, json.dumps(doc).encode())
            return True
    schema = rewrite(src, tmp_path / "schema.tar.gz", old_schema)
    nosums = rewrite(src, tmp_path / "nosums.tar.gz", lambda tar, n, d: n == "SHA256SUMS")
    for path, words in ((extra, "'payload.bin' is in the package but not in manifest.json"),
                        (gone, "'run.py' is listed in manifest.json but missing"),
                        (schema, "latency: Field required"), (nosums, "SHA256SUMS is missing")):
        proc = run("verify", str(path))
        assert proc.returncode == 10 and words in proc.stderr, proc.stderr
    both = rewrite(gone, tmp_path / "both.tar.gz", lambda tar, n, d: n == "README.md" and add(tar, "payload.bin"))
    lines = run("verify", str(both)).stderr.strip().splitlines()
    assert len(lines) == 2 and len(set(lines)) == 2  # each problem once, one line each


@pytest.mark.parametrize("content", [b"", b"not a tar at all", "truncated"])
def test_unreadable_packages_are_one_line(fpga_twice, tmp_path, content):
    path = tmp_path / "p.tar.gz"
    path.write_bytes(archive(fpga_twice[0]).read_bytes()[:5000] if content == "truncated" else content)
    proc = run("verify", str(path))
    assert proc.returncode == 10 and one_line_error(proc)


def test_run_py_classifies_with_the_qonnx_reference(fpga_twice, tmp_path, test_split):
    pkg = tmp_path / "device"
    pkg.mkdir()
    with tarfile.open(archive(fpga_twice[0])) as tar:
        tar.extractall(pkg, filter="data")
    images = (test_split.images[:32, 0].numpy() * 255).round().astype(np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=test_split.labels[:32].numpy())
    done = subprocess.run([sys.executable, "run.py", str(tmp_path / "x.npz"), "--json"], cwd=pkg,
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["engine"] == "qonnx" and len(result["predictions"]) == 32 and result["top1"] > 0.4
    np.save(tmp_path / "nan.npy", np.full((2, 28, 28), np.nan, np.float32))
    (tmp_path / "text.npz").write_text("not an array")
    for args, words in (([str(tmp_path / "missing.npz")], "no such file"), ([str(tmp_path / "nan.npy")], "NaN"),
                        ([str(tmp_path / "text.npz")], "not a .npy/.npz"),
                        ([str(tmp_path / "x.npz"), "--engine", "onnxruntime"], "available: qonnx")):
        bad = subprocess.run([sys.executable, "run.py", *args], cwd=pkg, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith("run.py: error:") and words in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_report_rerenders_markdown_and_plots(fpga_twice, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(fpga_twice[0], out)
    before = {p.name: p.read_bytes() for p in (out / "plots").iterdir()}
    (out / "report.md").unlink()
    shutil.rmtree(out / "plots")
    proc = run("report", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").read_bytes() == (fpga_twice[0] / "report.md").read_bytes()
    assert {p.name: p.read_bytes() for p in (out / "plots").iterdir()} == before
    text = (out / "report.md").read_text()
    for needle in ("Filters removed:", "## Accuracy", "logical weight size", "FPGA estimate", "![FINN per-layer"):
        assert needle in text, needle
    missing = run("report", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and one_line_error(missing)
    doc = json.loads((out / "report.json").read_text())
    del doc["summary"]
    (out / "report.json").write_text(json.dumps(doc))
    rendered = (out / "report.md").read_bytes()
    broken = run("report", str(out))
    assert broken.returncode == 2 and one_line_error(broken) and "report.json" in broken.stderr
    assert (out / "report.md").read_bytes() == rendered  # a failed re-render changes nothing
    assert {p.name: p.read_bytes() for p in (out / "plots").iterdir()} == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_cross_compiled_package_is_byte_identical_too_when_stopped_and_resumed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    whole = run("compile", "--target", "cpu-aarch64", "--epochs", "0", "--out", str(a))
    assert whole.returncode == 0, whole.stderr[-2000:]
    for step in (("--to-step", "export"), ("--from-step", "build")):  # stop after the QCDQ export, TVM later
        proc = run("compile", "--target", "cpu-aarch64", "--epochs", "0", "--out", str(b), *step)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert archive(a).read_bytes() == archive(b).read_bytes()
    m = json.loads(members(archive(a))["manifest.json"])
    assert m["runtime"]["library"] == "model.aarch64-linux-gnu.so" and m["latency"]["verdict"] == "not measured"
    assert hashlib.sha256(members(archive(a))["model.aarch64-linux-gnu.so"]).hexdigest() == \
        m["files"]["model.aarch64-linux-gnu.so"]["sha256"]


def test_deterministic_gzip_header(fpga_twice):
    raw = archive(fpga_twice[0]).read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # mtime 0
    with gzip.open(archive(fpga_twice[0])) as gz, tarfile.open(fileobj=gz) as tar:
        assert {(m.mtime, m.uid, m.gid) for m in tar.getmembers()} == {(0, 0, 0)}
