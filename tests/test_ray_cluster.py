"""`fedprune run` attached to a running Ray cluster (``sim.ray_address``): a head and a
worker node started as separate processes, the virtual clients placed on both."""

from __future__ import annotations

import json
import signal

import psutil
import pytest

from fedprune.config import ConfigError, load_config
from server.raycluster import LocalCluster, Placement, ray_address_file
from server.simulate import simulate


@pytest.mark.parametrize("address", ["10.0.0.1", "http://x:1", "a b:1"])
def test_a_bad_ray_address_is_named(address):
    with pytest.raises(ConfigError, match="sim.ray_address"):
        load_config("deploy_smoke", [f"sim.ray_address={address}"])
    assert load_config("deploy_smoke", ["sim.ray_address=auto"]).sim.ray_address == "auto"


@pytest.mark.slow
def test_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(tmp_path, data_root):
    cfg = load_config("deploy_smoke", ["fed.rounds=1", "data.num_clients=4",
                                       "fed.min_train_clients=4", "train.max_steps=20",
                                       f"run.out_dir={tmp_path}"])
    with LocalCluster(nodes=2, cpus=1, log_dir=tmp_path / "ray") as cluster:
        raylets = cluster.raylets()
        assert sorted(raylets.values()) == [0, 1]  # two nodes, two raylets
        cfg.sim.ray_address = cluster.address
        with Placement(cluster) as placement:
            summary = simulate(cfg, tmp_path / "run")
    assert summary["rounds"] == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients"] == 4 and rows[-1]["failures"] == 0
    # one actor per node's CPU: the clients ran on the head and on the worker
    assert placement.per_node() == {0: 1, 1: 1}, placement.actors
    assert not any(psutil.pid_exists(pid) for pid in raylets)  # the cluster is gone
    record = ray_address_file()
    assert not record.exists() or cluster.address.split(":")[1] not in record.read_text()


@pytest.mark.slow
def test_a_run_without_ray_address_ignores_a_dead_clusters_address_file(tmp_path, data_root):
    """ray.init() with no address attaches to the last `ray start` cluster it finds
    recorded on this machine, dead or alive; fedprune's private runs must not (they hung
    on a dead cluster's record before RAY_ADDRESS=local)."""
    record = ray_address_file()
    before = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("127.0.0.1:9")  # nothing listens there
    def hung(signum, frame):
        raise TimeoutError("the run waited on the dead cluster's address")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)  # fail, not hang (simulate's clean-up stops its SuperLink)
    try:
        cfg = load_config("deploy_smoke", ["fed.rounds=1", "train.max_steps=2",
                                           f"run.out_dir={tmp_path}"])
        assert simulate(cfg, tmp_path / "run")["rounds"] == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if before is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(before)
