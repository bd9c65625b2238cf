"""Crash-safe runs: atomic run files, one-file checkpoints, and a run killed with SIGKILL
mid-run that `fedprune run --resume` finishes exactly as an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from fedprune.fl.recorder import RunExistsError, RunRecorder, load_checkpoint, read_rows
from flower_helpers import crash

TINY = ["data.num_clients=3", "data.partitioner=iid", "data.train_subset=900",
        "data.test_subset=300", "model.width=4", "train.max_steps=40", "fed.rounds=6",
        "method.name=fedtiny", "method.delta_r=1", "method.r_end=5"]


def _row(r):
    return {"round": r, "accuracy": 0.1 * r, "loss": 1.0}


def test_recorder_refuses_an_existing_run_and_resume_drops_rounds_after_the_checkpoint(
        tmp_path):
    rec = RunRecorder(tmp_path, "a: 1\n")
    for r in range(4):
        rec.log_round(_row(r))
    rec.save_checkpoint(2, {"w": np.arange(3, dtype=np.float32)}, {"w": np.ones(3, bool)},
                        {"gates/g": np.ones(2, np.float32)}, {"rng": [1, 2], "x": None})
    with pytest.raises(RunExistsError, match="resume"):
        RunRecorder(tmp_path, "a: 1\n")
    done, state, masks, method_state, extra = load_checkpoint(tmp_path)
    assert done == 2 and state["w"].tolist() == [0, 1, 2] and masks["w"].dtype == bool
    assert list(method_state) == ["gates/g"] and extra == {"rng": [1, 2], "x": None}
    resumed = RunRecorder(tmp_path, "ignored", resume_round=done)
    assert [r["round"] for r in resumed.rows] == [0, 1, 2]  # round 3 (after the
    assert [r["round"] for r in read_rows(tmp_path / "metrics.jsonl")] == [0, 1, 2]  # ckpt)
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"  # the run's own config stays
    assert "3," not in (tmp_path / "metrics.csv").read_text().split("\n", 2)[2]


def test_summary_names_the_machine_it_ran_on(tmp_path, monkeypatch):
    monkeypatch.setattr("fedprune.fl.recorder.describe_machine", lambda: "CPU X, 2 cores")
    rec = RunRecorder(tmp_path, "a: 1\n")
    rec.write_summary({"rounds": 1})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "rounds": 1, "machine": "CPU X, 2 cores"}
    rec.write_summary({"rounds": 1, "machine": "given"})  # a caller's own record stays
    assert json.loads((tmp_path / "summary.json").read_text())["machine"] == "given"


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    rec = RunRecorder(tmp_path, "a: 1\n")
    rec.log_round(_row(0))
    before = (tmp_path / "metrics.jsonl").read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("fedprune.data.cache.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        rec.log_round(_row(1))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no debris


def _run(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fedprune.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def _flower_alive() -> list[int]:
    names = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet",
             "gcs_server", "default_worker.py")
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(n in " ".join(p.info["cmdline"] or []) for n in names)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, data_root):
    from safetensors.numpy import load_file

    full = _run(["default", *TINY, f"run.out_dir={tmp_path}", "run.name=full"])
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    cut = _run(["default", *TINY, f"run.out_dir={tmp_path}", "run.name=cut"])
    rows = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while len(read_rows(rows)) < 3:  # rounds 0, 1, 2 written
        assert cut.poll() is None and time.time() < deadline, cut.communicate()[0][-3000:]
        time.sleep(0.2)
    crash(cut.pid)  # every process of the run dies at once
    cut.wait()
    deadline = time.time() + 60
    while _flower_alive() and time.time() < deadline:
        time.sleep(0.5)
    assert not _flower_alive()
    done = load_checkpoint(tmp_path / "cut")[0]
    assert 2 <= done < 6, done  # killed mid-run

    again = _run(["--resume", str(tmp_path / "cut")])
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    shown = [int(line.split()[2].split("/")[0]) for line in out.splitlines()
             if line.startswith("[fedprune] round")]
    assert shown == list(range(done + 1, 7))  # only the rounds it ran
    a, b = read_rows(tmp_path / "full" / "metrics.jsonl"), read_rows(rows)
    assert [r["round"] for r in b] == list(range(7))  # every round once
    keys = ("accuracy", "loss", "density", "adjusted_layer", "adjusted_k", "bytes_total")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "cut"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)  # bitwise
    ma, mb = (load_file(str(tmp_path / d / "mask.safetensors")) for d in ("full", "cut"))
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["rounds"] == 6
