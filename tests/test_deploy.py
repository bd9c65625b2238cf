"""Deployment: docker-compose.yml checked statically, run_local.sh run for real on loopback.

The slow tests start a real SuperLink and two SuperNodes through
experiments/deploy/run_local.sh and check the run's files and that no process is left.
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


def test_compose_is_secure_by_default():
    """TLS on every connection, node authentication with one registered key per node,
    each SuperExec authenticated by its own Runtime API's secret, every service given only
    the key files it uses (never the CA's key), and only loopback published unless the
    user says otherwise."""
    services = _compose()
    link = [str(c) for c in services["superlink"]["command"]]
    assert "--enable-supernode-auth" in link
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "server.crt"),
                       ("--ssl-keyfile", "server.key"),
                       ("--superexec-auth-secret-file", "superexec.secret")):
        assert _flag(link, flag) == f"/pki/{name}"
    secrets = {}
    for name, svc in services.items():
        command = [str(c) for c in svc.get("command", [])]
        assert not any("insecure" in c for c in command), name
        if name.startswith(("superexec", "supernode")):
            assert _flag(command, "--root-certificates") == "/pki/ca.crt", name
            secrets[name] = _flag(command, "--superexec-auth-secret-file")
        # the key material a service sees is exactly the files its command names
        mounted = {_mount_target(v) for v in svc.get("volumes", [])
                   if _mount_target(v).startswith("/pki")}
        used = {c for c in command if c.startswith("/pki/")}
        if name == "register-supernodes":
            used = set(re.findall(r"/pki/[\w./-]+\w", command[0]))
        assert mounted == used, (name, mounted ^ used)
        assert "/pki" not in mounted and "/pki/ca.key" not in mounted, name
    # a SuperExec shares a secret with its own Runtime API only
    assert secrets["superexec-serverapp"] == "/pki/superexec.secret"
    for i in (1, 2):
        assert secrets[f"supernode-{i}"] == secrets[f"superexec-clientapp-{i}"] == \
            f"/pki/runtime/supernode-{i}.secret"
    keys = {name: _flag(svc["command"], "--auth-supernode-private-key")
            for name, svc in _supernodes(services).items()}
    assert len(set(keys.values())) == len(keys) == 2
    script = services["register-supernodes"]["command"][0]
    assert all(f"{key}.pub" in script for key in keys.values())
    assert "root-certificates" in script and "insecure" not in script
    for name, svc in _supernodes(services).items():
        port = _flag(svc["command"], "--port")
        assert _flag(svc["command"], "--ssl-certfile") == f"/pki/runtime/{name}.crt"
        assert _flag(svc["command"], "--ssl-ca-certfile") == "/pki/ca.crt"  # else exit 605
        assert svc["depends_on"]["register-supernodes"]["condition"] == \
            "service_completed_successfully"
        assert "ports" not in svc, f"{name} publishes its Runtime API ({port})"
    published = [(name, _interpolate(str(p), {})) for name, svc in services.items()
                 for p in svc.get("ports", [])]
    assert published == [("superlink", "127.0.0.1:8000:8000")]


def test_certs_make_what_compose_mounts(tmp_path):
    """Every key file compose mounts is one `fedprune certs` makes with the compose
    command in its header."""
    from fedprune.cli import main

    out = tmp_path / "deploy-pki"
    assert main(["certs", "--out", str(out), "--nodes", "2", "--hosts",
                 "127.0.0.1,localhost,superlink", "--runtime-hosts",
                 "supernode-1,supernode-2"]) == 0
    assert "--runtime-hosts supernode-1,supernode-2" in COMPOSE.read_text()
    for name, svc in _compose().items():
        for volume in svc.get("volumes", []):
            target = _mount_target(volume)
            if target.startswith("/pki/"):
                assert (out / target[len("/pki/"):]).is_file(), (name, target)


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


def _venv_env(**extra: str) -> dict[str, str]:
    """This environment with the venv running the tests first on PATH (the script and
    Flower find their binaries there, whatever VIRTUAL_ENV says)."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **extra, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("VIRTUAL_ENV", None)
    return env


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, env=_venv_env())


