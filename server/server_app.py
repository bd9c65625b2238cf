"""Flower ServerApp for `flwr run .` (simulation or deployment).

The run config bridge: ``config`` names a YAML in experiments/configs/ (or a path),
``overrides`` holds space-separated key=value pairs; see fedprune.config.from_run_config.
``run_dir`` names the run folder (``fedprune run`` sets it); empty: a new folder under
``run.out_dir``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune.config import from_run_config
from fedprune.fl.rundir import new_run_dir

from .experiment import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(dict(context.run_config))
    run_dir = str(context.run_config.get("run_dir", "") or "")
    run_server(grid, cfg, Path(run_dir) if run_dir else
               new_run_dir(cfg, str(context.run_config.get("config", ""))))
