"""Run an experiment as a Flower simulation on Flower's supported path (what `fedprune run`
and the end-to-end tests call).

``flwr run`` against a SuperLink in simulation mode, the path Flower documents since
``run_simulation`` was deprecated, but with everything private to this run: a SuperLink on
a free loopback port, its own ``FLWR_HOME`` and a generated app folder whose run config
points the ServerApp at this run's resolved ``config.yaml`` and run directory. Flower's own
output (SuperLink, ServerApp, Ray, ClientApps) goes to ``superlink.log`` and ``flower.log``
in the run directory; the screen gets one line per round, read from ``metrics.jsonl`` as
the ServerApp writes it, and the final table. ``verbose=True`` streams Flower's log too.

Every process the SuperLink started (SuperExec, the simulation, Ray) is stopped when the
run ends, fails or is interrupted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from fedprune.config import ExperimentConfig, to_yaml, with_absolute_paths
from fedprune.deploy.node import node_environment
from fedprune.fl.recorder import write_text
from fedprune.fl.summary import print_oneshot_summary, print_round, print_summary

# Never let Flower install dependencies, phone home or check for updates (flower.md);
# Ray's FutureWarning about accelerator variables is answered by setting it.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
              "RAY_DEDUP_LOGS": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
CONNECTION = "fedprune-sim"
# Settings read from the environment by processes that do not run in our cwd.
PATH_ENV = ("FEDPRUNE_DATA_ROOT", "FEDPRUNE_CACHE", "FEDPRUNE_CONFIG_DIR")


class SimulationError(RuntimeError):
    """The run did not finish as completed; the message says why and where the log is."""


def simulate(cfg: ExperimentConfig, run_dir: Path, verbose: bool = False,
             resume: bool = False) -> dict:
    """Run ``cfg`` with ``cfg.data.num_clients`` virtual SuperNodes; return the summary.
    ``resume``: continue the run in ``run_dir`` from its checkpoint."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"  # a resumed run keeps the one it started with
    if not resume:
        write_text(config_path, to_yaml(cfg))
    home = Path(tempfile.mkdtemp(prefix="fedprune-flwr-"))
    superlink = None
    previous = _exit_on_sigterm()
    try:
        env = _environment(home, cfg)
        port = _free_port()
        superlink = _start_superlink(env, port, run_dir / "superlink.log")
        _write_connection(home, port)
        after = _checkpoint_round(run_dir) if resume else -1  # rounds already on screen
        run_id = _submit(env, _write_app(home, run_dir, config_path, resume), cfg)
        print(f"[fedprune] Flower simulation: {cfg.data.num_clients} virtual clients, run "
              f"{run_id}; Flower's log: {run_dir / 'flower.log'}", flush=True)
        status = _follow(env, run_id, run_dir, cfg.fed.rounds, verbose, after)
        if status.get("status") != "finished:completed":
            raise SimulationError(_failure(status, run_dir))
        summary = json.loads((run_dir / "summary.json").read_text())
        show = print_oneshot_summary if "metric" in summary else print_summary
        show(summary, run_dir)
        return summary
    finally:
        if superlink is not None:
            stop_tree(superlink)
        shutil.rmtree(home, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM (e.g. from a sweep's timeout) unwinds like Ctrl-C, so the ``finally`` above
    stops the SuperLink's tree: it runs in its own session, out of the caller's group."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, _raise)


# ----------------------------------------------------------------------------- setup


def _environment(home: Path, cfg: ExperimentConfig) -> dict[str, str]:
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home),
           "FEDPRUNE_OWNER_PID": str(os.getpid())}  # the ServerApp stops when we are gone
    env.update(node_environment(with_absolute_paths(cfg)))
    # Flower's Ray backend calls ray.init() with no address, which reads RAY_ADDRESS and,
    # without it, attaches to the last cluster `ray start` made on this machine (its
    # address file outlives it: a run would then wait on a dead cluster). "local" = a
    # private instance, which is what a run without sim.ray_address means.
    env["RAY_ADDRESS"] = cfg.sim.ray_address or "local"
    # Flower's entry points (flower-superlink, flower-superexec, flwr-simulation) from
    # this interpreter's environment, whatever PATH says.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in PATH_ENV:  # the simulation runs elsewhere: relative paths must not move
        if env.get(key):
            env[key] = str(Path(env[key]).expanduser().resolve())
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SimulationError(f"{path} is missing: is flwr[simulation] installed in this "
                              "environment? (bash experiments/setup.sh)")
    return str(path)


def _start_superlink(env: dict, port: int, log_path: Path) -> subprocess.Popen:
    """A SuperLink in simulation mode on 127.0.0.1:port, up and healthy (or an error)."""
    # Loopback only and gone when the run ends: plaintext is the local-simulation case.
    cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
           "--port", str(port), "--disable-runtime-dependency-installation"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"the SuperLink exited with {proc.returncode}:\n"
                                  + _tail(log_path))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    stop_tree(proc)
    raise SimulationError(f"the SuperLink did not answer on 127.0.0.1:{port} within 60 s:\n"
                          + _tail(log_path))


