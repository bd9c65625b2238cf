"""One-shot CNN pruning: accuracy vs sparsity for each method on CIFAR-10.

    .venv/bin/python experiments/cnn_oneshot.py --out experiments/results/cnn

A ResNet-8 (width 16) is trained briefly (3 epochs, cached) with the foundation's training
code; every method then prunes a fresh copy one-shot at each sparsity with the same 128
calibration images (seed 0). Reported: test accuracy as pruned, and after re-estimating
BatchNorm statistics on the calibration images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from fedprune.prune.job import PruneJob, run_job

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/cnn")
    parser.add_argument("--model", default="cifar10:resnet8:16")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--calib", default="cifar10:128")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for sparsity in args.sparsities:
        for method in METHODS:
            job = PruneJob(model=args.model, method=method, sparsity=sparsity,
                           calib=args.calib, eval=args.model.split(":")[0],
                           out=str(out / f"{method}-{sparsity}"), save_model=False,
                           cnn_epochs=args.epochs)
            r = run_job(job, progress=False)
            rows.append({"method": method, "sparsity": sparsity,
                         "dense": r["dense"]["accuracy"], "pruned": r["pruned"]["accuracy"],
                         "bn_recalibrated": r["pruned_bn_recalibrated"]["accuracy"],
                         "prune_s": r["timings"]["prune_total"]})
            print(json.dumps(rows[-1]), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| sparsity | method | test acc. as pruned (%) | after BN re-estimation (%) "
             "| pruning time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['method']} | {100 * r['pruned']:.2f} | "
              f"{100 * r['bn_recalibrated']:.2f} | {r['prune_s']:.1f} |" for r in rows]
    lines.append(f"\nDense reference: {100 * rows[0]['dense']:.2f}% test accuracy "
                 f"({args.model}, {args.epochs} epochs). Machine: {platform.machine()}. "
                 f"Command: `{' '.join(sys.argv)}`")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
