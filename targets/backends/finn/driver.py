"""FINN (finn-plus) estimate-only dataflow build of a QONNX model: per-layer cycles and LUT/BRAM/URAM/DSP,
network latency and throughput. No Vivado is needed or called.

FINN assumes a FINN CLI session and a Vivado install; three things are set up in-process instead (toolchain.md):
its global settings (FINN_BUILD_DIR inside our build folder), the Vivado simulator probe (``finn.xsi.SimEngine``
set to None before the builder is imported) and ``get_vivado_root`` (asked for build metadata at the end) — inside
``finn_session``, which restores all three when the build is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pfq_edge.errors import GoldenCheckError, ToolchainError, first_line
from pfq_edge.export.finn_build import write_finn_input_model
from pfq_edge.progress import progress_bar

RESOURCES = ("LUT", "BRAM_18K", "URAM", "DSP")


@dataclass
class FinnEstimate:
    """FINN's estimates: ``layers`` rows {layer, cycles, LUT, BRAM_18K, URAM, DSP}, ``totals`` per resource,
    ``latency_us`` (critical path at the clock), ``throughput_fps`` (1 / slowest layer), ``folding`` (PE/SIMD).
    Layers FINN estimates at 0 everywhere carry pfq-edge's bound instead (``bounded``, zero_estimates.py); the
    totals include it, ``finn_totals`` are FINN's own."""

    part: str
    clock_mhz: float
    layers: list[dict]
    totals: dict
    critical_path_cycles: int
    max_cycles: int
    bottleneck: str
    latency_us: float
    throughput_fps: float
    folding: dict = field(default_factory=dict)
    report_dir: str = ""
    bounded: list = field(default_factory=list)  # layers FINN estimated at 0, bounded by zero_estimates.py
    finn_totals: dict = field(default_factory=dict)  # FINN's own totals, before those bounds

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def finn_session(build_dir: Path):
    """FINN's builder, imported and set up for ``build_dir``, for the ``with`` block only: FINN_BUILD_DIR and
    FINN_SETTINGS point into ``build_dir``, FINN's global settings are the dummy ones, its Vivado simulator probe and
    ``get_vivado_root`` are disabled. On exit the environment, FINN's settings and both patches are restored.
    Yields (finn.builder.build_dataflow, finn.builder.build_dataflow_config)."""
    keys = ("FINN_BUILD_DIR", "FINN_SETTINGS")
    saved_env = {k: os.environ.get(k) for k in keys}
    os.environ["FINN_BUILD_DIR"] = str(build_dir / "finn_tmp")
    os.environ["FINN_SETTINGS"] = str(build_dir / "finn_settings.yaml")  # absent: FINN falls back to defaults
    (build_dir / "finn_tmp").mkdir(parents=True, exist_ok=True)
    import finn.util.settings as finn_settings
    import finn.xsi

    saved_settings = finn_settings._SETTINGS  # FINN keeps its settings in this module global
    saved_sim = vars(finn.xsi).get("SimEngine", _UNSET)  # a lazy attribute: read it without loading the simulator
    try:
        finn_settings.initialize_dummy_settings()
        finn.xsi.SimEngine = None  # before build_dataflow_steps is imported: it binds SimEngine at import
        import finn.builder.build_dataflow as build_dataflow
        import finn.builder.build_dataflow_config as config

        saved_root = build_dataflow.get_vivado_root
        build_dataflow.get_vivado_root = lambda: "none"  # only used for metadata; no Vivado here
        try:
            yield build_dataflow, config
        finally:
            build_dataflow.get_vivado_root = saved_root
    finally:
        finn_settings._SETTINGS = saved_settings
        if saved_sim is _UNSET:
            vars(finn.xsi).pop("SimEngine", None)
        else:
            finn.xsi.SimEngine = saved_sim
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_UNSET = object()


