"""The summary of an ``evaluate.py -m`` sweep: one row per point (its overrides, status, checkpoints with sha256,
sampler settings, counts and the aggregate metrics with the number of meshes each covers) as CSV and markdown,
and a plot of the main metrics across the points. Written by the Hydra callback :class:`SweepSummary` when the
sweep ends, or again with ``python -m d3ds2.eval.sweep SWEEP_DIR``."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from .geometry import FAILED_AS_ZERO

TABLE = "sweep_summary"
log = logging.getLogger(__name__)


def read_points(sweep_dir: str | Path) -> list[dict]:
    """One record per job directory of ``sweep_dir`` (numbered subdirectories), sorted by job number: its
    ``summary.json`` (``{"status": "failed", "error": ...}`` when the job left none) plus ``point`` and
    ``overrides`` (from ``.hydra/overrides.yaml``)."""
    points = []
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    for d in sorted(jobs, key=lambda p: int(p.name)):
        summary = d / "summary.json"
        rec = json.loads(summary.read_text()) if summary.is_file() else {
            "status": "failed", "error": "the point left no summary.json (killed or crashed before writing it)"}
        overrides = d / ".hydra" / "overrides.yaml"
        rec["point"] = int(d.name)
        rec["overrides"] = yaml.safe_load(overrides.read_text()) if overrides.is_file() else []
        points.append(rec)
    return points


def _ckpt_text(checkpoints: dict) -> str:
    return "; ".join(f"{role}={c['file']}@{(c['sha256'] or 'missing')[:12]}" for role, c in checkpoints.items())


def _sampler_text(sampler: dict | None) -> str:
    if not sampler:
        return ""
    stages = [f"{k}:{v['steps']}/{v['guidance']}" for k, v in sampler.items() if isinstance(v, dict)]
    return f"seed {sampler.get('seed')}, steps/guidance {' '.join(stages)}"


def metric_columns(points: list[dict]) -> list[str]:
    """The aggregate keys shown per metric: ``k/mean`` for every metric and ``k/mean_failed_as_0`` for F-scores."""
    keys = {k for p in points for k in (p.get("metrics") or {})}
    return sorted(k for k in keys if k.endswith("/mean") or k.endswith(f"/{FAILED_AS_ZERO}"))


def _count_key(key: str) -> str:
    return key.replace(f"/{FAILED_AS_ZERO}", "/n_failed_as_0") if key.endswith(FAILED_AS_ZERO) else \
        key[: -len("/mean")] + "/n"


def rows(points: list[dict]) -> tuple[list[str], list[dict]]:
    """Table fields and one row per point (``overrides``: those that differ between points, the sweep axes;
    metric cells hold the value, ``<metric> n`` its mesh count)."""
    metrics = metric_columns(points)
    fields = ["point", "status", "overrides", "protocol", "checkpoints", "sampler", "meshes", "evaluated", "failed"]
    for k in metrics:
        fields += [k, f"{k} n"]
    fields.append("error")
    common = set.intersection(*(set(p["overrides"]) for p in points)) if len(points) > 1 else set()
    out = []
    for p in points:
        m = p.get("metrics") or {}
        proto = p.get("protocol")
        row = {"point": p["point"], "status": p.get("status"),
               "overrides": " ".join(o for o in p["overrides"] if o not in common),
               "protocol": proto.get("name") if isinstance(proto, dict) else proto,
               "checkpoints": _ckpt_text(p.get("checkpoints") or {}), "sampler": _sampler_text(p.get("sampler")),
               "meshes": m.get("meshes"), "evaluated": m.get("evaluated"), "failed": m.get("failed"),
               "error": (p.get("error") or "").splitlines()[0][:300] if p.get("error") else ""}
        for k in metrics:
            row[k] = m.get(k)
            row[f"{k} n"] = m.get(_count_key(k))
        out.append(row)
    return fields, out


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def write_markdown(path: Path, fields: list[str], table: list[dict]) -> None:
    """A markdown table; each metric cell reads ``value (n=count)``."""
    metric = [f for f in fields if f.endswith("/mean") or f.endswith(FAILED_AS_ZERO)]
    cols = [f for f in fields if not f.endswith(" n") and f not in metric and f != "error"] + metric + ["error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        cells = []
        for c in cols:
            if c in metric:
                cells.append(f"{_cell(r[c])} (n={_cell(r[c + ' n'])})" if r[c] is not None else "")
            else:
                cells.append(_cell(r[c]))
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def _short(override: str) -> str:
    """``generate.ckpt.sparse_dit_512=/runs/dit_b`` -> ``sparse_dit_512=dit_b`` (a plot label)."""
    key, _, value = override.partition("=")
    return f"{key.split('.')[-1]}={Path(value).name if '/' in value else value}"


def plotted_metrics(metrics: list[str], limit: int = 6) -> list[str]:
    """The metrics worth a panel, most telling first: F-scores with failures as 0, alignment means, Chamfer L1,
    edge Chamfer, normal consistency (F-scores over the successful meshes only and Chamfer L2 left out)."""
    geometry = ["chamfer_l1/mean", "edge_chamfer/mean", "normal_consistency/mean"]
    first = [k for k in metrics if k.endswith(FAILED_AS_ZERO)]
    alignment = [k for k in metrics if k.endswith("/mean") and not k.startswith(("fscore@", "chamfer_l2"))
                 and k not in geometry]
    return (first + alignment + [k for k in geometry if k in metrics])[:limit]


def plot(path: Path, table: list[dict], metrics: list[str]) -> None:
    """One bar panel per metric of :func:`plotted_metrics`, a bar per point labelled with its mesh count; failed
    points are marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = plotted_metrics(metrics) or ["(no metric)"]
    height = 1.7 * len(shown) + 1.3
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(6.0, 1.1 * len(table) + 2.5), height), sharex=True,
                             squeeze=False)
    labels = ["\n".join([f"#{r['point']}"] + [_short(o) for o in r["overrides"].split()]) for r in table]
    for ax, key in zip(axes[:, 0], shown):
        for i, r in enumerate(table):
            v = r.get(key)
            if r["status"] != "ok" or not isinstance(v, (int, float)):
                ax.text(i, 0, "failed" if r["status"] != "ok" else "no value", color="tab:red", ha="center",
                        va="bottom", fontsize=7, rotation=90)
                continue
            ax.bar(i, v if math.isfinite(v) else 0.0, color="tab:blue")
            n = r.get(f"{key} n")
            ax.text(i, v if math.isfinite(v) else 0.0, f"{v:.3g}" + (f"\nn={int(n)}" if n is not None else ""),
                    ha="center", va="bottom", fontsize=6)
        ax.set_ylabel(key.replace("/", "\n"), fontsize=7)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.3)
    axes[-1, 0].set_xlim(-0.6, len(table) - 0.4)
    axes[-1, 0].set_xticks(range(len(table)))
    axes[-1, 0].set_xticklabels(labels, fontsize=6)
    axes[0, 0].set_title("sweep summary (n: meshes each mean covers)", fontsize=9)
    fig.subplots_adjust(left=0.15, right=0.98, top=1 - 0.4 / height, bottom=1.0 / height, hspace=0.12)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise_sweep(sweep_dir: str | Path) -> dict[str, Path]:
    """Write ``sweep_summary.csv``, ``.md`` and ``.png`` (with matplotlib) into ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    points = read_points(sweep_dir)
    fields, table = rows(points)
    paths = {ext: sweep_dir / f"{TABLE}.{ext}" for ext in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    write_markdown(paths["md"], fields, table)
    try:
        plot(paths["png"], table, metric_columns(points))
    except ImportError as err:  # the table is written; the plot needs the plots extra
        log.warning("no sweep plot: %s; pip install 'd3ds2[plots]' (matplotlib) and run python -m d3ds2.eval.sweep %s",
                    err, sweep_dir)
        del paths["png"]
    return paths


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends; a sweep in which no point produced a
    metric exits non-zero (after writing its table)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        paths = summarise_sweep(config.hydra.sweep.dir)
        print(f"sweep summary: {', '.join(str(p) for p in paths.values())}")
        if not any(p.get("status") == "ok" for p in read_points(config.hydra.sweep.dir)):
            raise SystemExit(f"evaluate.py -m: every sweep point failed; the errors are in {paths['md']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise an evaluate.py -m sweep directory (table + plot).")
    parser.add_argument("sweep_dir")
    paths = summarise_sweep(parser.parse_args(argv).sweep_dir)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
