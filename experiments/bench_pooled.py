"""``pooled`` through a Flower simulation beside centralized sequential pruning, same windows.

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_pooled.py \
        --out experiments/results/pooled_bench

The arithmetic of ``pooled`` is centralized sequential pruning on the union of the
clients' windows (tested equal); everything else is messaging, serialization, client
state kept between blocks, and model loading in the client processes. For each pruner,
one after the other (never two at once on the machine):

1. ``fedprune run llm_pooled`` with ``--clients`` text clients (domain partition) of
   ``--windows`` windows of ``--length`` tokens: its query phase (``phases.prune``: every
   block's round, from the first message out to the last update in) against
2. ``prune_model(sequential=True)`` on the union of the same clients' windows
   (``partition_text`` on the same config), in a process of its own with all the cores.

The simulation runs ``sim.client_cpus`` = 1 per virtual client and one torch thread each
(the defaults: two clients at a time on two cores); the centralized run uses the torch
default (all cores). Bytes per client per block and the clients' peak resident memory come
from the run's rows. Results: ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def overrides(args, pruner: str, out: Path) -> list[str]:
    return [f"data.num_clients={args.clients}", f"method.pruner={pruner}",
            f"text.windows={args.windows}", f"text.length={args.length}",
            "text.eval_windows=2", "text.eval_length=128",  # evaluation is not timed here
            f"run.out_dir={out}", f"run.name=pooled-{pruner}"]


def centralized(args, pruner: str, out: Path) -> dict:
    """In this process: the union of the run's clients' windows, pruned sequentially."""
    import torch

    import fedprune.prune.methods  # noqa: F401  (registers the pruners)
    from fedprune.config import load_config
    from fedprune.lm.clients import partition_text
    from fedprune.lm.loading import load_causal_lm
    from fedprune.prune.base import get_pruner
    from fedprune.prune.pipeline import prune_model

    cfg = load_config("llm_pooled", overrides(args, pruner, out))
    model, tok = load_causal_lm(cfg.method.model)
    union = torch.cat([c.windows for c in partition_text(cfg.text, args.clients, tok)])
    t0 = time.perf_counter()
    report = prune_model(model, get_pruner(pruner), cfg.method.target(),
                         list(union.split(1)), sequential=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "windows": int(union.shape[0]),
            "timings": report.timings}


def federated(args, pruner: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedprune.cli", "run", "llm_pooled",
           *overrides(args, pruner, out)]
    shutil.rmtree(out / f"pooled-{pruner}", ignore_errors=True)  # a fresh run each time
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run = out / f"pooled-{pruner}"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    blocks = [r for r in rows if r.get("query") == "pooled-block"]
    return {"prune_phase_s": summary["phases"]["prune"], "process_s": time.perf_counter() - t0,
            "bytes_per_client": summary["bytes_per_client"],
            "bytes_up_per_client_per_block": sum(r["bytes_up"] for r in blocks)
            / len(blocks) / args.clients,
            "bytes_down_per_client_per_block": sum(r["bytes_down"] for r in blocks)
            / len(blocks) / args.clients,
            "client_peak_rss_mb": summary.get("client_peak_rss_mb", 0.0),
            "blocks": len(blocks)}


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| pruner | centralized prune (s) | pooled query phase (s) | ratio | up / client / "
             "block | down / client / block | client peak RSS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, c = r["federated"], r["centralized"]
        lines.append(f"| {r['pruner']} | {c['seconds']:.1f} | {f['prune_phase_s']:.1f} | "
                     f"{f['prune_phase_s'] / c['seconds']:.2f} | "
                     f"{f['bytes_up_per_client_per_block'] / 1e6:.3f} MB | "
                     f"{f['bytes_down_per_client_per_block'] / 1e6:.3f} MB | "
                     f"{f['client_peak_rss_mb']:.0f} MB |")
    lines += ["", f"SmolLM2-135M, {meta['clients']} clients (domain partition) x "
              f"{meta['windows']} windows of {meta['length']} tokens, 50% unstructured. "
              f"Machine: {meta['machine']}. Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/pooled_bench"))
    parser.add_argument("--pruners", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--central", default="", help=argparse.SUPPRESS)  # one pruner, here
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.central:
        (out / f"central-{args.central}.json").write_text(
            json.dumps(centralized(args, args.central, out / "runs")))
        return
    rows = []
    for pruner in args.pruners:
        cmd = [sys.executable, __file__, "--central", pruner, "--out", str(out), "--clients",
               str(args.clients), "--windows", str(args.windows), "--length", str(args.length)]
        subprocess.run(cmd, check=True)
        central = json.loads((out / f"central-{pruner}.json").read_text())
        rows.append({"pruner": pruner, "centralized": central,
                     "federated": federated(args, pruner, out / "runs")})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"clients": args.clients, "windows": args.windows, "length": args.length,
            "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                       f"cores, {platform.python_version()}",
            "command": "experiments/bench_pooled.py " + " ".join(sys.argv[1:])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))


if __name__ == "__main__":
    main()
