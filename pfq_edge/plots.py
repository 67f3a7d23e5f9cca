"""PNG plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_folded_ranges(layers: list[dict], title: str, path: Path) -> Path:
    """Bar chart of the folded-weight range max|W'| per conv layer, before and after PfQ (log scale).

    layers: rows of ``PfqAnalysis.layers`` (``folded_max_abs_before``/``_after``); writes ``path`` atomically.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pfq_edge.io import atomic_write_bytes

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