def is_branchy(onnx_path: Path) -> bool:
    """Does the graph fork or join (a tensor read by two nodes, an Add or Concat of two computed tensors) or pool
    globally? Such graphs need ``step_pfq_streamline_branchy`` in place of FINN's ``step_streamline``."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            return True
        if node.op_type in ("Add", "Concat") and sum(1 for i in node.input if i and i not in constants) > 1:
            return True
    return any(n > 1 for name, n in readers.items() if name not in constants)


REFOLD_FROM = "step_target_fps_parallelization"  # FINN's first step that reads the folding goal


def finn_estimate(qonnx_path: Path, fpga, input_bits: int, build_dir: Path,
                  clip_thresholds: bool = False, branchy: bool | None = None,
                  description: str = "FINN estimate build", golden: "FinnGoldenChecks | None" = None,
                  refold: bool = False) -> FinnEstimate:
    """Run FINN's estimate-only dataflow build on ``qonnx_path`` for ``fpga`` (FpgaSpec: part, clock, target fps
    or folding file). Reports land in ``build_dir/finn/report``; FINN's log in ``build_dir/finn/build.log``.
    ``clip_thresholds``: add export/device/finn_steps.py's step after streamlining (models that normalise their
    input; the default models' builds stay FINN's own step list). ``branchy``: replace ``step_streamline`` with
    ``step_pfq_streamline_branchy`` (None: when ``is_branchy`` says the graph forks, joins or pools globally).

    ``golden``: FinnGoldenChecks run inside the build (its ``results`` filled in). ``refold``: continue the
    previous build in ``build_dir`` from its folding step (``REFOLD_FROM``) with this ``fpga``'s folding goal — the
    graph up to there does not depend on it (seconds instead of a whole EfficientNet build).

    Raises ToolchainError with FINN's error if the build fails (e.g. a layer FINN cannot map), GoldenCheckError
    naming the step after which FINN's graph diverged from the QONNX model.
    """
    build_dir = Path(build_dir).resolve()
    out_dir = build_dir / "finn"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = write_finn_input_model(qonnx_path, build_dir / "model_finn_input.onnx", input_bits)
    from qonnx.core.modelwrapper import ModelWrapper

    from pfq_edge.targets.backends.finn import lint

    lint.preflight(ModelWrapper(str(model_path)))
    log_path = out_dir / "build.log"
    failure: list = []  # why the step that raised did: our own check's ToolchainError, or describe_failure's line
    with progress_bar(description, total=None, unit="FINN steps") as advance, \
            open(log_path, "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            finn_session(build_dir) as (build_dataflow, config), _time_limit(FINN_TIME_LIMIT_S) as step:
        from finn.builder import build_dataflow_steps as steps_lib

        names = list(config.estimate_only_dataflow_steps)
        functions = [getattr(steps_lib, n) for n in names]
        if branchy if branchy is not None else is_branchy(model_path):
            from pfq_edge.export.device.finn_steps import step_pfq_streamline_branchy

            functions[names.index("step_streamline")] = step_pfq_streamline_branchy
        if clip_thresholds:
            from pfq_edge.export.device.finn_steps import step_pfq_clip_thresholds

            functions.insert(names.index("step_streamline") + 1, step_pfq_clip_thresholds)
        advance([f.__name__ for f in functions].index(REFOLD_FROM) if refold else 0, total=len(functions))
        if golden is not None:
            golden.plan([f.__name__ for f in functions])
        cfg = config.DataflowBuildConfig(
            output_dir=str(out_dir),
            synth_clk_period_ns=1000.0 / fpga.clock_mhz,
            fpga_part=fpga.part,
            target_fps=fpga.target_fps,
            folding_config_file=Path(fpga.folding_file).resolve() if fpga.folding_file else None,
            steps=[_with_progress(f, advance, step, failure, golden) for f in functions],
            generate_outputs=[config.DataflowOutputType.ESTIMATE_REPORTS],
            save_intermediate_models=True,
            start_step=REFOLD_FROM if refold else None,
        )
        try:
            rc = build_dataflow.build_dataflow_cfg(str(model_path), cfg)
        except _TimeLimit:
            log.flush()
            raise ToolchainError(f"FINN estimate build stopped: {step[0]} did not finish within {FINN_TIME_LIMIT_S} s "
                                 f"(FINN's log: {_keep_log(log_path)})") from None
        except (ToolchainError, GoldenCheckError):  # our own checks inside a step: their line says it all
            raise
        except Exception as exc:  # FINN re-raises under pytest; otherwise it returns -1 (handled below)
            log.flush()
            why = str(failure[0]) if failure else first_line(exc, 200)
            raise ToolchainError(f"FINN estimate build failed in {why} (FINN's log: {_keep_log(log_path)})") from None
    if rc != 0:
        if failure and isinstance(failure[0], (ToolchainError, GoldenCheckError)):
            raise failure[0]
        kept = _keep_log(log_path)
        why = failure[0] if failure else finn_error(log_path)
        raise ToolchainError(f"FINN estimate build failed in {why} (FINN's log: {kept})")
    estimate = read_estimates(out_dir / "report", fpga)
    with finn_session(build_dir / "bounds"):
        from pfq_edge.targets.backends.finn.zero_estimates import bound_zero_layers

        estimate.bounded = bound_zero_layers(
            estimate.layers, out_dir / "intermediate_models" / "step_generate_estimate_reports.onnx")
    if estimate.bounded:
        estimate.finn_totals = dict(estimate.totals)
        estimate.totals["LUT"] += sum(b["LUT"] for b in estimate.bounded)
    return estimate


FINN_GOLDEN_IMAGES = 64  # FINN's python executor runs one image at a time (~30 ms per image and graph, small nets)
CHECKED_STEPS = (("step_qonnx_to_finn", "FINN graph after step_qonnx_to_finn"),
                 ("streamline", "FINN graph after streamlining"),
                 ("step_convert_to_hw", "FINN graph after step_convert_to_hw"))


def _is_streamlining(step_name: str) -> bool:
    return "streamline" in step_name or "clip_thresholds" in step_name


class FinnGoldenChecks:
    """FINN's graph after QONNX→FINN conversion, after streamlining (its last streamlining step) and after HW
    conversion, executed with FINN's python executor on ``images`` (N, C, H, W) in [0, 1] as UINT<input_bits> pixels,
    each against ``reference``, the QONNX model's logits (N, classes) on the same images — like FINN's own
    ``verify_steps``. Called by ``finn_estimate`` right after each of those steps, so a divergence stops the build
    at the step that caused it (minutes into an EfficientNet build, not after it). ``results``: GoldenResults in
    step order. Needs FINN's settings (inside ``finn_session``)."""

    def __init__(self, reference, images, input_bits: int):
        import numpy as np

        self.reference = reference
        self.pixels = np.round(np.asarray(images, dtype=np.float64) * (2 ** input_bits - 1)).astype(np.float32)
        self.results: list = []
        self._after: dict[str, str] = {}

    def plan(self, step_names: list[str]) -> None:
        """Decide after which of the build's steps (names in order) each check runs."""
        streamlining = [n for n in step_names if _is_streamlining(n)]
        for key, stage in CHECKED_STEPS:
            name = (streamlining[-1] if streamlining else None) if key == "streamline" else key
            if name in step_names:
                self._after[name] = stage

    def after_step(self, step_name: str, model) -> None:
        """Check ``model`` (ModelWrapper) if ``step_name`` is a checked step; raises GoldenCheckError naming it."""
        import numpy as np
        from qonnx.core.onnx_exec import execute_onnx

        from pfq_edge.golden import check

        if step_name not in self._after:
            return
        iname, oname = model.graph.input[0].name, model.graph.output[0].name
        out = np.concatenate([np.asarray(execute_onnx(model, {iname: px[None]})[oname]).reshape(1, -1)
                              for px in self.pixels])
        self.results.append(check("finn", f"{self._after[step_name]} vs QONNX", self.reference, out))