def test_run_local_refuses_bad_certificates_before_starting_anything(tmp_path):
    import datetime as dt

    from fedprune.deploy.pki import make_pki

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    expired = make_pki(tmp_path / "expired", ["127.0.0.1"], nodes=2, days=1, now=past).root
    out = _script("--pki", str(expired), "--log-dir", str(tmp_path / "a"))
    assert out.returncode == 2 and f"{expired}/ca.crt expired" in out.stderr, out.stderr
    assert not (tmp_path / "a" / "pids").read_text()  # nothing was started
    wrong_host = make_pki(tmp_path / "host", ["10.1.2.3"], nodes=2).root
    out = _script("--pki", str(wrong_host), "--log-dir", str(tmp_path / "b"))
    assert out.returncode == 2 and "not '127.0.0.1'" in out.stderr, out.stderr
    too_few = make_pki(tmp_path / "few", ["127.0.0.1"], nodes=1).root
    out = _script("--pki", str(too_few), "--nodes", "2", "--log-dir", str(tmp_path / "c"))
    assert out.returncode == 2 and "node-1 does not exist" in out.stderr, out.stderr
    out = _script("--insecure", "--pki", str(too_few), "--log-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "exclude each other" in out.stderr


def test_run_local_names_a_port_in_use_and_insecure_warns(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _script("--insecure", "--port", str(port), "--log-dir", str(tmp_path))
    assert out.returncode == 2 and f"port 127.0.0.1:{port} is in use" in out.stderr
    assert "WARNING: --insecure" in out.stderr
    assert not (tmp_path / "pids").read_text()


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
                config: str = "deploy_smoke", extra: tuple[str, ...] = (),
                during=None, log_name: str = "logs") -> tuple[int, str, Path, float]:
    """Run run_local.sh with 2 nodes; return (exit code, output, log dir, seconds).
    ``during(log_dir)`` runs while the script does (e.g. to kill one of its processes)."""
    port = _free_port_block(3)
    log_dir = tmp_path / log_name
    env = _venv_env()
    cmd = ["bash", str(SCRIPT), "--nodes", "2", "--port", str(port),
           "--node-port-base", str(port + 1), "--config", config,
           "--overrides", overrides, "--log-dir", str(log_dir), "--timeout", str(timeout - 60),
           *extra]
    out_path = tmp_path / f"{log_name}.out"
    t0 = time.time()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            if during is not None:
                during(log_dir)
            rc = proc.wait(timeout=timeout - (time.time() - t0))
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            _reap(proc, log_dir)
    return rc, out_path.read_text(), log_dir, time.time() - t0


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
    # still exits 0, and only the run's status (finished:failed) tells. With --netns where
    # root is available: a failed run removes its namespaces too.
    rooted = os.geteuid() == 0 and shutil.which("ip")
    prefix = f"fq{os.getpid() % 100000}"
    rc, output, log_dir, _ = _run_script(
        tmp_path, f"run.out_dir={tmp_path / 'runs'} run.name=bad fed.rounds=0", timeout=200,
        extra=("--netns", prefix) if rooted else ())
    assert rc == 1, output[-4000:]
    assert "finished:failed" in output
    assert not _leftovers(log_dir), _leftovers(log_dir)
    assert not rooted or (log_dir / "hosts").exists() and not _namespaces(prefix)


# ----------------------------------------------------------------------------- security


def _write_connection(home: Path, port: int, pki: Path | None) -> None:
    security = f'root-certificates = "{pki / "ca.crt"}"' if pki else ""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{port}"\n'
        f"{security}\n")


class _Processes:
    """Flower processes started in their own sessions, all stopped at exit (with the
    detached SuperExecs, found by the private FLWR_HOME in their environment)."""

    def __init__(self, home: Path) -> None:
        self.home, self.procs = home, []
        self.env = _venv_env(FLWR_HOME=str(home))

    def start(self, log: Path, *cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], capture_output=True, text=True, env=self.env,
                              timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for pid in _with_marker(f"FLWR_HOME={self.home}"):
            os.kill(pid, signal.SIGKILL)


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()[-3000:]}")


def _node_cmd(port: int, node_port: int, *security: str) -> list[str]:
    return ["flower-supernode", *security, "--superlink", f"127.0.0.1:{port}",
            "--host", "127.0.0.1", "--port", str(node_port), "--max-retries", "1",
            "--max-wait-time", "20", "--node-config", "partition-id=0 num-partitions=1"]


