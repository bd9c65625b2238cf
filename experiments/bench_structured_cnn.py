"""Channel pruning of a CIFAR-10 ResNet: accuracy vs FLOPs and measured speed, L1 / Taylor /
Beta-Rank, with and without fine-tuning, against the pruned architecture trained from
scratch ("Rethinking the Value of Network Pruning"), on balanced and long-tailed data.

    .venv/bin/python experiments/bench_structured_cnn.py --out experiments/results/structured_cnn
    .venv/bin/python experiments/bench_structured_cnn.py --out ... --speed   # nothing else running
    .venv/bin/python experiments/bench_structured_cnn.py --out ... --table

Protocol: ResNet-8 (width 16), trained ``EPOCHS`` epochs (SGD, lr 0.05, batch 128, the
foundation's training code; cached) on either the full CIFAR-10 training split
(``balanced``) or a long-tailed subset of it (``longtail``: class c keeps
``5000 * 0.1^(c/9)`` images, Cui et al.'s exponential profile at imbalance 10, seeded).
Every criterion scores the same 256 training images of the split (labels for Taylor);
channels are removed with the same ratio in every channel space (uniform allocation,
residual-tied channels together) to ``fraction`` of the parameters. Fine-tuning: ``FT_EPOCHS``
epochs at lr 0.01 on the split. Scratch: the pruned shapes, freshly initialized, trained
with the same schedule and budget as train + prune + fine-tune (``EPOCHS`` at lr 0.05,
then ``FT_EPOCHS`` at 0.01). ``dense+ft``: the dense model fine-tuned the same
``FT_EPOCHS`` at 0.01, the control that separates what the extra low-rate epoch gives
from what pruning gives.
Test accuracy on the balanced CIFAR-10 test split (10,000 images). FLOPs: per image,
conv + linear multiply-accumulates x2. Speed: images/s at batch 1 and 64, median of 5 timed
runs after a warm-up, this machine's default torch threads. The quality pass records speed
too, but the table uses the separate ``--speed`` pass (speed.json: every distinct shape
rebuilt from the recorded channel counts and timed with nothing else running; speed depends
on shapes only). Rows are appended to rows.jsonl as they finish and skipped when rerun.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

EPOCHS, FT_EPOCHS, LR, FT_LR, CALIB = 3, 1, 0.05, 0.01, 256
CRITERIA = ("l1", "taylor", "beta-rank")
FRACTIONS = (0.3, 0.5)
SPLITS = ("balanced", "longtail")


def long_tail(split, imbalance: float = 10.0, seed: int = 0):
    """Class c keeps ``n_max * (1/imbalance)^(c/(C-1))`` of its images (seeded choice)."""
    from fedprune.data import ArraySplit

    labels = np.asarray(split.labels)
    classes = int(labels.max()) + 1
    n_max = int(np.bincount(labels).max())
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(classes):
        idx = np.flatnonzero(labels == c)
        n = int(n_max * (1 / imbalance) ** (c / (classes - 1)))
        keep.append(np.sort(rng.choice(idx, min(n, len(idx)), replace=False)))
    keep = np.sort(np.concatenate(keep))
    return ArraySplit(np.asarray(split.images[keep]), labels[keep])


def train_split(name: str, subset: int):
    from fedprune.data import ArraySplit, load_split

    train = load_split("cifar10", "train")
    if subset:
        train = ArraySplit(np.asarray(train.images[:subset]), np.asarray(train.labels[:subset]))
    return long_tail(train) if name == "longtail" else train


def train(model, split, epochs: int, lr: float, seed: int = 0) -> float:
    from fedprune.config import TrainConfig
    from fedprune.data import make_loader
    from fedprune.train import train_local

    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader = make_loader(split, "cifar10", 128, shuffle=True, augment=True,
                             seed=seed * 1000 + epoch)
        train_local(model, loader, TrainConfig(local_epochs=1, lr=lr, batch_size=128))
    return time.perf_counter() - t0


def reference(split_name: str, split, cache: Path, width: int):
    from safetensors.torch import load_file, save_file

    from fedprune.config import ModelConfig
    from fedprune.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet8", width=width), "cifar10")
    path = cache / f"reference-{split_name}-w{width}-e{EPOCHS}-n{len(split)}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        train(model, split, EPOCHS, LR)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def calib_batches(split):
    from fedprune.data import ArraySplit, make_loader

    idx = np.sort(np.random.default_rng(0).permutation(len(split))[:CALIB])
    sample = ArraySplit(np.asarray(split.images[idx]), np.asarray(split.labels[idx]))
    return [(x, y) for x, y in make_loader(sample, "cifar10", 64, shuffle=False)]


def accuracy(model, subset: int = 0) -> float:
    from fedprune.prune.cnn import accuracy_on_test

    return 100 * accuracy_on_test(model, "cifar10", subset=subset)


def flops(model) -> float:
    from fedprune.masks import count_flops

    return count_flops(model, (1, 3, 32, 32))["inference_dense"]


def images_per_s(model, batch: int, repeats: int = 5) -> float:
    from fedprune.prune.structured.speed import images_per_s as timed

    return timed(model.eval(), batch, repeats=repeats)


def measure(model, subset: int) -> dict:
    return {"accuracy": accuracy(model, subset), "flops": flops(model),
            "params": sum(p.numel() for p in model.parameters()),
            "img_s_b1": images_per_s(model, 1), "img_s_b64": images_per_s(model, 64)}


def rows_for(split_name: str, args, out: Path, done: set[str]) -> None:
    from fedprune.prune.adapters import adapter_for
    from fedprune.prune.structured.job import StructuredConfig, shrink

    split = train_split(split_name, args.subset)
    dense = reference(split_name, split, out, args.width)
    if f"{split_name}/dense" not in done:
        _append(out, {"row": f"{split_name}/dense", "split": split_name,
                      "train_images": len(split), **measure(dense, args.test_subset)})
    if f"{split_name}/dense+ft" not in done:
        model = copy.deepcopy(dense)
        seconds = train(model, split, FT_EPOCHS, FT_LR)
        _append(out, {"row": f"{split_name}/dense+ft", "split": split_name,
                      "criterion": "dense+ft", "fraction": 0.0, "finetune_s": seconds,
                      **{f"pruned_{k}": v for k, v in measure(model, args.test_subset).items()}})
    calib = calib_batches(split)
    for fraction in FRACTIONS:
        shapes = None
        for crit in CRITERIA:
            name = f"{split_name}/{crit}/{fraction}"
            model = copy.deepcopy(dense)
            report = shrink(model, StructuredConfig(crit, "uniform", fraction), calib)
            shapes = adapter_for(model).layer_shapes(model)[0]
            if name in done:
                continue
            row = {"row": name, "split": split_name, "criterion": crit, "fraction": fraction,
                   "channels": shapes, "decoder_removed": report.decoder_removed,
                   **{f"pruned_{k}": v for k, v in measure(model, args.test_subset).items()}}
            row["finetune_s"] = train(model, split, FT_EPOCHS, FT_LR)
            row["finetuned_accuracy"] = accuracy(model, args.test_subset)
            _append(out, row)
        name = f"{split_name}/scratch/{fraction}"
        if name not in done:  # uniform allocation: every criterion gives these shapes
            from fedprune.config import ModelConfig
            from fedprune.models import build_model
            from fedprune.prune.structured.io import shrink_cnn_

            torch.manual_seed(1)
            model = build_model(ModelConfig(name="resnet8", width=args.width), "cifar10")
            shrink_cnn_(model, shapes)
            seconds = train(model, split, EPOCHS, LR, seed=1)
            seconds += train(model, split, FT_EPOCHS, FT_LR, seed=1)
            _append(out, {"row": name, "split": split_name, "criterion": "scratch",
                          "fraction": fraction, "channels": shapes, "train_s": seconds,
                          **{f"pruned_{k}": v for k, v in measure(model, args.test_subset)
                             .items()}})


def _append(out: Path, row: dict) -> None:
    row["machine"] = f"{platform.node()} torch threads {torch.get_num_threads()}"
    with (out / "rows.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"[cnn] {row['row']}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                               if isinstance(v, float)), flush=True)


def shaped(width: int, channels):
    """A ResNet-8 with the recorded channel counts (random weights: speed needs shapes only)."""
    from fedprune.config import ModelConfig
    from fedprune.models import build_model
    from fedprune.prune.structured.io import shrink_cnn_

    model = build_model(ModelConfig(name="resnet8", width=width), "cifar10")
    if channels is not None:
        shrink_cnn_(model, channels)
    return model.eval()


def speed(out: Path, width: int, repeats: int = 11) -> None:
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    results, seen = {}, {}
    for row in rows:
        key = json.dumps(row.get("channels"))
        if key not in seen:
            model = shaped(width, row.get("channels"))
            seen[key] = {"img_s_b1": images_per_s(model, 1, repeats),
                         "img_s_b64": images_per_s(model, 64, repeats)}
            print(f"[speed] {row['row']}: {seen[key]}", flush=True)
        results[row["row"]] = seen[key]
    results["_machine"] = {"node": platform.node(), "processor": platform.processor(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "repeats": repeats}
    (out / "speed.json").write_text(json.dumps(results, indent=2))


def table(out: Path) -> None:
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    spd = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else {}
    lines = ["| split | criterion | params removed | FLOPs (M) | acc. pruned | acc. fine-tuned"
             " / scratch | img/s b1 | img/s b64 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "" if r["row"].endswith("dense") else "pruned_"
        after = r.get("finetuned_accuracy")
        control = r.get("criterion") in ("scratch", "dense+ft")
        acc_after = f"{after:.2f}" if after is not None else (
            f"{r[p + 'accuracy']:.2f} ({r['criterion']})" if control else "")
        acc_pruned = "" if control else f"{r[p + 'accuracy']:.2f}"
        fast = spd.get(r["row"], {"img_s_b1": r[p + "img_s_b1"], "img_s_b64": r[p + "img_s_b64"]})
        lines.append(f"| {r['split']} | {r.get('criterion', 'dense')} | "
                     f"{r.get('fraction', 0):.2f} | {r[p + 'flops'] / 1e6:.1f} | {acc_pruned} | "
                     f"{acc_after} | {fast['img_s_b1']:.0f} | {fast['img_s_b64']:.0f} |")
    text = "\n".join(lines) + "\n"
    text += ("\nSpeed: the --speed pass (speed.json)." if spd else
             "\nSpeed: measured during the quality pass (no --speed pass yet).") + "\n"
    (out / "results.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/structured_cnn")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    ap.add_argument("--subset", type=int, default=0, help="first N training images (0: all)")
    ap.add_argument("--test-subset", type=int, default=0, help="first N test images (0: all)")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--speed", action="store_true", help="time every recorded shape, then stop")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        speed(out, args.width)
        return
    if args.table:
        table(out)
        return
    rows = out / "rows.jsonl"
    done = {json.loads(x)["row"] for x in rows.read_text().splitlines()} if rows.exists() \
        else set()
    for split_name in args.splits:
        rows_for(split_name, args, out, done)
    table(out)


if __name__ == "__main__":
    main()
