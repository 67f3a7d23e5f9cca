"""The deployment archive: model, FINN reports, report, and a manifest with the sha256 of every file.

Deterministic: entries sorted, timestamps 0, owner root, gzip header without time — the same files give the same
archive bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

MANIFEST_SCHEMA_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("pfq-edge", "torch", "brevitas", "qonnx", "finn-plus", "onnx", "onnxruntime", "numpy", "apache-tvm",
                 "apache-tvm-ffi"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def build_manifest(files: dict[str, Path], info: dict) -> dict:
    """Manifest document: ``info`` (bit widths, accuracy, estimates, …) plus versions and {name: sha256}."""
    return {"schema_version": MANIFEST_SCHEMA_VERSION, **info, "versions": library_versions(),
            "files": {name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in sorted(files.items())}}


def write_archive(path: Path, files: dict[str, Path], manifest: dict) -> Path:
    """Write ``files`` ({archive name: source path}) and ``manifest.json`` into a deterministic .tar.gz at ``path``."""
    entries = {name: Path(src).read_bytes() for name, src in files.items()}
    entries["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(entries):
                data = entries[name]
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
                tar.addfile(ti, io.BytesIO(data))
    Path(path).write_bytes(buf.getvalue())
    return Path(path)
