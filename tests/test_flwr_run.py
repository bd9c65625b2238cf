"""`flwr run .` in simulation mode with --run-config (Flower's managed local SuperLink)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _cmdlines() -> dict[int, str]:
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return out


def _kill_everything_using(marker: str) -> None:
    """`flwr run .` leaves a managed SuperLink running: stop whatever uses our FLWR_HOME,
    and the SuperExec it detached (which names its parent with --parent-pid)."""
    cmdlines = _cmdlines()
    pids = {pid for pid, cmd in cmdlines.items() if marker in cmd}
    pids |= {pid for pid, cmd in cmdlines.items()
             if any(f"--parent-pid {p}" in cmd for p in pids)}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_flwr_run_simulation_with_run_config(tmp_path, data_root):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    overrides = ("data.num_clients=3 data.partitioner=iid data.train_subset=900 "
                 "data.test_subset=300 model.width=4 train.max_steps=3 fed.rounds=2 "
                 f"run.out_dir={tmp_path} run.name=flwr-run")
    try:
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "--stream",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
             "--run-config", f"config='default' overrides='{overrides}'"],
            env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run_id = re.search(r"run (?:ID )?(\d{4,})", proc.stdout + proc.stderr, re.I)
        listing = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], env=env,
                                 capture_output=True, text=True, timeout=60, cwd=REPO)
    finally:
        _kill_everything_using(str(home))
    # `flwr run --stream` exits 0 even when the ServerApp crashed: ask the SuperLink
    runs = json.loads(listing.stdout).get("runs", [])
    assert runs and all(r.get("status") == "finished:completed" for r in runs), listing.stdout
    if run_id:
        assert any(str(r.get("run-id")) == run_id.group(1) for r in runs) or len(runs) == 1
    rows = [json.loads(x) for x in (tmp_path / "flwr-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 for r in rows[1:])
