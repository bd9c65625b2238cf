"""Token pruning on the ViT trained here: accuracy vs FLOPs vs measured images/s for
zero-tprune, tome and random drop at several rates (no fine-tuning); and on the MiniLM
sentence encoder (``--encoder minilm``): embedding fidelity vs FLOPs.

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_tokens.py \\
        --out experiments/results/tokens
    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_tokens.py \\
        --out experiments/results/tokens_minilm --encoder minilm

The model is ``--model``'s cached reference training (``--epochs``; the first run trains
it). Schedules: zero-tprune and random keep ``k`` of the tokens at every block from
``--from-block`` on (one rate per row); tome merges ``r`` tokens per block. FLOPs come
from the token counts each block saw; images/s are measured at batch 1 and 64 (median of
timed runs; run nothing else meanwhile). Rows are written to ``rows.jsonl`` as they finish
(a rerun skips them); ``--table`` rebuilds ``results.md`` and ``tokens.png``.

Encoder rows: the held-out WikiText-2 test sentences of ``fedprune.prune.tokens.encoder``
(``--sentences``, 16-64 tokens, equal lengths batched together, up to 64 per batch);
cosine of each pruned embedding with its unpruned twin, twin retrieval among all of them,
FLOPs per sentence, and sentences/s (length-batched, and one at a time).
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


def measure_setting(model, dataset, method, options, args, speed: bool = True) -> dict:
    """Accuracy, token counts and FLOPs (and images/s with ``speed``) with ``method``
    attached; the model is left dense."""
    from fedprune.prune.tokens.job import measure

    pruner = token_pruner(method, **options) if method != "dense" else None
    if pruner:
        pruner.attach(model)
    try:
        return measure(model, dataset, args.eval_images, speed=speed)
    finally:
        if pruner:
            pruner.detach(model)


def encoder_rows(args, out: Path, done: set) -> None:
    from fedprune.lm.loading import load_encoder
    from fedprune.prune.tokens.encoder import (held_out_sentences, length_batches,
                                               measure_encoder)

    model, tokenizer = load_encoder(args.encoder, attn_implementation="eager")
    batches = length_batches(held_out_sentences(tokenizer, args.sentences), 64)
    args.depth = model.config.num_hidden_layers
    dense, reference = measure_encoder(model, batches, None, speed=True)
    for method, setting, options in settings(args):
        if (method, setting) in done:
            continue
        if method == "dense":
            row = dense
        else:
            pruner = token_pruner(method, **options)
            pruner.attach(model)
            try:
                row, _ = measure_encoder(model, batches, reference, speed=True)
            finally:
                pruner.detach(model)
        _append(out, {"method": method, "setting": setting, "model": args.encoder,
                      "sentences": len(reference), "machine": platform.platform(),
                      "command": " ".join(sys.argv), **row})


def _append(out: Path, row: dict) -> None:
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row.get(k) for k in ("method", "setting", "accuracy", "cosine_mean",
                                              "flops")}), flush=True)


def encoder_table(out: Path, rows: list[dict]) -> None:
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [f"Dense: {dense['flops'] / 1e6:.1f} MFLOPs per sentence (mean over "
             f"{dense['sentences']} sentences), {dense['sentences_per_s_batched']:.0f} "
             f"sentences/s length-batched, {dense['sentences_per_s_batch1']:.0f} one at a time",
             "", "| method | setting | FLOPs (% dense) | cosine mean | cosine min | "
             "twin retrieval (%) | sent/s batched (x dense) | sent/s b1 (x dense) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            continue
        lines.append(
            f"| {r['method']} | {r['setting']} | {100 * r['flops'] / dense['flops']:.1f} | "
            f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
            f"{100 * r['retrieval_top1']:.1f} | "
            f"{r['sentences_per_s_batched'] / dense['sentences_per_s_batched']:.2f} | "
            f"{r['sentences_per_s_batch1'] / dense['sentences_per_s_batch1']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out, rows, dense, "cosine_mean", "embedding cosine to unpruned",
          "sentences_per_s_batched", "sentences/s, length-batched (measured)")
    print("\n".join(lines))


def _plot(out: Path, rows, dense, metric: str, label: str, speed: str, speed_label: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if metric == "accuracy" else 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("zero-tprune", "tome", "random"):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["flops"])
        axes[0].plot([r["flops"] / dense["flops"] for r in pts],
                     [scale * r[metric] for r in pts], "o-", label=method)
        axes[1].plot([r[speed] for r in pts], [scale * r[metric] for r in pts], "o-",
                     label=method)
    for ax in axes:
        ax.axhline(scale * dense[metric], color="gray", ls="--", label="dense")
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_xlabel("FLOPs / dense")
    axes[1].set_xlabel(speed_label)
    fig.tight_layout()
    fig.savefig(out / "tokens.png", dpi=120)


def table(out: Path) -> None:
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    if "cosine_mean" in rows[0]:
        encoder_table(out, rows)
        return
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
    _plot(out, rows, dense, "accuracy", "top-1 (%)", "images_per_s_batch64",
          "images/s, batch 64 (measured)")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/tokens")
    ap.add_argument("--model", default="cifar10:vit:16")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--rs", type=int, nargs="+", default=[2, 4, 6, 8, 10])
    ap.add_argument("--from-block", type=int, default=1)
    ap.add_argument("--eval-images", type=int, default=0)
    ap.add_argument("--encoder", default="", help="a sentence encoder instead (minilm)")
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--table", action="store_true", help="only rebuild the table and plot")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        table(out)
        return
    path = out / "rows.jsonl"
    done = {(r["method"], r["setting"]) for r in
            (json.loads(x) for x in path.read_text().splitlines())} if path.exists() else set()
    if args.encoder:
        encoder_rows(args, out, done)
        table(out)
        return
    from fedprune.config import ModelConfig
    from fedprune.prune.cnn import reference_cnn
    from fedprune.prune.job import _parse_cnn_model

    dataset, arch, width = _parse_cnn_model(args.model)
    model = reference_cnn(ModelConfig(name=arch, width=width), dataset, args.epochs).eval()
    args.depth = len(model.blocks)
    for method, setting, options in settings(args):
        if (method, setting) in done:
            continue
        _append(out, {"method": method, "setting": setting, "model": args.model,
                      "epochs": args.epochs, "machine": platform.platform(),
                      "command": " ".join(sys.argv),
                      **measure_setting(model, dataset, method, options, args)})
    table(out)


if __name__ == "__main__":
    main()
