"""TVM (Relax) build of a QCDQ ONNX model for a CPU/GPU profile: import, optional MetaSchedule tuning, compile,
``export_library``, and the checks a cross-compiled artefact allows here (AArch64 ELF, CUDA device code with nvcc).

TVM 0.27 facts this relies on (shared/toolchain.md): ``from_onnx`` imports QCDQ (it runs as float simulation),
targets are dicts (option strings no longer parse), ``Target("cuda")`` builds without a GPU, MetaSchedule tuning via
the ``static_shape_tuning`` pipeline keeps its database in a folder.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pfq_edge.errors import ToolchainError, one_line
from pfq_edge.io import redirect_fd

EM_AARCH64, EM_X86_64 = 183, 62
ELF_MACHINES = {EM_AARCH64: "AArch64", EM_X86_64: "x86-64"}


@dataclass
class TvmBuild:
    """What ``build_tvm`` wrote and checked. ``library``: the shared object; ``runs_here``: it can be loaded and
    timed on this machine; ``elf``: its ELF header facts; ``device_code``: CUDA device-code compilation record;
    ``tuning``: MetaSchedule facts (trials asked, records in the database, reused or not, seconds)."""

    library: Path
    target: dict
    runs_here: bool
    elf: dict
    seconds: float
    tuning: dict = field(default_factory=dict)
    device_code: dict | None = None
    extra_files: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["library"] = self.library.name
        d["extra_files"] = [p.name for p in self.extra_files]
        return d


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4")."""
    import tvm

    return str(tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")())


def target_dict(spec) -> dict:
    """The TVM target of a RuntimeSpec as a dict (CPU: llvm with mcpu/mtriple/mattr; GPU: cuda + its llvm host)."""
    cpu = {"kind": "llvm", "mcpu": host_cpu_name() if spec.mcpu == "host" else spec.mcpu}
    if spec.runs_here:  # MetaSchedule needs the core count of the machine it measures on
        from pfq_edge.runners.latency import resolve_threads

        cpu["num-cores"] = resolve_threads(spec.threads)
    if spec.mtriple:
        cpu["mtriple"] = spec.mtriple
    if spec.mattr:
        cpu["mattr"] = list(spec.mattr)
    if spec.tvm_target == "cuda":
        return {"kind": "cuda", "arch": spec.arch, "host": cpu}
    return cpu


def elf_info(path: Path) -> dict:
    """ELF header of ``path``: {"elf": bool, "class": "ELF64"|"ELF32", "type": "shared object"|…, "machine": name}.

    Read from the header bytes (e_ident, e_type, e_machine) as the ELF specification lays them out.
    """
    head = Path(path).read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return {"elf": False}
    endian = "<" if head[5] == 1 else ">"
    e_type, e_machine = struct.unpack(endian + "HH", head[16:20])
    return {"elf": True, "class": {1: "ELF32", 2: "ELF64"}.get(head[4], "?"),
            "type": {2: "executable", 3: "shared object"}.get(e_type, str(e_type)),
            "machine": ELF_MACHINES.get(e_machine, str(e_machine))}


TUNING_MARKER = "pfq-edge-tuning.json"  # trials already spent on this database, per target
TUNING_WORKER_TIMEOUT_S = 300


def _records(db: Path) -> int:
    f = db / "database_tuning_record.json"
    return sum(1 for line in f.read_text().splitlines() if line.strip()) if f.is_file() else 0


def _trials_done(db: Path, target_key: str) -> int:
    f = db / TUNING_MARKER
    try:
        return int(json.loads(f.read_text()).get(target_key, 0)) if f.is_file() else 0
    except (ValueError, AttributeError):
        return 0


def _n_tasks(mod, target) -> int:
    import tvm
    from tvm import relax

    with tvm.target.Target(target):
        lowered = relax.get_pipeline("zero")(mod)
    return max(1, sum(1 for _, f in lowered.functions.items() if not isinstance(f, relax.Function)))


def _import_onnx(onnx_path: Path):
    """The Relax IRModule of an ONNX file; raises ToolchainError (one line) if TVM cannot import it."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=False)
    except Exception as exc:
        raise ToolchainError(f"TVM cannot import {Path(onnx_path).name}: {one_line(exc)}") from None


def tuning_tasks(onnx_path: Path, spec) -> int:
    """Number of MetaSchedule tasks (distinct fused kernels) of the model at ``onnx_path`` for RuntimeSpec ``spec``:
    ``--tune-trials`` below it leaves some kernels with TVM's default schedule. Raises ToolchainError like build_tvm."""
    import tvm

    return _n_tasks(_import_onnx(onnx_path), tvm.target.Target(target_dict(spec)))


def _tune(mod, target, trials: int, db: Path, log) -> tuple[object, dict]:
    """MetaSchedule: tune ``trials`` minus those a previous run already spent on ``db`` for this target (recorded
    in ``db``/pfq-edge-tuning.json), then apply the database. Only workloads that match are applied."""
    db.mkdir(parents=True, exist_ok=True)
    key = json.dumps(target.export(), sort_keys=True, default=str)
    before = _trials_done(db, key)
    todo = max(0, trials - before)
    tasks = _n_tasks(mod, target)
    if log:
        log(f"TVM MetaSchedule: {todo} trials over {tasks} tasks" if todo else
            f"TVM MetaSchedule: reusing {before} trials from {db}")
    t0 = time.perf_counter()
    with redirect_fd(1, 2):  # MetaSchedule logs to stdout; --json output must stay parseable
        mod = _tuned(mod, target, todo, math.ceil(todo / tasks) if todo else 0, db)
    shutil.rmtree(db / "logs", ignore_errors=True)  # per-task logs: megabytes of TIR, not needed to reuse
    if todo:
        marker = db / TUNING_MARKER
        done = json.loads(marker.read_text()) if marker.is_file() else {}
        marker.write_text(json.dumps({**done, key: before + todo}, indent=1, sort_keys=True) + "\n")
    return mod, {"trials_requested": trials, "trials_run": todo, "tasks": tasks, "records": _records(db),
                 "reused_trials": before, "seconds": round(time.perf_counter() - t0, 1)}


def _tuned(mod, target, trials: int, per_task: int, db: Path):
    """relax's ``static_shape_tuning`` pipeline; candidates are built by ``_build_candidate``. Builder and runner get
    TUNING_WORKER_TIMEOUT_S: with the default 30 s, candidates failed on 2 busy cores while workers started."""
    import tvm
    from tvm import relax
    from tvm.relax import transform
    from tvm.s_tir import meta_schedule as ms

    with target:
        mod = tvm.transform.Sequential([transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
        if trials:
            ms.relax_integration.tune_relax(
                mod, params={}, target=target, work_dir=str(db), max_trials_global=trials,
                max_trials_per_task=per_task, seed=0,
                builder=ms.builder.LocalBuilder(timeout_sec=TUNING_WORKER_TIMEOUT_S, f_build=_build_candidate),
                runner=ms.runner.LocalRunner(timeout_sec=TUNING_WORKER_TIMEOUT_S))
        return transform.MetaScheduleApplyDatabase(str(db))(mod)


def _build_candidate(mod, target, _params):
    """Build one MetaSchedule candidate in a builder worker: MetaSchedule's default build without its import of
    ``tvm.s_tir.tensor_intrin``. That import parses ~250 TVMScript intrinsics for every target (30–100 s here), and
    LocalBuilder starts fresh workers for every round, one round per task: it was most of the tuning time. A
    candidate is tensorized when it is scheduled, in the tuning process; building it needs no registered intrinsic."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def build_tvm(onnx_path: Path, spec, out_dir: Path, tuning_db: Path | None = None, log=None) -> TvmBuild:
    """Compile the QCDQ model at ``onnx_path`` for RuntimeSpec ``spec`` into ``out_dir``/model.<kind>.so.

    With ``spec.tune_trials`` > 0 or an existing ``tuning_db`` (a MetaSchedule database folder), schedules come from
    MetaSchedule and the database is kept in ``tuning_db``; a rerun with as many records tunes nothing again.
    CUDA: the library holds host code and CUDA C (TVM compiles it at load on the device); here the device code is
    also compiled with nvcc for ``spec.arch`` when a CUDA toolkit is installed (``device_code`` says if it was).
    Raises ToolchainError (one line) when import, build or linking fails.
    """
    import tvm

    t0 = time.perf_counter()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    target_spec = target_dict(spec)
    target = tvm.target.Target(target_spec)
    mod = _import_onnx(onnx_path)
    tuning = {}
    if spec.runs_here and (spec.tune_trials or (tuning_db is not None and _records(tuning_db))):
        try:
            mod, tuning = _tune(mod, target, spec.tune_trials, tuning_db or out_dir / "tvm_tuning", log)
        except Exception as exc:
            raise ToolchainError(f"TVM MetaSchedule tuning failed: {one_line(exc)}") from None
    try:
        executable = tvm.compile(mod, target=target)
    except Exception as exc:
        raise ToolchainError(f"TVM cannot compile for {json.dumps(target_spec)}: {one_line(exc)}") from None
    library = Path(out_dir) / f"model.{'cuda' if spec.tvm_target == 'cuda' else spec.mtriple or 'host'}.so"
    try:
        executable.export_library(str(library), **({"cc": spec.cc} if spec.cc else {}))
    except Exception as exc:
        raise ToolchainError(f"TVM export_library{f' with {spec.cc}' if spec.cc else ''} failed: {one_line(exc)}") \
            from None
    elf = elf_info(library)
    expected = "AArch64" if (spec.mtriple or "").startswith("aarch64") else None
    if expected and elf.get("machine") != expected:
        raise ToolchainError(f"{library.name} is not an {expected} shared object: {elf}")
    build = TvmBuild(library=library, target=target_spec, runs_here=spec.runs_here, elf=elf, tuning=tuning,
                     seconds=0.0)
    if spec.tvm_target == "cuda":
        build.device_code = _compile_device_code(executable, spec.arch, target, Path(out_dir))
        if build.device_code.get("file"):
            build.extra_files.append(Path(out_dir) / build.device_code["file"])
    build.seconds = round(time.perf_counter() - t0, 1)
    return build


def _cuda_module(module):
    if module.kind == "cuda":
        return module
    for child in module.imports:
        found = _cuda_module(child)
        if found is not None:
            return found
    return None


def nvcc_version() -> str | None:
    """"13.0" etc. if a CUDA toolkit's nvcc is on PATH (or in /usr/local/cuda/bin), else None."""
    import re
    import subprocess

    nvcc = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if nvcc is None:
        return None
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


def _compile_device_code(executable, arch: str, target, out_dir: Path) -> dict:
    """Compile the CUDA C that TVM generated with nvcc for ``arch`` (fatbin next to the library), if possible."""
    cuda = _cuda_module(executable.mod)
    if cuda is None:
        return {"compiled": False, "arch": arch, "reason": "the build has no CUDA device module"}
    version = nvcc_version()
    if version is None:
        return {"compiled": False, "arch": arch, "reason": "no CUDA toolkit (nvcc) on this machine",
                "kernels_source_bytes": len(cuda.inspect_source())}
    from tvm.support import nvcc

    try:
        with target:
            fatbin = nvcc.compile_cuda(cuda.inspect_source(), target_format="fatbin", arch=arch, compiler="nvcc")
    except Exception as exc:
        return {"compiled": False, "arch": arch, "compiler": f"nvcc {version}", "reason": one_line(exc)}
    name = f"model.{arch}.fatbin"
    (out_dir / name).write_bytes(bytes(fatbin))
    return {"compiled": True, "arch": arch, "compiler": f"nvcc {version}", "file": name, "bytes": len(fatbin)}
