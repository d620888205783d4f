"""Loss and metric curves of a run as a PNG a person can read (from the CSVLogger's ``metrics.csv``)."""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

SKIP = {"epoch", "step"}


def read_metrics(csv_path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} of a Lightning ``metrics.csv`` (empty cells and non-finite values dropped)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for name, cell in row.items():
                if name in SKIP or not cell:
                    continue
                value = float(cell)
                if math.isfinite(value):
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(int(float(step)))
                    values.append(value)
    return series


def plot_metrics(csv_path: str | Path, png_path: str | Path | None = None, columns: int = 3) -> Path | None:
    """One panel per metric (train and val curves of the same quantity share a panel; log scale when the
    values span more than a factor 50 and stay positive) -> ``png_path`` (default: beside the CSV).
    Returns the PNG path, None when there is nothing to plot or matplotlib is missing (warned)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no metrics.png (pip install matplotlib)")
        return None
    series = read_metrics(csv_path)
    panels: dict[str, list[str]] = {}
    for name in sorted(series):
        panels.setdefault(name.split("/", 1)[-1], []).append(name)
    if not panels:
        return None
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        lo, hi = math.inf, -math.inf
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="o" if len(values) < 20 else None, ms=3, lw=1.2, label=name.split("/")[0])
            lo, hi = min(lo, min(values)), max(hi, max(values))
        if lo > 0 and hi / lo > 50:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    png_path = Path(png_path) if png_path else Path(csv_path).with_name("metrics.png")
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
