"""Deployment: docker-compose.yml checked statically, run_local.sh run for real on loopback.

The slow tests start a real SuperLink and two SuperNodes through
experiments/deploy/run_local.sh and check the run's files and that no process is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flwr
import pytest
import yaml

from fedprune.config import load_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "deploy" / "run_local.sh"
COMPOSE = REPO / "docker-compose.yml"
LOCK = REPO / "experiments" / "requirements.lock"
FLOWER_IMAGE = re.compile(r"\bflwr/([a-z][a-z0-9-]*):([^\s\"'$]+)")


# ----------------------------------------------------------------------------- compose


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _flag(command: list, name: str) -> str:
    """Value after ``name`` in a compose command list (fails if absent)."""
    command = [str(c) for c in command]
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _node_config(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=", 1) for item in text.split())}


def _mount_target(volume: str) -> str:
    """'SRC:TARGET[:MODE]' -> TARGET (SRC may hold ${VAR:-default})."""
    parts = str(volume).rsplit(":", 2)
    return parts[-2] if parts[-1] in ("ro", "rw") else parts[-1]


def _supernodes(services: dict) -> dict[str, dict]:
    return {name: svc for name, svc in services.items() if name.startswith("supernode")}


def _locked(name: str) -> str:
    """The version experiments/requirements.lock pins for ``name``."""
    pins = re.findall(rf"^{re.escape(name)}==(\S+)$", LOCK.read_text(), re.M)
    assert len(pins) == 1, f"{LOCK.name} pins {name} {len(pins)} times"
    return pins[0]


def _dotenv() -> dict[str, str]:
    lines = (REPO / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?msg} and ${VAR:-default}, resolved from ``env``."""
    def value(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and env[name]:
            return env[name]
        assert op != ":?", f"${{{name}}} is required ({arg}) and unset"
        return arg if op == ":-" else ""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[?-])([^}]*))?\}", value, text)


def test_flower_pins_agree_lock_dotenv_installed():
    """One pin: the lock's flwr is what is installed and what .env gives compose."""
    assert _locked("flwr") == flwr.__version__
    assert _dotenv()["FLWR_VERSION"] == flwr.__version__


def test_compose_tags_every_flower_image_with_the_locked_flwr():
    services = _compose()
    env = _dotenv()
    refs = []  # (service, image kind, tag) from `image:` and from inline Dockerfiles
    for name, svc in services.items():
        texts = [str(svc.get("image", ""))]
        build = svc.get("build")
        if isinstance(build, dict):
            texts.append(str(build.get("dockerfile_inline", "")))
        for text in texts:
            raw = re.findall(r"\bflwr/[a-z][a-z0-9-]*:(\S+)", text)
            assert all(t.startswith("${FLWR_VERSION") for t in raw), \
                f"{name}: a Flower tag written by hand instead of ${{FLWR_VERSION}}: {raw}"
            refs += [(name, kind, tag)
                     for kind, tag in FLOWER_IMAGE.findall(_interpolate(text, env))]
    assert {kind for _, kind, _ in refs} >= {"superlink", "supernode", "superexec"}
    wrong = [r for r in refs if r[2] != _locked("flwr")]
    assert not wrong, f"Flower images not tagged with the locked flwr {_locked('flwr')}: {wrong}"
    # every service runs a Flower image, directly or as the base of its build
    assert {name for name, _, _ in refs} == set(services)
    # and the SuperExec image installs the same lock, not floating ranges
    inline = next(str(s["build"]["dockerfile_inline"]) for s in services.values()
                  if isinstance(s.get("build"), dict))
    assert "experiments/requirements.lock" in inline and "--no-deps" in inline


def test_interpolate_follows_compose_rules():
    env = {"A": "1.0", "E": ""}
    assert _interpolate("x:${A}", env) == "x:1.0"
    assert _interpolate("x:${B:-d}", env) == "x:d"
    assert _interpolate("x:${E:-d}", env) == "x:d"
    with pytest.raises(AssertionError, match="required"):
        _interpolate("x:${B:?need B}", env)


def test_compose_topology_partitions_and_addresses():
    services = _compose()
    link = services["superlink"]
    link_port = _flag(link["command"], "--port")
    nodes = _supernodes(services)
    assert len(nodes) >= 2
    configs = {name: _node_config(_flag(svc["command"], "--node-config"))
               for name, svc in nodes.items()}
    assert sorted(c["partition-id"] for c in configs.values()) == list(range(len(nodes)))
    assert {c["num-partitions"] for c in configs.values()} == {len(nodes)}
    for name, svc in nodes.items():
        assert _flag(svc["command"], "--superlink") == f"superlink:{link_port}", name
        assert "superlink" in svc.get("depends_on", []), name
    # process isolation: a SuperExec per component runs the apps, with the data mounted
    assert _flag(link["command"], "--isolation") == "process"
    server = services["superexec-serverapp"]
    assert _flag(server["command"], "--runtime-api-address") == f"superlink:{link_port}"
    runtime = {_flag(svc["command"], "--runtime-api-address")
               for name, svc in services.items() if name.startswith("superexec-clientapp")}
    assert runtime == {f"{name}:{_flag(svc['command'], '--port')}"
                       for name, svc in nodes.items()}
    for name, svc in nodes.items():
        assert _flag(svc["command"], "--isolation") == "process", name
    for name, svc in services.items():
        if name.startswith("superexec"):
            root = svc["environment"]["FEDPRUNE_DATA_ROOT"]
            assert root in [_mount_target(v) for v in svc["volumes"]], name


