"""`fedprune run`: Flower's supported simulation path (private SuperLink + `flwr run`), a
clean screen, the full log in the run folder, and nothing left running afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from server.simulate import _RowTail, stop_tree

TINY = ["data.num_clients=3", "data.partitioner=iid", "data.train_subset=900",
        "data.test_subset=300", "model.width=4", "train.max_steps=3"]
# Processes a simulation starts; none may outlive `fedprune run`.
FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr log",
                    "raylet", "gcs_server", "default_worker.py")


def _flower_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(marker in cmd for marker in FLOWER_PROCESSES):
            pids.add(proc.pid)
    return pids


def _left_over(before: set[int], wait: float = 15.0) -> set[int]:
    """Flower/Ray processes started since ``before`` that are still alive after ``wait``."""
    deadline = time.time() + wait
    while (left := _flower_pids() - before) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants now (Flower detaches some into new sessions)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _still_running(tree: list[psutil.Process], wait: float) -> list[str]:
    _, alive = psutil.wait_procs(tree, timeout=wait)
    return [" ".join(p.cmdline()[:3]) for p in alive
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _default_sigint() -> None:
    # A job started in the background by a non-interactive shell (as CI may start the test
    # command) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler; restore the default so the child reacts to SIGINT as it would at a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fedprune(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedprune.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kwargs)


@pytest.mark.slow
def test_run_prints_rounds_and_table_and_nothing_of_flower(tmp_path, data_root):
    before = _flower_pids()
    proc = _fedprune("default", *TINY, "fed.rounds=2", f"run.out_dir={tmp_path}", "run.name=r")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    rounds = [line for line in lines if line.startswith("[fedprune] round")]
    assert [int(re.search(r"round\s+(\d+)/2", r).group(1)) for r in rounds] == [0, 1, 2]
    assert "final test accuracy" in out and "bytes sent (vs dense FedAvg)" in out
    # no Flower or Ray chatter, no config dump: only fedprune's own lines and the table
    noise = [line for line in lines + err.splitlines()
             if re.search(r"\b(INFO|WARNING|DEBUG)\b|FutureWarning|ClientAppActor|Ray|"
                          r"num_clients:|fedprune-config", line)]
    assert not noise, noise
    assert err == ""
    run = tmp_path / "r"
    log = (run / "flower.log").read_text()
    # Flower's full log went to the run folder instead, without colour codes
    assert "Starting Flower Simulation" in log and "[ROUND 2/2]" in log
    assert "\x1b[" not in log
    assert "3 simulated SuperNodes" in log  # the federation config reached Flower
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 3 for r in rows[1:])
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
    assert not _left_over(before)


@pytest.mark.slow
def test_failed_run_exits_1_names_the_cause_and_verbose_shows_flower(tmp_path, data_root):
    """An empty folder as data root passes the CLI's check (it exists) and fails in the
    ServerApp: the exit status, the reason and the log say so; nothing keeps running."""
    before = _flower_pids()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _fedprune("default", *TINY, "fed.rounds=1", f"data.root={empty}",
                     f"run.out_dir={tmp_path}", "run.name=f", "--verbose")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 1, out + err
    assert "finished:failed" in err and "cifar10" in err and str(empty) in err
    assert "flower.log" in err
    assert "Starting Flower Simulation" in out  # --verbose: Flower's log on screen
    assert not _left_over(before)


def test_missing_data_root_fails_before_flower_starts(tmp_path):
    proc = _fedprune("default", f"data.root={tmp_path / 'nope'}", f"run.out_dir={tmp_path}")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "data root" in err and "data.root" in err and "nope" in err
    assert not (tmp_path / "default").exists() and len(list(tmp_path.iterdir())) == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_stops_every_process_and_keeps_its_rounds(tmp_path, data_root, sig):
    proc = _fedprune("default", *TINY, "fed.rounds=200", f"run.out_dir={tmp_path}",
                     "run.name=i")
    metrics = tmp_path / "i" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    tree = _tree(proc.pid)
    assert any("flower-superlink" in " ".join(p.cmdline()) for p in tree)
    proc.send_signal(sig)  # SIGKILL: no handler runs; the SuperLink dies with its parent
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not _still_running(tree, wait=30)  # this run's processes, all of them
    assert len(metrics.read_text().splitlines()) >= 2  # what was computed is kept
    assert (tmp_path / "i" / "model.safetensors").exists()


def test_row_tail_returns_each_round_once_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = _RowTail(path)
    assert tail.new() == []  # not written yet
    path.write_text('{"round": 0}\n{"round": 1')  # a torn last line (crash mid-write)
    assert tail.new() == [{"round": 0}]
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')  # rewritten whole
    assert tail.new() == [{"round": 1}, {"round": 2}]
    assert tail.new() == []
    resumed = _RowTail(path, after=1)  # a resumed run shows only the rounds after its own
    assert resumed.new() == [{"round": 2}]


def test_stop_tree_reaches_children_in_other_sessions(tmp_path):
    """A child that detached into its own session (as Flower's SuperExec does) is stopped
    with its parent; a plain group kill would miss it."""
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
              " start_new_session=True)\n"
              "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 30
    while not psutil.Process(parent.pid).children() and time.time() < deadline:
        time.sleep(0.1)
    child = psutil.Process(parent.pid).children()[0]
    assert os.getsid(child.pid) != os.getsid(parent.pid)
    stop_tree(parent, grace=5)
    assert parent.poll() is not None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
