"""Deployment at scale on this machine: N SuperNodes (processes) through TLS + node
authentication, the topology of experiments/deploy/run_local.sh.

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_deploy_scale.py \\
        --nodes 8 16 --out experiments/results/deploy_scale

Each size runs `run_local.sh --nodes N` (deploy_smoke: ResNet-8 w8 at 20% density, a
2,000-image CIFAR-10 subset split over N nodes, ``--steps`` local steps) while a sampler
sums the RSS of every process of the deployment every 0.5 s: the script's tree plus the
processes Flower re-parents (found by the run's private FLWR_HOME in their environment).
Per round (steady state = rounds >= 2), from the run's metrics.jsonl: wall seconds,
client compute = the mean of the clients' own measured work (all N nodes train at once,
sharing the cores, so each client's seconds span the compute phase), overhead = wall -
eval - compute, and bytes per round (down + up). Every message starts a fresh ClientApp
process on its node (Flower's subprocess isolation), which is most of the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scale import summarize  # noqa: E402


def free_port_block(n: int) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


def deployment_rss(script: psutil.Process, marker: bytes) -> int:
    procs = {}
    try:
        for p in [script, *script.children(recursive=True)]:
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid not in procs and marker in p.environ().get("FLWR_HOME", "").encode():
                procs[p.pid] = p
        except psutil.Error:
            continue
    total = 0
    for p in procs.values():
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(n: int, rounds: int, steps: int, out: Path) -> dict:
    log_dir = out / "logs" / f"nodes-{n}"
    port = free_port_block(n + 1)
    overrides = (f"data.num_clients={n} fed.min_train_clients={n} fed.rounds={rounds} "
                 f"train.max_steps={steps} run.out_dir={out / 'runs'} run.name=nodes-{n}")
    cmd = ["bash", str(HERE / "deploy" / "run_local.sh"), "--nodes", str(n), "--port",
           str(port), "--log-dir", str(log_dir), "--overrides", overrides]
    t0, peak = time.time(), 0
    with open(out / f"nodes-{n}.out", "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        script = psutil.Process(proc.pid)
        marker = str(log_dir / "flwr-home").encode()
        while proc.poll() is None:
            peak = max(peak, deployment_rss(script, marker))
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): see {sink.name}")
    return measured(n, rows_of(out, n), peak, time.time() - t0)


def rows_of(out: Path, n: int) -> list[dict]:
    return [json.loads(x) for x in (out / "runs" / f"nodes-{n}" / "metrics.jsonl")
            .read_text().splitlines()]


def measured(n: int, rows: list[dict], peak: int, seconds: float) -> dict:
    # Every node runs its ClientApp at once, so each client's measured seconds already
    # span the round's compute phase (stretched by sharing the cores): compute = the mean.
    result = summarize(n, rows, peak, seconds, workers=n)
    steady = [r for r in rows if r["round"] >= 2]
    result["bytes_per_round_mb"] = sum(r["bytes_total"] for r in steady) / len(steady) / 1e6
    result["failures"] = sum(r["failures"] for r in rows)
    return result


def to_markdown(results: list[dict], command: str) -> str:
    lines = ["| SuperNodes | wall/round (s) | client compute/round (s) | eval/round (s) | "
             "overhead/round (s) | overhead % | bytes/round (MB) | peak RSS, all processes "
             "(GB) | round 1 (s) | whole run incl. start-up (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['clients']} | {r['wall_per_round_s']:.1f} | "
            f"{r['client_compute_per_round_s']:.1f} | {r['eval_per_round_s']:.2f} | "
            f"{r['overhead_per_round_s']:.1f} | {100 * r['overhead_fraction']:.0f}% | "
            f"{r['bytes_per_round_mb']:.2f} | {r['peak_rss_gb']:.2f} | "
            f"{r['round1_wall_s']:.1f} | {r['process_wall_s']:.0f} |")
    machine = (f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB "
               f"RAM")
    return "\n".join(lines) + f"\n\nMachine: {machine}. Command: `{command}`\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="local steps per client and round")
    ap.add_argument("--out", default="experiments/results/deploy_scale")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the tables from the finished runs and results.json")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        old = json.loads((out / "results.json").read_text())
        command = old[0]["command"]
        results = [{**measured(r["clients"], rows_of(out, r["clients"]),
                               r["peak_rss_gb"] * 2**30, r["process_wall_s"]),
                    "command": command} for r in old]
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(to_markdown(results, command))
        print(to_markdown(results, command))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    for n in args.nodes:
        results.append({**run_one(n, args.rounds, args.steps, out),
                        "command": " ".join(sys.argv)})
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(to_markdown(results, " ".join(sys.argv)))
    print(to_markdown(results, " ".join(sys.argv)))


if __name__ == "__main__":
    main()