def test_deploy_smoke_config_matches_two_nodes():
    cfg = load_config("deploy_smoke")
    assert cfg.data.num_clients == 2 == len(_supernodes(_compose()))
    assert cfg.fed.rounds == 2 and cfg.data.dataset == "cifar10"


def test_run_local_rejects_bad_arguments(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--nodes", "zero", "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--nodes" in out.stderr
    assert not (tmp_path / "pids").exists()  # refused before starting anything
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True,
                           timeout=30)
    assert usage.returncode == 0 and "--overrides" in usage.stdout


# ----------------------------------------------------------------------------- processes


def _free_port_block(n: int) -> int:
    """A port P with P..P+n-1 all free on loopback."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block found")


def _running(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _recorded(log_dir: Path) -> list[tuple[str, int]]:
    path = log_dir / "pids"
    if not path.exists():
        return []
    return [(name, int(pid)) for name, pid in
            (line.split() for line in path.read_text().splitlines() if line.strip())]


def _with_marker(marker: str) -> list[int]:
    """Live processes whose environment contains ``marker`` (the run's private FLWR_HOME)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes() and _running(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _leftovers(log_dir: Path) -> list[str]:
    left = [f"{name}:{pid}" for name, pid in _recorded(log_dir) if _running(pid)]
    return left + [f"env:{pid}" for pid in _with_marker(f"FLWR_HOME={log_dir}/flwr-home")]


def _reap(proc: subprocess.Popen, log_dir: Path) -> None:
    """Stop the script (its trap stops the rest), then anything it left behind."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for name, pid in _recorded(log_dir):
        if not _running(pid):
            continue
        try:  # started entries lead their own process group; "child:" entries may not
            if name.startswith("child:"):
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in _with_marker(f"FLWR_HOME={log_dir}/flwr-home"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_script(tmp_path: Path, overrides: str, timeout: float = 300,
                config: str = "deploy_smoke") -> tuple[int, str, Path, float]:
    """Run run_local.sh with 2 nodes; return (exit code, output, log dir, seconds)."""
    port = _free_port_block(3)
    log_dir = tmp_path / "logs"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("VIRTUAL_ENV", None)  # use the venv running this test, found via PATH
    cmd = ["bash", str(SCRIPT), "--nodes", "2", "--port", str(port),
           "--node-port-base", str(port + 1), "--config", config,
           "--overrides", overrides, "--log-dir", str(log_dir), "--timeout", str(timeout - 60)]
    out_path = tmp_path / "run_local.out"
    t0 = time.time()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            _reap(proc, log_dir)
    return rc, out_path.read_text(), log_dir, time.time() - t0


@pytest.mark.slow
def test_run_local_two_supernodes_two_rounds(tmp_path, data_root):
    rc, output, log_dir, seconds = _run_script(
        tmp_path, f"run.out_dir={tmp_path / 'runs'} run.name=deploy")
    print(f"run_local.sh took {seconds:.1f} s")
    assert rc == 0, output[-4000:]
    assert "finished:completed" in output
    run = tmp_path / "runs" / "deploy"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["config"]["data.num_clients"] == 2
    names = {name for name, _ in _recorded(log_dir)}
    assert {"superlink", "supernode-0", "supernode-1", "flwr-run"} <= names
    assert any(name.startswith("child:") for name in names)  # Flower's detached SuperExecs
    # every SuperNode registered with the SuperLink and ran ClientApps for its partition
    for i in range(2):
        assert (log_dir / f"supernode-{i}.log").stat().st_size > 0
    assert not _leftovers(log_dir), _leftovers(log_dir)


@pytest.mark.slow
def test_run_local_two_text_clients_prune_a_language_model(tmp_path, data_root):
    """Federated LLM pruning through real SuperNodes (a fresh ClientApp process per
    message, the clients' block inputs kept in their node's cache folder): pooled, with
    its statistics summed under SecAgg+. (mask-vote and l0-average use the same query
    machinery in one round; their Flower runs are in test_fedllm.py.)"""
    rc, output, log_dir, seconds = _run_script(
        tmp_path, f"run.out_dir={tmp_path / 'runs'} run.name=llm", config="deploy_llm_smoke")
    print(f"run_local.sh took {seconds:.1f} s")
    assert rc == 0, output[-4000:]
    run = tmp_path / "runs" / "llm"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert [r["block"] for r in rows] == [0, 1]
    assert all(r["secure"] and r["partitions"] == [0, 1] for r in rows)
    assert summary["record"]["contributors"] == [[0, 1], [0, 1]]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "model")  # plain transformers
    assert not _leftovers(log_dir), _leftovers(log_dir)


def test_deploy_llm_smoke_config_matches_two_nodes():
    cfg = load_config("deploy_llm_smoke")
    assert cfg.data.num_clients == 2 and cfg.method.name == "pooled" and cfg.secagg.enabled


@pytest.mark.slow
def test_run_local_fails_when_the_serverapp_fails(tmp_path, data_root):
    # fed.rounds=0 is refused by the config: the ServerApp raises, `flwr run --stream`
    # still exits 0, and only the run's status (finished:failed) tells.
    rc, output, log_dir, _ = _run_script(
        tmp_path, f"run.out_dir={tmp_path / 'runs'} run.name=bad fed.rounds=0", timeout=200)
    assert rc == 1, output[-4000:]
    assert "finished:failed" in output
    assert not _leftovers(log_dir), _leftovers(log_dir)