@pytest.mark.slow
def test_secure_superlink_refuses_unregistered_nodes_and_clients_without_the_ca(tmp_path):
    """TLS + node authentication as run_local.sh starts them: a registered node comes
    online; a node whose key was never registered, a node that does not trust the CA, a
    plaintext node, a SuperExec without the SuperLink's secret and a `flwr` CLI without
    the CA are all refused; a node with no SuperLink to reach gives up after its retries
    instead of hanging."""
    from fedprune.deploy.pki import make_pki

    pki = make_pki(tmp_path / "pki", ["127.0.0.1", "localhost"], nodes=2).root
    port = _free_port_block(6)
    home = tmp_path / "flwr-home"
    _write_connection(home, port, pki)
    with _Processes(home) as ps:
        link = ps.start(tmp_path / "superlink.log", "flower-superlink",
                        "--ssl-ca-certfile", str(pki / "ca.crt"),
                        "--ssl-certfile", str(pki / "server.crt"),
                        "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth",
                        "--isolation", "process", "--superexec-auth-secret-file",
                        str(pki / "superexec.secret"),
                        "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                        "--port", str(port))
        _wait_listening(port, link, tmp_path / "superlink.log")
        reg = ps.flwr("supernode", "register", str(pki / "nodes" / "node-0.pub"), "t")
        assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
        trusted = ("--root-certificates", str(pki / "ca.crt"))
        good = ps.start(tmp_path / "good.log", *_node_cmd(
            port, port + 1, *trusted, "--auth-supernode-private-key",
            str(pki / "nodes" / "node-0")))
        refused = {
            "unregistered": _node_cmd(port, port + 2, *trusted, "--auth-supernode-private-key",
                                      str(pki / "nodes" / "node-1")),
            "no-ca": _node_cmd(port, port + 3, "--auth-supernode-private-key",
                               str(pki / "nodes" / "node-0")),
            "plaintext": _node_cmd(port, port + 4, "--insecure"),
            # started before (here: without) its SuperLink: gives up after its retries
            "no-superlink": _node_cmd(_free_port_block(1), port + 5, *trusted,
                                      "--auth-supernode-private-key",
                                      str(pki / "nodes" / "node-0")),
        }
        procs = {k: ps.start(tmp_path / f"{k}.log", *cmd) for k, cmd in refused.items()}
        for name, proc in procs.items():
            assert proc.wait(timeout=120) != 0, name
        logs = {k: (tmp_path / f"{k}.log").read_text() for k in refused}
        assert "Failed to activate SuperNode" in logs["unregistered"], logs["unregistered"]
        assert "CERTIFICATE_VERIFY_FAILED" in logs["no-ca"], logs["no-ca"]
        assert "Exit Code" in logs["plaintext"], logs["plaintext"]
        assert "Failed to initialize the connection" in logs["no-superlink"], \
            logs["no-superlink"]
        deadline = time.time() + 60
        while time.time() < deadline:  # the registered node is the only one online
            listing = ps.flwr("supernode", "ls", "t", "--format", "json")
            nodes = json.loads(listing.stdout[listing.stdout.index("{"):])["nodes"]
            if [n["status"] for n in nodes] == ["online"]:
                break
            time.sleep(1)
        assert [n["status"] for n in nodes] == ["online"], nodes
        assert good.poll() is None
        # a SuperExec without the SuperLink's secret cannot take its tasks (HTTP 401)
        (tmp_path / "wrong.secret").write_text("wrong")
        execs = [ps.start(tmp_path / f"superexec-{i}.log", "flower-superexec",
                          "--root-certificates", str(pki / "ca.crt"), *secret,
                          "--runtime-api-address", f"127.0.0.1:{port}")
                 for i, secret in enumerate(
                     [("--superexec-auth-secret-file", str(tmp_path / "wrong.secret")), ()])]
        for proc in execs:
            proc.wait(timeout=60)
        access = (tmp_path / "superlink.log").read_text()
        assert access.count('"POST /v1/runtime/acquire-task HTTP/1.1" 401') >= 2
        assert _ls_success(ps)  # the CLI with the CA is served ...
        _write_connection(home, port, None)  # ... and without it refused
        assert not _ls_success(ps)


def _ls_success(ps: _Processes) -> bool:
    out = ps.flwr("ls", "t", "--format", "json").stdout  # exits 0 either way
    return json.loads(out[out.index("{"):])["success"]


# ----------------------------------------------------------------------------- topology


def _netns_prefix() -> str:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    return f"fp{os.getpid() % 100000}"


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")]


@pytest.mark.slow
def test_every_component_on_its_own_host_through_tls(tmp_path, data_root):
    """run_local.sh --netns: SuperLink, operator and SuperNodes each in a network namespace
    with its own address (veth pairs on a bridge), TLS and node authentication, two
    rounds; no process and no namespace left. (The LLM test below runs on loopback.)"""
    prefix = _netns_prefix()
    rc, output, log_dir, seconds = _run_script(
        tmp_path, f"run.out_dir={tmp_path / 'runs'} run.name=hosts", extra=("--netns", prefix))
    print(f"run_local.sh --netns took {seconds:.1f} s")
    assert rc == 0, output[-4000:]
    hosts = {name: addr for name, _, addr in
             (line.split() for line in (log_dir / "hosts").read_text().splitlines())}
    assert len(set(hosts.values())) == 4 and hosts["link"].endswith(".1")
    link_log = (log_dir / "superlink.log").read_text()
    assert f"Uvicorn running on https://{hosts['link']}:" in link_log
    # each node reached the SuperLink from its own address; the operator registered them
    for i in range(2):
        assert re.search(rf"{re.escape(hosts[f'node-{i}'])}:\d+ - \"POST /v1/fleet/activate-node",
                         link_log), f"node-{i}"
    assert re.search(rf"{re.escape(hosts['op'])}:\d+ - \"POST /v1/control/register-node",
                     link_log)
    run = tmp_path / "runs" / "hosts"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["data.num_clients"] == 2
    names = {name for name, _ in _recorded(log_dir)}
    assert {"superlink", "superexec", "supernode-0", "supernode-1", "flwr-run"} <= names
    assert any(name.startswith("child:") for name in names)  # Flower's detached SuperExecs
    for i in range(2):  # each node's key was registered before it started
        assert "registered successfully" in (log_dir / f"register-{i}.log").read_text()
    assert "insecure" not in (log_dir / "flwr-home" / "config.toml").read_text()
    assert not _namespaces(prefix) and not _leftovers(log_dir)


def test_a_netns_prefix_in_use_is_refused_and_left_alone(tmp_path):
    prefix = _netns_prefix()
    netns = str(REPO / "experiments" / "deploy" / "netns.sh")
    subprocess.run(["bash", netns, "up", prefix, "1"], check=True, capture_output=True)
    try:
        before = _namespaces(prefix)
        out = _script("--netns", prefix, "--nodes", "1", "--log-dir", str(tmp_path))
        assert out.returncode == 2 and "exist already" in out.stderr, out.stderr
        assert _namespaces(prefix) == before and len(before) == 4  # switch, link, op, node
    finally:
        subprocess.run(["bash", netns, "down", prefix], capture_output=True)
    assert not _namespaces(prefix)


def _after_round(run: Path, round_: int, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["round"] >= round_
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.5)
    raise AssertionError(f"round {round_} never finished in {run}")


def _kill_group(log_dir: Path, name: str) -> None:
    pid = dict((n, p) for n, p in _recorded(log_dir))[name]
    os.killpg(pid, signal.SIGKILL)


KILL_RUN = "fed.rounds=4 fed.round_timeout=20 train.max_steps=40"


@pytest.mark.slow
def test_a_supernode_killed_mid_round_is_restarted_and_the_run_completes(tmp_path, data_root):
    run = tmp_path / "runs" / "kill"

    def kill_node(log_dir):
        _after_round(run, 1)
        time.sleep(2)  # round 2 is under way: its message is with the node
        _kill_group(log_dir, "supernode-1")

    # 9 rounds: the killed node stays "online" at the SuperLink until its heartbeats are
    # missed, so its key is refused for a while (about a minute; each round without it
    # waits out fed.round_timeout); the rejoin comes a few rounds later. With 6 rounds a
    # loaded machine's restart attempts rejoined only in the last round, too late
    rc, output, log_dir, _ = _run_script(
        tmp_path, f"run.out_dir={tmp_path / 'runs'} run.name=kill {KILL_RUN} fed.rounds=9",
        timeout=600, extra=("--restart-nodes",), during=kill_node)
    assert rc == 0, output[-4000:]
    assert "SuperNode 1 is gone; starting it again" in output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(10))
    assert rows[1]["failures"] == 0
    failed = [r["round"] for r in rows[2:] if r["failures"]]
    assert failed, rows  # the lost reply shows ...
    rejoined = [r["round"] for r in rows if r["round"] > failed[0] and r["clients"] == 2
                and r["failures"] == 0]
    assert rejoined, [(r["round"], r["clients"], r["failures"]) for r in rows]  # ... the rejoin
    restarted = [n for n, _ in _recorded(log_dir) if n.startswith("supernode-1-restart-")]
    assert any("SuperNode ID" in (log_dir / f"{n}.log").read_text() for n in restarted)
    assert not _leftovers(log_dir), _leftovers(log_dir)


@pytest.mark.slow
def test_a_run_resumes_from_its_checkpoint_after_the_superlink_went_down(tmp_path, data_root):
    run = tmp_path / "runs" / "down"

    def kill_link(log_dir):
        _after_round(run, 2)
        _kill_group(log_dir, "superlink")

    rc, output, log_dir, _ = _run_script(
        tmp_path, f"run.out_dir={tmp_path / 'runs'} run.name=down {KILL_RUN}", timeout=400,
        during=kill_link)
    assert rc == 1, output[-4000:]
    assert not _leftovers(log_dir), _leftovers(log_dir)
    done = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= max(done) < 4, done
    rc, output, log_dir, _ = _run_script(tmp_path, "", timeout=400,
                                         extra=("--resume", str(run)), log_name="resumed")
    assert rc == 0, output[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["rounds"] == 4
    assert not _leftovers(log_dir), _leftovers(log_dir)
