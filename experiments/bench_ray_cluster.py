"""Simulation on a Ray cluster vs on one machine: the same run, per-round seconds.

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_ray_cluster.py \\
        --out experiments/results/ray_cluster

1. ``single``: `fedprune run` as usual (a private Ray instance with this machine's cores).
2. ``cluster``: a Ray head and ``--nodes - 1`` worker nodes started as separate processes
   (`ray start --head` / `ray start --address HEAD`, ``--cpus`` each: server/raycluster.py),
   and the same run with ``sim.ray_address=HEAD``; a sampler records which node's raylet
   hosted each virtual-client actor.

Per round, from the run's metrics.jsonl: wall seconds (round 1 includes the actors'
start-up: reported on its own; steady state = mean over rounds >= 2). On one machine the
cluster cannot be faster (the same cores, more processes); what it shows is that the
virtual clients are spread over the nodes and what the extra nodes cost. Writes
``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedprune.config import load_config  # noqa: E402
from server.raycluster import LocalCluster, Placement  # noqa: E402
from server.simulate import simulate  # noqa: E402


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summarize(name: str, run: Path, seconds: float, placement: dict | None) -> dict:
    rows = [r for r in rows_of(run) if r["round"] >= 1]
    steady = [r["wall_seconds"] for r in rows if r["round"] >= 2]
    return {"setup": name, "rounds": len(rows), "clients": rows[0]["clients"],
            "round1_seconds": rows[0]["wall_seconds"],
            "steady_round_seconds": sum(steady) / len(steady) if steady else None,
            "total_seconds": seconds, "final_accuracy": rows[-1]["accuracy"],
            "actors_per_node": placement}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/ray_cluster")
    ap.add_argument("--config", default="deploy_smoke")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=2, help="Ray nodes of the cluster")
    ap.add_argument("--cpus", type=int, default=1, help="CPUs each cluster node offers")
    ap.add_argument("--overrides", nargs="*", default=["train.max_steps=20"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [f"data.num_clients={args.clients}", f"fed.min_train_clients={args.clients}",
            f"fed.rounds={args.rounds}", f"run.out_dir={out / 'runs'}", *args.overrides]
    results = []
    t0 = time.time()
    simulate(load_config(args.config, [*base, "run.name=single"]), out / "runs" / "single")
    results.append(summarize("single machine (private Ray)", out / "runs" / "single",
                             time.time() - t0, None))
    with LocalCluster(args.nodes, args.cpus, log_dir=out / "runs" / "ray-logs") as cluster:
        cfg = load_config(args.config, [*base, "run.name=cluster",
                                        f"sim.ray_address={cluster.address}"])
        t0 = time.time()
        with Placement(cluster) as placement:
            simulate(cfg, out / "runs" / "cluster")
        results.append(summarize(f"Ray cluster: {args.nodes} nodes x {args.cpus} CPU",
                                 out / "runs" / "cluster", time.time() - t0,
                                 placement.per_node()))
    meta = {"command": " ".join(sys.argv), "machine": platform.platform(),
            "cpus": __import__("os").cpu_count(), "config": args.config, "overrides": base}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"`{meta['command']}` on {meta['cpus']} cores ({meta['machine']})", "",
             "| setup | clients | rounds | round 1 (s) | steady round (s) | total (s) | "
             "client actors per node |", "|---|---|---|---|---|---|---|"]
    for r in results:
        steady = f"{r['steady_round_seconds']:.1f}" if r["steady_round_seconds"] else "-"
        per_node = r["actors_per_node"]
        where = ", ".join(f"node {k}: {v}" for k, v in sorted(per_node.items())) \
            if per_node else "-"
        lines.append(f"| {r['setup']} | {r['clients']} | {r['rounds']} | "
                     f"{r['round1_seconds']:.1f} | {steady} | {r['total_seconds']:.1f} | "
                     f"{where} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
