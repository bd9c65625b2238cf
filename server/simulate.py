"""Run an experiment as an in-process Flower simulation (what `fedprune run` calls).

Uses ``flwr.simulation.run_simulation`` (Ray backend) with a ServerApp that closes over
the already-validated config, so nothing is parsed twice. ``flwr run .`` reaches the same
``run_server`` through server/server_app.py instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune.config import ExperimentConfig

from .experiment import run_server

# Never let Flower install dependencies, phone home or check for updates (flower.md).
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
              "RAY_DEDUP_LOGS": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def simulate(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Run ``cfg`` with ``cfg.data.num_clients`` virtual SuperNodes; return the summary."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run_server(grid, cfg, run_dir)
        except BaseException as err:  # re-raised below: run_simulation swallows it
            outcome["error"] = err
            raise

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.sim.client_cpus,
                                 "num_gpus": cfg.sim.client_gpus},
            "init_args": {"log_to_driver": True, "logging_level": "WARNING"},
        },
    )
    if "error" in outcome:
        raise RuntimeError(f"the ServerApp failed: {outcome['error']!r}") from outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError(f"the simulation ended without a summary; see {run_dir}")
    return outcome["summary"]