def finn_golden_checks(build_dir: Path, reference, images, input_bits: int) -> list:
    """``FinnGoldenChecks`` on the intermediate models a finished build in ``build_dir`` saved (FINN's
    ``save_intermediate_models``): the same checks after the fact, e.g. on a build continued elsewhere. Returns
    GoldenResults in step order; raises GoldenCheckError naming the first step that diverges. Needs FINN's
    settings (inside ``finn_session``)."""
    from qonnx.core.modelwrapper import ModelWrapper

    folder = Path(build_dir) / "finn" / "intermediate_models"
    saved = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime_ns)  # in the order FINN wrote them
    checks = FinnGoldenChecks(reference, images, input_bits)
    checks.plan([p.stem for p in saved])
    for path in saved:
        checks.after_step(path.stem, ModelWrapper(str(path)))
    return checks.results


FINN_TIME_LIMIT_S = 2700  # seconds for one estimate build (small nets: ~10 s; EfficientNet-Lite0: 16–20 min on 2 cores)


class _TimeLimit(BaseException):  # not an Exception: FINN's builder catches those and carries on to its next step
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise _TimeLimit in the main thread after ``seconds`` (a FINN transformation that never converges would
    otherwise spin forever); yields a one-item list holding the name of the step running. No limit off the main
    thread (signals need it)."""
    import signal
    import threading

    current = ["FINN's first step"]
    if threading.current_thread() is not threading.main_thread():
        yield current
        return

    def expire(_signum, _frame):
        raise _TimeLimit()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield current
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _with_progress(step, advance, current: list, failure: list, golden: "FinnGoldenChecks | None" = None):
    """``step`` with the progress bar advanced after it, its name kept in ``current`` (for the time limit), and —
    when it raises — the line describing why put in ``failure`` (FINN's builder logs the exception and returns -1,
    so this is where the node and the assertion are still known). After ``step_convert_to_hw``, the nodes FINN did
    not map are checked; after the steps ``golden`` checks, FINN's graph is checked against the QONNX model."""
    from pfq_edge.targets.backends.finn import lint

    def run(model, cfg):
        current[0] = step.__name__
        advance(0, now=step.__name__)
        try:
            result = step(model, cfg)
            if step.__name__ == "step_convert_to_hw":
                lint.check_conversion(result)
            if golden is not None:
                golden.after_step(step.__name__, result)
        except (ToolchainError, GoldenCheckError) as exc:
            failure[:] = [exc]
            raise
        except Exception as exc:
            failure[:] = [lint.describe_failure(exc, step.__name__)]
            raise
        advance(1)
        return result

    run.__name__ = step.__name__
    return run


