"""Simulation-scale benchmark: wall time per round, peak RSS, framework overhead.

    .venv/bin/python experiments/bench_scale.py --clients 100 1000 --out experiments/results

Round 1 includes start-up (Ray actors import torch and fedprune): it is reported on its
own; the per-round numbers are the mean over rounds >= 2 (steady state).

Each size runs `fedprune run scale_bench data.num_clients=N` in a fresh process while a
sampler sums the RSS of that process and all its descendants (Ray's GCS, raylet and
workers included) every 0.2 s. Per round (rounds >= 1), from the run's metrics.jsonl:
    overhead = wall - eval - client_compute / workers
where client_compute is the sum of the clients' own measured work (decode, data, train,
encode) and workers = the number of clients Ray runs at once (cores / sim.client_cpus).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(n: int, rounds: int, out: Path) -> dict:
    run_dir = out / f"scale-{n}"
    cmd = [sys.executable, "-m", "fedprune.cli", "run", "scale_bench",
           f"data.num_clients={n}", f"fed.rounds={rounds}", f"run.out_dir={out}",
           f"run.name=scale-{n}"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from fedprune.config import from_yaml

    cfg = from_yaml((run_dir / "config.yaml").read_text())
    workers = max(1, int(psutil.cpu_count() // cfg.sim.client_cpus))
    return summarize(n, rows, peak, time.time() - t0, workers)


def summarize(n: int, rows: list[dict], peak: int, total: float, workers: int) -> dict:
    warmup = next(r for r in rows if r["round"] == 1)
    rounds = [r for r in rows if r["round"] >= 2] or [warmup]
    wall = sum(r["wall_seconds"] for r in rounds) / len(rounds)
    ev = sum(r.get("eval_seconds", 0.0) for r in rounds) / len(rounds)
    compute = sum(r["client_seconds"] for r in rounds) / len(rounds) / workers
    overhead = wall - ev - compute
    return {"clients": n, "per_round": rounds[0]["clients"], "rounds": len(rounds),
            "wall_per_round_s": wall, "eval_per_round_s": ev,
            "client_compute_per_round_s": compute, "overhead_per_round_s": overhead,
            "overhead_fraction": overhead / wall, "peak_rss_gb": peak / 2**30,
            "round1_wall_s": warmup["wall_seconds"],
            "process_wall_s": total}


def to_markdown(results: list[dict]) -> str:
    head = ("| virtual clients | sampled/round | wall/round (s) | client compute/round (s) "
            "| eval/round (s) | overhead/round (s) | overhead % | peak RSS, process tree (GB) "
            "| round 1 incl. start-up (s) | whole run (s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {r['clients']} | {r['per_round']} | {r['wall_per_round_s']:.2f} | "
        f"{r['client_compute_per_round_s']:.2f} | {r['eval_per_round_s']:.2f} | "
        f"{r['overhead_per_round_s']:.2f} | {100 * r['overhead_fraction']:.1f}% | "
        f"{r['peak_rss_gb']:.2f} | {r['round1_wall_s']:.1f} | {r['process_wall_s']:.0f} |\n"
        for r in results)
    machine = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, " \
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    return head + rows + f"\nMachine: {machine}. Command: `{' '.join(sys.argv)}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    results = []
    for n in args.clients:
        results.append(run_one(n, args.rounds, out / "runs"))
        print(json.dumps(results[-1]), flush=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2))
    (out / "scale.md").write_text(to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
