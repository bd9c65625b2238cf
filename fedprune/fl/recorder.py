"""Run directory: everything a run writes, written as it goes.

Layout: config.yaml (resolved), metrics.jsonl and metrics.csv (one row per round,
flushed every round so a stopped run keeps what it had), summary.json, model.safetensors
(final weights) and mask.safetensors, accuracy.png.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ROUND_COLUMNS = [
    "round", "accuracy", "loss", "density", "inference_flops", "training_flops",
    "bytes_down_per_client", "bytes_up_per_client", "bytes_down", "bytes_up",
    "bytes_total", "clients", "failures", "wall_seconds", "eval_seconds", "client_seconds",
    "fed_accuracy", "fed_loss", "adjusted_layer", "adjusted_k",
]


class RunRecorder:
    """Appends per-round rows and writes artefacts into one run directory."""

    def __init__(self, run_dir: Path, config_yaml: str) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(config_yaml)
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.time()

    def log_round(self, row: dict[str, Any]) -> None:
        """Append one round (JSONL line + CSV rewrite), flushed to disk now."""
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.dir / "summary.json"
        path.write_text(json.dumps({k: _plain(v) for k, v in summary.items()}, indent=2))
        return path

    def save_model(self, state: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> None:
        """Weights and masks as safetensors (loadable without fedprune)."""
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                  str(self.dir / "model.safetensors"))
        save_file({k: np.ascontiguousarray(v.astype(np.uint8)) for k, v in masks.items()},
                  str(self.dir / "mask.safetensors"))

    def plot_accuracy(self) -> Path | None:
        rows = [r for r in self.rows if r.get("accuracy") is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["round"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.dir / "accuracy.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, so json and csv see plain values."""
    if isinstance(value, np.generic):
        return value.item()
    return value
