"""Token pruning on the ViT trained here: accuracy vs FLOPs vs measured images/s for
zero-tprune, tome and random drop at several rates (no fine-tuning).

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_tokens.py \\
        --out experiments/results/tokens

The model is ``--model``'s cached reference training (``--epochs``; the first run trains
it). Schedules: zero-tprune and random keep ``k`` of the tokens at every block from
``--from-block`` on (one rate per row); tome merges ``r`` tokens per block. FLOPs come
from the token counts each block saw; images/s are measured at batch 1 and 64 (median of
timed runs; run nothing else meanwhile). Rows are written to ``rows.jsonl`` as they finish
(a rerun skips them); ``--table`` rebuilds ``results.md`` and ``tokens.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedprune.prune.tokens import token_pruner  # noqa: E402


def settings(args) -> list[tuple[str, str, dict]]:
    out = [("dense", "-", {})]
    for k in args.keeps:
        keep = [1.0] * args.from_block + [k] * (args.depth - args.from_block)
        out += [(m, f"keep {k}", {"keep": keep}) for m in ("zero-tprune", "random")]
    out += [("tome", f"r {r}", {"r": r}) for r in args.rs]
    return out


def measure_setting(model, dataset, method, options, args) -> dict:
    from fedprune.prune.tokens.job import measure

    pruner = token_pruner(method, **options) if method != "dense" else None
    if pruner:
        pruner.attach(model)
    try:
        return measure(model, dataset, args.eval_images)
    finally:
        if pruner:
            pruner.detach(model)


def table(out: Path) -> None:
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [f"Dense: {100 * dense['accuracy']:.2f}% top-1, {dense['flops'] / 1e6:.1f} MFLOPs, "
             f"{dense['images_per_s_batch1']:.0f} / {dense['images_per_s_batch64']:.0f} im/s "
             "(batch 1 / 64)", "",
             "| method | setting | FLOPs (% dense) | top-1 (%) | change (points) | "
             "im/s b1 (x dense) | im/s b64 (x dense) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            continue
        lines.append(
            f"| {r['method']} | {r['setting']} | {100 * r['flops'] / dense['flops']:.1f} | "
            f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - dense['accuracy']):+.2f} | "
            f"{r['images_per_s_batch1'] / dense['images_per_s_batch1']:.2f} | "
            f"{r['images_per_s_batch64'] / dense['images_per_s_batch64']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("zero-tprune", "tome", "random"):
        pts = [r for r in rows if r["method"] == method]
        axes[0].plot([r["flops"] / dense["flops"] for r in pts],
                     [100 * r["accuracy"] for r in pts], "o-", label=method)
        axes[1].plot([r["images_per_s_batch64"] for r in pts], [100 * r["accuracy"] for r in pts],
                     "o-", label=method)
    for ax in axes:
        ax.axhline(100 * dense["accuracy"], color="gray", ls="--", label="dense")
        ax.set_ylabel("top-1 (%)")
        ax.legend()
    axes[0].set_xlabel("FLOPs / dense")
    axes[1].set_xlabel("images/s, batch 64 (measured)")
    fig.tight_layout()
    fig.savefig(out / "tokens.png", dpi=120)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/tokens")
    ap.add_argument("--model", default="cifar10:vit:16")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--rs", type=int, nargs="+", default=[2, 4, 6, 8, 10])
    ap.add_argument("--from-block", type=int, default=1)
    ap.add_argument("--eval-images", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="only rebuild the table and plot")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        table(out)
        return
    from fedprune.config import ModelConfig
    from fedprune.prune.cnn import reference_cnn
    from fedprune.prune.job import _parse_cnn_model

    dataset, arch, width = _parse_cnn_model(args.model)
    model = reference_cnn(ModelConfig(name=arch, width=width), dataset, args.epochs).eval()
    args.depth = len(model.blocks)
    path = out / "rows.jsonl"
    done = {(r["method"], r["setting"]) for r in
            (json.loads(x) for x in path.read_text().splitlines())} if path.exists() else set()
    for method, setting, options in settings(args):
        if (method, setting) in done:
            continue
        row = {"method": method, "setting": setting, "model": args.model,
               "epochs": args.epochs, "machine": platform.platform(),
               "command": " ".join(sys.argv),
               **measure_setting(model, dataset, method, options, args)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("method", "setting", "accuracy", "flops")}),
              flush=True)
    table(out)


if __name__ == "__main__":
    main()
