"""The deployment package: a deterministic .tar.gz with the model artefacts, the report, a device-side README and
runner (``run.py``), ``SHA256SUMS`` and ``manifest.json`` (schema ``Manifest``), and its verification.

Deterministic: entries sorted, mtime 0, owner root, mode 0644, gzip header without name or time — the same files
give the same archive bytes. What changes from run to run (step wall times, FINN's build log, MetaSchedule's
measured records) stays in the output folder and out of the package.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pfq_edge.errors import PackageError

MANIFEST_SCHEMA_VERSION = 3  # 3 added dataset, runtime.preprocess / accelerator_input; verify reads 2 too
RUNNER = Path(__file__).parent / "device" / "run.py"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class RuntimeEntry(BaseModel):
    """What ``run.py`` needs: its default engine, the artefact files, the static batch and the input shape."""

    model_config = ConfigDict(extra="forbid")
    engine: Literal["tvm", "onnxruntime", "qonnx"]
    onnx: str
    onnxruntime_level: Literal["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"] | None = None
    library: str | None = None
    device: Literal["cpu", "cuda"] | None = None
    batch_size: int = Field(ge=1)
    input_shape: list[int] = Field(min_length=3, max_length=3)
    preprocess: dict | None = None       # what run.py applies to an image file: channels, image_size, center_crop
    accelerator_input: str | None = None  # FPGA: what the accelerator's input stream carries


class Manifest(BaseModel):
    """manifest.json, schema version 3 (docs/package.md, "Deployment package"). Sizes in bytes or bits as named, latency in
    ms, accuracy as fractions of the dataset's test split (``dataset``: name, kind, source, sha256, image counts,
    preprocessing)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[2, 3]
    tool: str
    model: dict               # name, weights file, source_sha256 (of the float model's state dict)
    target: str
    kind: str                 # a kind registered in targets/backends
    profile: dict
    bits: str
    pfq: dict                 # rule, filters_removed, constant filters found, exact
    accuracy: dict            # float, pfq_float, quantized_ptq, finetuned, deployed (when run here)
    golden: list[dict]        # every golden check of the compile
    latency: dict             # FINN estimate or TVM measurement, with the budget verdict
    size: dict                # logical weight bits, file sizes
    runtime: RuntimeEntry
    classes: list[str]
    dataset: dict | None = None
    versions: dict[str, str]
    files: dict[str, FileEntry]

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        from pfq_edge.targets.backends import kinds

        if kind not in kinds():
            raise ValueError(f"unknown kind {kind!r}; known: {', '.join(kinds())}")
        return kind


