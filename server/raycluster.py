"""A Ray cluster of several nodes on this machine, for running `fedprune run` with
``sim.ray_address`` the way it runs on machines joined into one cluster.

Flower's simulation engine is Ray: its backend calls ``ray.init()``, which attaches to an
existing cluster when ``RAY_ADDRESS`` is set (``sim.ray_address``; server/simulate.py). On
real machines a user runs ``ray start --head`` on one and ``ray start --address HEAD`` on
the others, with each machine's own environment (FEDPRUNE_DATA_ROOT and the rest of
fedprune.deploy.node's settings). ``LocalCluster`` does the same with separate processes
here: each node is a ``ray start --block`` process with its own raylet and CPUs, and
``Placement`` records which node's raylet hosted each virtual client's actor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from .simulate import FLOWER_ENV, _free_port, stop_tree

ACTOR = "ray::ClientAppActor"  # the process title of Flower's virtual-client actors


def ray_address_file() -> Path:
    """Where `ray start --head` records the address that ray.init() finds later."""
    try:
        from ray._common.utils import get_ray_address_file  # internal API
    except ImportError:  # Ray's default: <system temp dir>/ray
        return Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    return Path(get_ray_address_file(None))


class LocalCluster:
    """``nodes`` Ray nodes (a head and workers) of ``cpus`` CPUs each, as processes."""

    def __init__(self, nodes: int = 2, cpus: int = 1, log_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        if nodes < 1 or cpus < 1:
            raise ValueError(f"a cluster needs nodes >= 1 and cpus >= 1, got {nodes}, {cpus}")
        self.nodes, self.cpus = nodes, cpus
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = {**os.environ, **FLOWER_ENV, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def _ray(self, name: str, *args: str) -> subprocess.Popen:
        ray = Path(sys.executable).parent / "ray"
        out = open(self.log_dir / f"{name}.log", "w") if self.log_dir else subprocess.DEVNULL
        proc = subprocess.Popen([str(ray), "start", "--block", "--disable-usage-stats",
                                 f"--num-cpus={self.cpus}", "--num-gpus=0", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "LocalCluster":
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        try:
            self._ray("head", "--head", f"--port={port}", "--include-dashboard=false")
            self._wait(1)
            for i in range(1, self.nodes):
                self._ray(f"worker-{i}", f"--address={self.address}")
            self._wait(self.nodes)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait(self, nodes: int, timeout: float = 120.0) -> None:
        """Until ``nodes`` raylets run (a ray start that died is an error, not a hang)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {proc.returncode} (logs: "
                                       f"{self.log_dir or 'pass log_dir'})")
            if len(self.raylets()) >= nodes:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{nodes} Ray nodes did not come up in {timeout:.0f} s")

    def raylets(self) -> dict[int, int]:
        """raylet pid -> node index (the ``ray start`` process it descends from)."""
        out = {}
        for index, proc in enumerate(self.procs):
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in tree:
                try:
                    if child.name() == "raylet":
                        out[child.pid] = index
                except psutil.NoSuchProcess:
                    pass
        return out

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            stop_tree(proc, grace=10.0)
        self.procs = []
        # `ray start --head` records its address for later ray.init() calls on this
        # machine; `ray stop` would remove it (and stop every Ray here): only ours goes.
        record = ray_address_file()
        try:
            if record.read_text().strip().endswith(f":{self.address.rsplit(':', 1)[1]}"):
                record.unlink()
        except OSError:
            pass


class Placement:
    """Samples, while a run goes on, which cluster node hosts each virtual-client actor
    (an actor process descends from its node's raylet)."""

    def __init__(self, cluster: LocalCluster, every: float = 0.5) -> None:
        self.cluster, self.every = cluster, every
        self.actors: dict[int, int] = {}  # actor pid -> node index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            raylets = self.cluster.raylets()
            for pid, node in raylets.items():
                try:
                    for child in psutil.Process(pid).children(recursive=True):
                        if child.cmdline()[:1] and child.cmdline()[0].startswith(ACTOR):
                            self.actors[child.pid] = node
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(self.every)

    def per_node(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for node in self.actors.values():
            counts[node] = counts.get(node, 0) + 1
        return counts

    def __enter__(self) -> "Placement":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