def _die_with_parent() -> None:
    """Runs in the SuperLink's process before exec: Linux kills it when its parent (this
    process) dies, even by SIGKILL, which no ``finally`` can catch. Flower's SuperExec and
    simulation watch their parents' pids and follow. A no-op where prctl is missing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_connection(home: Path, port: int) -> None:
    """$FLWR_HOME/config.toml: the one SuperLink this run talks to."""
    (home / "config.toml").write_text(f"""[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "127.0.0.1:{port}"
insecure = true
""")


def _federation_config(cfg: ExperimentConfig) -> str:
    """The simulated federation: its size, each client's Ray resources, Ray's log level."""
    return (f"num-supernodes={cfg.data.num_clients} "
            f"client-resources-num-cpus={cfg.sim.client_cpus} "
            f"client-resources-num-gpus={float(cfg.sim.client_gpus)} "
            "init-args-logging-level='WARNING' init-args-log-to-driver=true")


def _write_app(home: Path, run_dir: Path, config_path: Path, resume: bool) -> Path:
    """A Flower app folder for this run: components from the installed fedprune, run config
    = this run's resolved config, its run directory and whether to resume it."""
    from fedprune import __version__

    app = home / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(f"""[project]
name = "fedprune"
version = "{__version__}"
description = "fedprune experiment run (generated by server/simulate.py)"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedprune"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "client.client_app:app"

[tool.flwr.app.config]
config = {json.dumps(str(config_path))}
overrides = ""
run_dir = {json.dumps(str(run_dir))}
resume = {"true" if resume else "false"}
""")
    return app


def _flwr(env: dict, *args: str, timeout: float = 120) -> dict:
    """A `flwr` CLI call with JSON output, parsed (its failure raised with its output)."""
    proc = subprocess.run([_bin("flwr"), *args, "--format", "json"], env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    text = proc.stdout
    try:
        data = json.loads(text[text.index("{"):])
    except ValueError:
        data = {}
    if proc.returncode != 0 or not data.get("success", False):
        raise SimulationError(f"flwr {' '.join(args)} failed ({proc.returncode}):\n"
                              f"{text[-2000:]}{proc.stderr[-2000:]}")
    return data


def _submit(env: dict, app: Path, cfg: ExperimentConfig) -> str:
    return str(_flwr(env, "run", str(app), CONNECTION, "--federation-config",
                     _federation_config(cfg))["run-id"])


# ----------------------------------------------------------------------------- the run


def _follow(env: dict, run_id: str, run_dir: Path, rounds: int, verbose: bool,
            after: int = -1) -> dict:
    """Stream Flower's log to flower.log (and the screen if verbose), print each round's
    row as the ServerApp writes it, and return the run's final status from the SuperLink."""
    stream = subprocess.Popen([_bin("flwr"), "log", run_id, CONNECTION, "--stream"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace")
    copier = threading.Thread(target=_copy_log, args=(stream, run_dir / "flower.log", verbose),
                              daemon=True)
    copier.start()
    rows = _RowTail(run_dir / "metrics.jsonl", after=after)
    status: dict = {}
    last_poll = time.time()
    try:
        while True:
            for row in rows.new():
                if not verbose:  # verbose: the ServerApp's own line is on screen already
                    _show(row, rounds)
            if stream.poll() is not None or time.time() - last_poll > 30:
                # the stream ends with the run; also ask now and then in case it broke
                status = _status(env, run_id)
                last_poll = time.time()
                if status.get("status", "").startswith("finished"):
                    break
            time.sleep(0.5)
        copier.join(timeout=10)
        for row in rows.new():  # rows written between the last read and the end
            if not verbose:
                _show(row, rounds)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    return status


def _checkpoint_round(run_dir: Path) -> int:
    """The round a resumed run continues after (-1: a new run, print from round 0)."""
    from safetensors import safe_open

    from fedprune.fl.recorder import CHECKPOINT

    path = run_dir / CHECKPOINT
    if not path.is_file():
        return -1
    with safe_open(str(path), framework="numpy") as f:
        return int((f.metadata() or {}).get("round", -1))


def _show(row: dict, rounds: int) -> None:
    """A round's progress line: its own (one-shot methods write one per query round), or
    the training round's."""
    if "line" in row:
        print(row["line"], flush=True)
    else:
        print_round(row, rounds)


def _status(env: dict, run_id: str) -> dict:
    runs = _flwr(env, "ls", CONNECTION, "--run-id", run_id).get("runs", [])
    return next((r for r in runs if str(r.get("run-id")) == run_id), {})


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _copy_log(stream: subprocess.Popen, path: Path, verbose: bool) -> None:
    """Flower's log into ``path`` (colour codes removed), and on screen too if verbose.
    Otherwise the screen gets what went wrong from fedprune itself: each round's rejected
    and timed-out replies in its line, a failed run's reason and the end of this log."""
    with open(path, "w") as log:
        for line in stream.stdout:
            log.write(ANSI.sub("", line))
            log.flush()
            if verbose:
                sys.stdout.write(line)
                sys.stdout.flush()


class _RowTail:
    """Rows of a metrics.jsonl that another process rewrites as rounds finish: each call
    returns the rows of rounds not returned before (``after``: rounds already shown)."""

    def __init__(self, path: Path, after: int = -1) -> None:
        self.path, self.last = path, after

    def new(self) -> list[dict]:
        from fedprune.fl.recorder import read_rows

        rows = [r for r in read_rows(self.path) if r["round"] > self.last]
        if rows:
            self.last = rows[-1]["round"]
        return rows


def _failure(status: dict, run_dir: Path) -> str:
    state = status.get("status", "unknown (the SuperLink did not report the run)")
    details = status.get("status-details", "")
    return (f"the run ended as {state}" + (f": {details}" if details else "")
            + f"\nlast lines of {run_dir / 'flower.log'}:\n" + _tail(run_dir / "flower.log"))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} was not written)"


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and every process it started. Flower detaches some children into
    new sessions, so the whole tree is snapshotted first (children are re-parented once
    their parent dies), then terminated, then killed after ``grace`` seconds."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in reversed(tree):  # children first: the SuperLink last
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    proc.poll()
