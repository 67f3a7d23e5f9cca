"""Latency harness and fresh-process execution of compiled models (shared/cases 10).

Protocol: every engine runs in its own Python process (TVM's spinning worker threads distort another runtime in
the same process), with its thread count set before the runtime loads; ``warmup`` calls are run and dropped; then
calls are timed one by one (input array in, output array out) until both ``min_repeats`` calls and ``min_time_s``
seconds are reached; the median, p90, min and spread are reported with the thread count and batch size.

Engines: ``tvm`` (a library from ``export_library``), ``onnxruntime`` (an ONNX file, at a graph-optimization level:
"all" is its default), ``torch`` (a ``torch.export`` archive run eagerly).

The worker is this module: ``python -m pfq_edge.runners.latency {time,run} --engine E --model F --inputs X.npy …``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("tvm", "onnxruntime", "torch")
WARMUP = 10
MIN_TIME_S = 1.0
MIN_REPEATS = 20
MAX_REPEATS = 100_000


def load_engine(engine: str, model: Path, threads: int, ort_level: str = "all"):
    """A callable ``f(x: np.ndarray (B, C, H, W) float32) -> np.ndarray`` for ``model`` in ``engine``.

    Runs in the worker process. TVM reads its thread count from TVM_NUM_THREADS, which the parent sets;
    ``ort_level`` is onnxruntime's graph-optimization level (off | basic | extended | all).
    """
    if engine == "tvm":
        import tvm
        from tvm import relax

        device = tvm.cpu()
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(model)), device)
        main = vm["main"]
        return lambda x: main(tvm.runtime.tensor(x, device)).numpy()
    if engine == "onnxruntime":
        from pfq_edge.runners.onnx import ort_session

        session = ort_session(model, ort_level, threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if engine == "torch":
        import torch

        torch.set_num_threads(threads)
        module = torch.export.load(str(model)).module()

        def run(x):
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()
        return run
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def time_calls(fn, x: np.ndarray, warmup: int = WARMUP, min_time_s: float = MIN_TIME_S,
               min_repeats: int = MIN_REPEATS, max_repeats: int = MAX_REPEATS) -> dict:
    """Call ``fn(x)`` ``warmup`` times (dropped), then time single calls until ≥ ``min_repeats`` calls and
    ≥ ``min_time_s`` seconds (or ``max_repeats`` calls). Returns milliseconds per call: median, p90, min, max, mean,
    std, and repeats / warmup / duration_s."""
    for _ in range(warmup):
        fn(x)
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter_ns()
        fn(x)
        times.append(time.perf_counter_ns() - t0)
    ms = np.asarray(times, dtype=np.float64) / 1e6
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean()), "std_ms": float(ms.std()), "repeats": len(times), "warmup": warmup,
            "duration_s": round(time.perf_counter() - start, 3)}


def _thread_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"})
    return env


def _worker(args: list[str], threads: int, timeout_s: float) -> str:
    from pfq_edge.errors import ToolchainError

    cmd = [sys.executable, "-m", "pfq_edge.runners.latency", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(threads), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"latency worker {' '.join(args[:3])} took more than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "Scope Saving" not in ln]
        raise ToolchainError(f"{args[2]} worker failed on {Path(args[4]).name}: "
                             f"{lines[-1].strip()[:240] if lines else f'exit {done.returncode}'}")
    return done.stdout


def measure(engine: str, model: Path, inputs: np.ndarray, threads: int, warmup: int = WARMUP,
            min_time_s: float = MIN_TIME_S, min_repeats: int = MIN_REPEATS, ort_level: str = "all",
            timeout_s: float = 600) -> dict:
    """Latency of ``model`` in ``engine`` on ``inputs`` (B, C, H, W) float32, in a fresh process with ``threads``.

    Returns ``time_calls``' dict plus engine, batch, threads and the worker's pid. Raises ToolchainError (one line)
    if the worker fails or exceeds ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="pfq-edge-lat") as tmp:
        x = Path(tmp) / "x.npy"
        np.save(x, np.ascontiguousarray(inputs, dtype=np.float32))
        out = _worker(["time", "--engine", engine, "--model", str(model), "--inputs", str(x), "--threads",
                       str(threads), "--warmup", str(warmup), "--min-time", str(min_time_s), "--min-repeats",
                       str(min_repeats), "--ort-level", ort_level], threads, timeout_s)
    return json.loads(out.strip().splitlines()[-1])


def run_outputs(engine: str, model: Path, images: np.ndarray, batch_size: int, threads: int = 1,
                timeout_s: float = 600) -> np.ndarray:
    """Outputs of ``model`` in ``engine`` on ``images`` (N, C, H, W), N a multiple of ``batch_size``, computed in a
    fresh process that loads the artefact from disk (what a deployment does). Raises ToolchainError."""
    with tempfile.TemporaryDirectory(prefix="pfq-edge-run") as tmp:
        x, y = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        np.save(x, np.ascontiguousarray(images, dtype=np.float32))
        _worker(["run", "--engine", engine, "--model", str(model), "--inputs", str(x), "--out", str(y),
                 "--batch", str(batch_size), "--threads", str(threads)], threads, timeout_s)
        return np.load(y)


def torch_export_archive(model, x: np.ndarray, folder: Path) -> Path:
    """``model`` (eval mode) as a ``torch.export`` archive ``folder``/model.pt2 for inputs like ``x`` (B, C, H, W),
    the form the torch engine loads in its worker."""
    import torch

    path = Path(folder) / "model.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(model.eval(), (torch.from_numpy(x),)), str(path))
    return path


def resolve_threads(threads: int) -> int:
    """A profile's ``threads``: 0 means every core of this machine."""
    return threads or os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pfq_edge.runners.latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["time", "run"])
    ap.add_argument("--engine", choices=ENGINES, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--min-time", type=float, default=MIN_TIME_S)
    ap.add_argument("--min-repeats", type=int, default=MIN_REPEATS)
    ap.add_argument("--ort-level", choices=["off", "basic", "extended", "all"], default="all")
    args = ap.parse_args(argv)
    x = np.load(args.inputs)
    fn = load_engine(args.engine, args.model, args.threads, args.ort_level)
    if args.mode == "run":
        y = np.concatenate([fn(np.ascontiguousarray(x[i:i + args.batch])) for i in range(0, len(x), args.batch)])
        np.save(args.out, y)
        return 0
    result = time_calls(fn, x, args.warmup, args.min_time, args.min_repeats)
    facts = {"ort_level": args.ort_level} if args.engine == "onnxruntime" else {}
    print(json.dumps({"engine": args.engine, "batch": int(x.shape[0]), "threads": args.threads, "pid": os.getpid(),
                      **facts, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
