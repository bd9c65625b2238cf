"""Describe a partition: per-client label counts as CSV, Markdown and a heatmap.

Label skew is summarized by the total-variation distance between each client's label
distribution p_c and the federation's p (all clients' examples pooled):
TV(p_c, p) = 1/2 * sum_k |p_c[k] - p[k]|, 0 for a perfect IID client, near 1 for a client
holding only labels that are rare overall.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fedprune.config import DataConfig
from fedprune.data.cache import atomic_write
from fedprune.data.partitioning import partition
from fedprune.data.sources import load_split

ANNOTATE_MAX_CELLS = 400  # write counts into heatmap cells only while they stay legible


def label_counts(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(clients, classes) int64 matrix: examples of each label held by each client."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(
        np.int64)


def partition_summary(counts: np.ndarray) -> dict[str, float]:
    """Size statistics, labels present per client and mean TV distance to the pooled mix."""
    sizes = counts.sum(axis=1)
    present = sizes > 0  # an empty client has no label distribution
    p_global = counts.sum(axis=0) / counts.sum()
    p_client = counts[present] / sizes[present, None]
    tv = 0.5 * np.abs(p_client - p_global).sum(axis=1)
    return {
        "num_clients": int(len(counts)),
        "mean_size": float(sizes.mean()),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "mean_labels_per_client": float((counts > 0).sum(axis=1).mean()),
        "mean_tv_distance": float(tv.mean()) if len(tv) else float("nan"),
    }


def write_count_report(counts: np.ndarray, out_dir: Path, stem: str, title: str,
                       columns: list[str], unit: str) -> dict[str, Any]:
    """Per-client counts of each column (labels, text sources) as ``<stem>.csv``,
    ``<stem>.md`` and ``<stem>_heatmap.png``; return {"paths", "summary"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = partition_summary(counts)
    paths = {"csv": out_dir / f"{stem}.csv", "markdown": out_dir / f"{stem}.md",
             "heatmap": out_dir / f"{stem}_heatmap.png"}
    _write_csv(paths["csv"], counts, columns)
    _write_markdown(paths["markdown"], title, counts, summary, columns, unit)
    _write_heatmap(paths["heatmap"], title, counts, columns, unit)
    return {"paths": paths, "summary": summary}


def _write_csv(path: Path, counts: np.ndarray, columns: list[str]) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["client", "size"] + columns)
    for client, row in enumerate(counts):
        writer.writerow([client, int(row.sum())] + [int(c) for c in row])
    atomic_write(path, lambda f: f.write(out.getvalue().encode()))


def _write_markdown(path: Path, title: str, counts: np.ndarray, summary: dict[str, float],
                    columns: list[str], unit: str) -> None:
    header = ["client", "size"] + columns
    lines = [
        f"# {title}",
        "",
        f"- size per client ({unit}): mean {summary['mean_size']:.1f}, min "
        f"{summary['min_size']}, max {summary['max_size']}",
        f"- columns present per client (mean): {summary['mean_labels_per_client']:.2f}",
        f"- mean TV distance to the pooled distribution: {summary['mean_tv_distance']:.3f}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for client, row in enumerate(counts):
        cells = [str(client), str(int(row.sum()))] + [str(int(c)) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_heatmap(path: Path, title: str, counts: np.ndarray, columns: list[str],
                   unit: str) -> None:
    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    clients, width = counts.shape
    fig = Figure(figsize=(1.5 + 0.6 * width, min(2.0 + 0.3 * clients, 16.0)))
    ax = fig.add_subplot()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=unit)
    ax.set_xticks(range(width), columns, rotation=45 if width > 10 else 0, fontsize=7)
    ax.set_ylabel("client")
    ax.set_title(title, fontsize=9)
    if clients * width <= ANNOTATE_MAX_CELLS:
        threshold = counts.max() / 2
        for (i, k), value in np.ndenumerate(counts):
            ax.text(k, i, str(value), ha="center", va="center", fontsize=7,
                    color="black" if value > threshold else "white")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def partition_report(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Write partition.{csv,md} and partition_heatmap.png; return {"paths", "summary"}."""
    labels = np.asarray(load_split(cfg.dataset, "train", cfg.root, cfg.cache_dir).labels)
    counts = label_counts(partition(cfg), labels, int(labels.max()) + 1)
    return write_count_report(
        counts, out_dir, "partition",
        f"Partition: {cfg.dataset}, {cfg.partitioner}, {cfg.num_clients} clients",
        [f"label_{k}" for k in range(counts.shape[1])], "examples")
