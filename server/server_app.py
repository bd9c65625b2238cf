"""Flower ServerApp for `flwr run .` (simulation or deployment).

The run config bridge: ``config`` names a YAML in experiments/configs/ (or a path),
``overrides`` holds space-separated key=value pairs; see fedprune.config.from_run_config.
``run_dir`` names the run folder (``fedprune run`` sets it); empty: a new folder under
``run.out_dir``. ``resume = true`` continues ``run_dir`` from its checkpoint.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune.config import from_run_config
from fedprune.fl.rundir import new_run_dir

from .experiment import run_server

app = ServerApp()


OWNER_ENV = "FEDPRUNE_OWNER_PID"  # set by `fedprune run` (server/simulate.py)


def _exit_with_owner() -> None:
    """When `fedprune run` started this run, stop the moment it is gone (even killed with
    SIGKILL): its SuperLink dies with it, and Flower would otherwise let this ServerApp
    run on until the SuperLink's heartbeat times out."""
    owner = int(os.environ.get(OWNER_ENV, "0") or 0)
    if not owner:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                _kill_own_tree()
                os._exit(1)
            except PermissionError:  # alive, owned by another user
                pass
            time.sleep(1.0)
    threading.Thread(target=watch, name="fedprune-owner-watch", daemon=True).start()


def _kill_own_tree() -> None:
    """Every process this one started (Ray's, whose helper agents otherwise notice their
    raylet's death only tens of seconds later)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@app.main()
def main(grid: Grid, context: Context) -> None:
    _exit_with_owner()
    cfg = from_run_config(dict(context.run_config))
    run_dir = str(context.run_config.get("run_dir", "") or "")
    resume = bool(context.run_config.get("resume", False))
    if resume and not run_dir:
        raise ValueError("run_config resume=true needs run_dir: the run folder to continue")
    run_server(grid, cfg, Path(run_dir) if run_dir else
               new_run_dir(cfg, str(context.run_config.get("config", ""))), resume=resume)
