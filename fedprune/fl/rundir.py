"""Where a run writes: <run.out_dir>/<run.name or config-name-timestamp>."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import ExperimentConfig


def new_run_dir(cfg: ExperimentConfig, config_name: str = "") -> Path:
    stem = Path(config_name).stem if config_name else "run"
    name = cfg.run.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.run.out_dir).expanduser().resolve() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