def finn_error(log_path: Path) -> str:
    """FINN's own error message from its build log, on one line (the exception after its rich traceback)."""
    lines = log_path.read_text(errors="replace").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", lines[i]):
            tail = [ln.strip() for ln in lines[i:] if ln.strip() and not ln.startswith("[")]
            return " ".join(tail)[:300]
    errors = []
    for i, ln in enumerate(lines):  # an ERROR record and its indented continuation lines (rich wraps them)
        if "ERROR" in ln:
            more = []
            for cont in lines[i + 1:]:
                if not cont.startswith(" ") or not cont.strip():
                    break
                more.append(cont.strip())
            errors.append(" ".join([ln.split("ERROR", 1)[1].strip(), *more]))
    return errors[-1][:300] if errors else "no error message in the log"


def _keep_log(log_path: Path) -> Path:
    """Copy the build log out of the staging folder, which is removed when the compile fails."""
    fd, kept = tempfile.mkstemp(prefix="pfq-edge-finn-", suffix=".log")
    with os.fdopen(fd, "wb") as f:
        f.write(log_path.read_bytes())
    return Path(kept)


def read_estimates(report_dir: Path, fpga) -> FinnEstimate:
    """Parse FINN's estimate reports in ``report_dir`` into a FinnEstimate for the profile's clock."""
    cycles = json.loads((report_dir / "estimate_layer_cycles.json").read_text())
    resources = json.loads((report_dir / "estimate_layer_resources.json").read_text())
    perf = json.loads((report_dir / "estimate_network_performance.json").read_text())
    folding_path = report_dir / "auto_folding_config.json"
    folding = json.loads(folding_path.read_text()) if folding_path.exists() else {}
    layers = [{"layer": name, "cycles": int(cycles.get(name, 0)), **{r: float(res.get(r, 0)) for r in RESOURCES}}
              for name, res in resources.items() if name != "total"]
    totals = {r: float(resources.get("total", {}).get(r, sum(row[r] for row in layers))) for r in RESOURCES}
    period_us = 1.0 / fpga.clock_mhz
    return FinnEstimate(
        part=fpga.part, clock_mhz=fpga.clock_mhz, layers=layers, totals=totals,
        critical_path_cycles=int(perf["critical_path_cycles"]), max_cycles=int(perf["max_cycles"]),
        bottleneck=str(perf.get("max_cycles_node_name", "")),
        latency_us=perf["critical_path_cycles"] * period_us,
        throughput_fps=1e6 / (perf["max_cycles"] * period_us),
        folding=folding, report_dir=str(report_dir),
    )
