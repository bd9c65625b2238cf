"""Federated one-shot pruning of a trained CNN: every protocol x pruner x sparsity.

  FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_cnn_fed.py \\
      --out experiments/results/cnn_fed

Each row is one `fedprune run cnn_oneshot_fed` (a Flower simulation, 10 non-IID CIFAR-10
clients with 128 calibration images each) with the protocol, pruner and sparsity set.
``pooled`` equals centralized pruning on the union of the clients' 1,280 images (tested);
the centralized one-shot table of the README (128 random training images) is the other
reference. Test accuracy as pruned (no BatchNorm re-estimation: that needs data the server
does not have).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results/cnn_fed")
    ap.add_argument("--protocols", nargs="+", default=["pooled", "mask-vote", "l0-average"])
    ap.add_argument("--pruners", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--sparsities", nargs="+", default=["0.5", "0.7", "0.9"])
    args = ap.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows_path = out / "results.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    done = {(r["protocol"], r["pruner"], r["sparsity"]) for r in rows}
    for sparsity in args.sparsities:
        for pruner in args.pruners:
            for protocol in args.protocols:
                if (protocol, pruner, sparsity) in done:
                    continue
                name = f"{protocol}-{pruner}-{sparsity}"
                cmd = [sys.executable, "-m", "fedprune.cli", "run", "cnn_oneshot_fed",
                       f"method.name={protocol}", f"method.pruner={pruner}",
                       f"method.sparsity={sparsity}", f"run.out_dir={out / 'runs'}",
                       f"run.name={name}"]
                subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
                s = json.loads((out / "runs" / name / "summary.json").read_text())
                rows.append({"protocol": protocol, "pruner": pruner, "sparsity": sparsity,
                             "dense": s["accuracy_dense"]["test"],
                             "pruned": s["accuracy_pruned"]["test"],
                             "bytes_per_client": s["bytes_per_client"],
                             "wall_seconds": s["wall_seconds"]})
                print(json.dumps(rows[-1]), flush=True)
                rows_path.write_text(json.dumps(rows, indent=2))
    lines = ["| sparsity | pruner | protocol | test acc. (%) | MB per client | wall (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']} | {r['pruner']} | {r['protocol']} | {100 * r['pruned']:.2f}"
              f" | {r['bytes_per_client'] / 1e6:.2f} | {r['wall_seconds']:.0f} |" for r in rows]
    lines.append(f"\nDense: {100 * rows[0]['dense']:.2f}%. Machine: {platform.machine()}. "
                 f"Command: `{' '.join(sys.argv)}`")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