def _sha256_stream(f) -> tuple[str, int]:
    """(sha256 hex, byte count) of a binary file object, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
        size += len(block)
    return h.hexdigest(), size


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)[0]


def state_dict_sha256(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes in name order): the source model's identity,
    whatever file or factory it came from."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    """Manifest document: ``info`` (the Manifest fields but versions and files) plus versions and {name: sha256,
    bytes} of ``files`` ({archive name: path}). Raises PackageError if the result does not fit the schema."""
    from importlib.metadata import version

    doc = {"schema_version": MANIFEST_SCHEMA_VERSION, "tool": f"pfq-edge {version('pfq-edge')}", **info,
           "versions": library_versions(),
           "files": {name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in sorted(files.items())}}
    try:
        Manifest.model_validate(doc)
    except ValidationError as exc:
        raise PackageError(f"manifest does not fit its schema: {_first_error(exc)}") from None
    return doc


def sha256sums(manifest: dict) -> str:
    """``sha256sum -c`` input for the files of ``manifest``: a device can check the package without pfq-edge."""
    return "".join(f"{entry['sha256']}  {name}\n" for name, entry in sorted(manifest["files"].items()))


def write_archive(path: Path, files: dict[str, Path], manifest: dict) -> Path:
    """Write ``files`` ({archive name: source path}), ``manifest.json`` and ``SHA256SUMS`` into a deterministic
    .tar.gz at ``path`` (written whole, then renamed into place)."""
    from pfq_edge.io import atomic_write_bytes

    entries = {name: Path(src).read_bytes() for name, src in files.items()}
    entries["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    entries["SHA256SUMS"] = sha256sums(manifest).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(entries):
                data = entries[name]
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0, 0, "", ""
                ti.mode = 0o755 if name == "run.py" else 0o644
                tar.addfile(ti, io.BytesIO(data))
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def device_readme(info: dict, archive: str, run_it: list[str]) -> str:
    """README.md of the package: what is in it, how to check it, ``run_it`` (the backend's "Run it" lines: how to
    run it on the device) and what was verified."""
    from pfq_edge.report import pct, preprocessing_text

    acc, rt = info["accuracy"], info["runtime"]
    data, norm = info.get("dataset") or {}, info["model"].get("input_normalization")
    quantized = acc["finetuned"] if acc.get("finetuned") is not None else acc.get("quantized_ptq")
    deployed = (f", this package's {rt.get('library')} {pct(acc.get('deployed'))}"
                if acc.get("deployed") is not None else "")
    lines = [f"# {info['model']['name']} for {info['target']} ({info['bits']})", "",
             f"Made by pfq-edge: PfQ removed {info['pfq']['filters_removed']} filters (rule {info['pfq']['rule']}), "
             + ("then quantization-aware fine-tuning. " if acc.get("finetuned") is not None else
                "then quantization (no fine-tuning). ") +
             f"{data.get('name', 'Fashion-MNIST')} top-1 ({data.get('images', {}).get('test', '?')} test images): "
             f"float {pct(acc.get('float'))}, quantized {pct(quantized)}{deployed}.", "",
             f"Input: {' × '.join(map(str, rt['input_shape']))} pixels in [0, 1]; preprocessing of image files "
             f"(run.py applies it): {preprocessing_text(rt.get('preprocess'))}"
             + (f"; the model normalises its input (mean {norm['mean']}, std {norm['std']})" if norm else "")
             + ".", "",
             "## Check the files", "", "    sha256sum -c SHA256SUMS        # or, with pfq-edge: pfq-edge verify "
             f"{archive}", "", "## Run it", "", *run_it,
             "", "manifest.json lists the versions, the profile, every golden check and the sha256 of every file; "
             "report.md explains each number.", ""]
    return "\n".join(lines)


def write_package(folder: Path, archive: str, files: dict[str, Path], info: dict, run_it) -> Path:
    """The deployment package ``folder``/``archive`` of ``files`` ({name in the package: path}) plus README.md
    (``device_readme`` with the backend's ``run_it(info)`` lines), run.py, SHA256SUMS and manifest.json (also
    written beside it). Raises PackageError if the manifest does not fit its schema."""
    import shutil

    (folder / "README.md").write_text(device_readme(info, archive, run_it(info)))
    shutil.copy(RUNNER, folder / "run.py")
    files = {**files, "README.md": folder / "README.md", "run.py": folder / "run.py"}
    manifest = build_manifest(files, info)
    write_archive(folder / archive, files, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return folder / archive


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


def _unsafe(name: str) -> str | None:
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or (p.parts and ":" in p.parts[0]):
        return "absolute path"
    if ".." in p.parts:
        return "'..' in its path"
    return None


def verify_package(path: Path) -> dict:
    """Check a deployment package without extracting it: every member a plain file with a safe relative name,
    manifest.json valid against ``Manifest``, every listed file present with its sha256 and size, nothing unlisted.

    Returns {"package", "ok", "files_checked", "problems": [one line each]}; raises PackageError if ``path`` is not
    a readable .tar.gz at all.
    """
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"package not found: {path}")
    problems: list[str] = []
    members: dict[str, tarfile.TarInfo] = {}
    try:
        tar = tarfile.open(path, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"{path} is not a readable .tar.gz: {exc}") from None
    with tar:
        try:
            infos = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PackageError(f"{path} is truncated or corrupt: {exc}") from None
        for m in infos:
            reason = _unsafe(m.name)
            if reason:
                problems.append(f"member {m.name!r} refused: {reason}")
            elif not m.isfile():
                problems.append(f"member {m.name!r} refused: not a regular file (link, device or folder)")
            elif m.name in members:
                problems.append(f"member {m.name!r} appears twice")
            else:
                members[m.name] = m
        manifest = _read_manifest(tar, members, problems)
        checked = 0
        if manifest is not None:
            listed = manifest["files"]
            for name in sorted(set(members) - set(listed) - {"manifest.json", "SHA256SUMS"}):
                problems.append(f"file {name!r} is in the package but not in manifest.json")
            for name, entry in sorted(listed.items()):
                if name not in members:
                    problems.append(f"file {name!r} is listed in manifest.json but missing")
                    continue
                with tar.extractfile(members[name]) as f:
                    digest, size = _sha256_stream(f)
                checked += 1
                if digest != entry["sha256"] or size != entry["bytes"]:
                    problems.append(f"file {name!r} does not match its sha256 in manifest.json (modified)")
            if "SHA256SUMS" not in members:
                problems.append("SHA256SUMS is missing")
            elif tar.extractfile(members["SHA256SUMS"]).read().decode(errors="replace") != sha256sums(manifest):
                problems.append("SHA256SUMS does not match manifest.json")
    return {"package": str(path), "ok": not problems, "files_checked": checked, "problems": problems}


def _read_manifest(tar, members: dict, problems: list[str]) -> dict | None:
    if "manifest.json" not in members:
        problems.append("manifest.json is missing")
        return None
    try:
        doc = json.loads(tar.extractfile(members["manifest.json"]).read())
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"manifest.json is not valid JSON: {exc}")
        return None
    try:
        Manifest.model_validate(doc)
    except ValidationError as exc:
        problems.append(f"manifest.json does not fit schema version {MANIFEST_SCHEMA_VERSION}: {_first_error(exc)}")
        return None
    return doc
