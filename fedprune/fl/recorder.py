"""Run directory: everything a run writes, written as it goes and atomically.

Layout: config.yaml (resolved), metrics.jsonl and metrics.csv (one row per round),
summary.json, model.safetensors and mask.safetensors (the latest round), accuracy.png, and
checkpoint.safetensors: all a run needs to continue after a crash (weights, mask, the
method's state, the sampler's RNG state, the round) in one file, so its parts can never
come from different rounds. Every file is written under a temporary name and renamed into
place (``data.cache.atomic_write``): a crash mid-write leaves the previous version whole.
metrics.jsonl is rewritten whole each round too, so a crash cannot leave half a line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..data.cache import atomic_write
from ..machine import describe_machine

ROUND_COLUMNS = [
    "round", "accuracy", "loss", "density", "inference_flops", "training_flops",
    "bytes_down_per_client", "bytes_up_per_client", "bytes_down", "bytes_up",
    "bytes_total", "clients", "failures", "rejected", "timed_out", "retries",
    "wall_seconds", "eval_seconds", "client_seconds", "fed_accuracy", "fed_loss",
    "adjusted_layer", "adjusted_k",
]
CHECKPOINT = "checkpoint.safetensors"


class RunExistsError(FileExistsError):
    """The run folder already holds rounds of a run: resume it or pick another name."""


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


class RunRecorder:
    """Appends per-round rows and writes artefacts into one run directory.

    ``resume_round``: continue a run whose checkpoint is at that round (rows after it,
    written before a crash, are dropped); None: a new run, refused if rows exist."""

    def __init__(self, run_dir: Path, config_yaml: str, resume_round: int | None = None
                 ) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        rows_path = self.dir / "metrics.jsonl"
        if resume_round is None:
            if rows_path.exists() and rows_path.read_text().strip():
                raise RunExistsError(f"{self.dir} already holds a run (metrics.jsonl): resume "
                                     "it (fedprune run --resume) or choose another run.name")
            write_text(self.dir / "config.yaml", config_yaml)
        else:
            self.rows = [r for r in read_rows(rows_path) if r["round"] <= resume_round]
            self._write_rows()

    def log_round(self, row: dict[str, Any]) -> None:
        """Add one round's row; metrics.jsonl and metrics.csv are rewritten now."""
        self.rows.append({k: _plain(v) for k, v in row.items()})
        self._write_rows()

    def _write_rows(self) -> None:
        write_text(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.dir / "metrics.csv", out.getvalue())

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """summary.json, with the machine it ran on (runs differ across CPUs)."""
        path = self.dir / "summary.json"
        summary = {**summary, "machine": summary.get("machine") or describe_machine()}
        write_text(path, json.dumps({k: _plain(v) for k, v in summary.items()}, indent=2))
        return path

    def write_json(self, name: str, record: dict[str, Any]) -> None:
        write_text(self.dir / name, json.dumps(record, indent=2))

    def save_model(self, state: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> None:
        """Weights and masks as safetensors (loadable without fedprune)."""
        _save(self.dir / "model.safetensors", state)
        _save(self.dir / "mask.safetensors", {k: v.astype(np.uint8) for k, v in masks.items()})

    def save_checkpoint(self, server_round: int, state: dict[str, np.ndarray],
                        masks: dict[str, np.ndarray], method_state: dict[str, np.ndarray],
                        extra: dict[str, Any]) -> None:
        """Everything needed to continue after ``server_round``, in one atomic file."""
        tensors = {**{f"state/{k}": v for k, v in state.items()},
                   **{f"mask/{k}": v.astype(np.uint8) for k, v in masks.items()},
                   **{f"method/{k}": v for k, v in method_state.items()}}
        _save(self.dir / CHECKPOINT, tensors,
              {"round": str(server_round), "extra": json.dumps(extra)})

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
        buf = io.BytesIO()
        fig.savefig(buf, dpi=120, format="png")
        plt.close(fig)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
        return path


def load_checkpoint(run_dir: Path) -> tuple[int, dict, dict, dict, dict]:
    """(round, state, bool masks, method state, extra) of a run's checkpoint."""
    from safetensors import safe_open

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no finished round to "
                                "resume from")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "round" not in meta:
        raise ValueError(f"{path} has no round in its metadata: not a fedprune checkpoint")
    parts: dict[str, dict[str, np.ndarray]] = {"state": {}, "mask": {}, "method": {}}
    for key, value in tensors.items():
        kind, name = key.split("/", 1)
        parts[kind][name] = value
    masks = {k: v.astype(bool) for k, v in parts["mask"].items()}
    return (int(meta["round"]), parts["state"], masks, parts["method"],
            json.loads(meta.get("extra", "{}")))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a metrics.jsonl (a torn last line from a crash is skipped)."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
          ) -> None:
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, so json and csv see plain values."""
    if isinstance(value, np.generic):
        return value.item()
    return value
