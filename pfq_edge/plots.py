"""PNG plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_folded_ranges(layers: list[dict], title: str, path: Path) -> Path:
    """Bar chart of the folded-weight range max|W'| per conv layer, before and after PfQ (log scale).

    layers: rows of ``PfqAnalysis.layers`` (``folded_max_abs_before``/``_after``); writes ``path`` atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(layers)
    x = list(range(n))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * n + 2), 3.6), dpi=120)
    ax.bar([i - 0.2 for i in x], [r["folded_max_abs_before"] for r in layers], width=0.4, label="before PfQ")
    ax.bar([i + 0.2 for i in x], [r["folded_max_abs_after"] for r in layers], width=0.4, label="after PfQ")
    removed = [i for i, r in enumerate(layers) if r.get("removed_filters")]
    if removed:
        top = max(r["folded_max_abs_before"] for r in layers)
        ax.scatter(removed, [top * 1.5] * len(removed), marker="v", color="k", s=12, label="filters removed")
    ax.set_yscale("log")
    ax.set_xlabel("conv layer (graph order)")
    ax.set_ylabel("folded weight range max|W'|")
    ax.set_title(title, fontsize=10)
    if n <= 30:
        ax.set_xticks(x, [r["layer"] for r in layers], rotation=90, fontsize=7)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    return _save(plt, fig, path)


def _figure(width: float = 6.4, height: float = 3.6, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=120)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    """PNG bytes without a timestamp or version text, so that the same data give the same file."""
    import io

    from pfq_edge.io import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_accuracy_vs_size(points: list[dict], title: str, path: Path) -> Path:
    """Top-1 accuracy (%) against logical weight size (KiB, log scale), one labelled point per row of ``points``
    ({label, top1 in [0, 1], weight_bits}); rows without both values are skipped."""
    plt, fig, ax = _figure()
    shown = [p for p in points if p.get("top1") is not None and p.get("weight_bits")]
    for i, p in enumerate(shown):
        x, y = p["weight_bits"] / 8 / 1024, 100 * p["top1"]
        ax.scatter([x], [y], s=28)
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(-6, 6 if i % 2 else -12), fontsize=7,
                    ha="right")
    ax.set_xscale("log")
    ax.set_xlabel("logical weight size (KiB)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_finn_layers(layers: list[dict], title: str, path: Path) -> Path:
    """FINN's per-layer estimate (rows {layer, cycles, LUT, BRAM_18K, DSP}): cycles per frame (left, the slowest
    layer sets the throughput) and LUT / BRAM_18K / DSP (right, log scale)."""
    plt, fig, (left, right) = _figure(max(8.0, 0.5 * len(layers) + 4), 4.2, ncols=2)
    names = [r["layer"] for r in layers]
    x = list(range(len(layers)))
    left.bar(x, [r["cycles"] for r in layers], color="tab:blue")
    left.set_ylabel("cycles per frame")
    for i, res in enumerate(("LUT", "BRAM_18K", "DSP")):
        right.bar([v + (i - 1) * 0.27 for v in x], [r.get(res, 0) for r in layers], width=0.27, label=res)
    right.set_yscale("log")
    right.set_ylim(bottom=0.5)  # zero-resource layers show no bar
    right.set_ylabel("resources (estimate)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xticks(x, names, rotation=90, fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def plot_latency(engines: list[dict], budget_ms: float | None, title: str, path: Path) -> Path:
    """Median latency per engine (rows {label, median_ms, p90_ms, min_ms}) as bars with min–p90 whiskers, and the
    profile's latency budget as a line."""
    plt, fig, ax = _figure(6.4, 0.5 * len(engines) + 1.8)
    y = list(range(len(engines)))
    med = [e["median_ms"] for e in engines]
    ax.barh(y, med, color="tab:blue")
    ax.errorbar(med, y, xerr=[[m - e["min_ms"] for m, e in zip(med, engines)],
                              [e["p90_ms"] - m for m, e in zip(med, engines)]], fmt="none", ecolor="k", capsize=3)
    if budget_ms:
        ax.axvline(budget_ms, color="tab:red", linestyle="--", label=f"budget {budget_ms:g} ms")
        ax.legend(fontsize=7)
    ax.set_yticks(y, [e["label"] for e in engines], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per call (median; whiskers min–p90)")
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)
