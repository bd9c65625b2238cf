"""Zero-TPrune's schedule on the ViT trained here: does pruning at a few blocks from a
quarter of the depth on (as the first author's precursor code does on DeiT: after blocks 3,
6 and 9 of 12), or ranking on a sharpened softmax (the precursor's tau 0.5), close the gap
to random drop that pruning every block leaves? And is the attention itself to blame?

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/token_schedules.py \\
        --out experiments/results/token_schedules

Each schedule runs zero-tprune (I' -> S -> I), its I-stage alone (``s_share=0``), both at
tau 0.5, the class-attention control (``cls-attn``: EViT's criterion, one step of the class
token's attention instead of WPR) and random drop, all at the same token counts, then ToMe
at a few r for reference; accuracy on the first ``--eval-images`` test images, FLOPs from
the token counts (no timing: run it beside other work if you must). The last block's keep
only saves FLOPs: its MLP output reaches the classifier through the class token alone, so
every method loses nothing there. ``rows.json`` is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEDULES = ["1,.8,.8,.8,.8,.8", "1,1,.6,1,.6,.3", "1,1,.7,.7,.7,.3", "1,.7,1,.7,1,.3",
             "1,1,1,.5,.5,.1"]
# column label, registered pruner, options
VARIANTS = [("zero-tprune", "zero-tprune", {}), ("I-stage only", "zero-tprune", {"s_share": 0.0}),
            ("zero-tprune tau 0.5", "zero-tprune", {"tau": 0.5}),
            ("I-stage only tau 0.5", "zero-tprune", {"s_share": 0.0, "tau": 0.5}),
            ("cls-attn", "cls-attn", {}), ("random", "random", {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/token_schedules")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--schedules", nargs="+", default=SCHEDULES)
    ap.add_argument("--rs", type=int, nargs="+", default=[6, 8])
    args = ap.parse_args()
    from experiments.bench_tokens import measure_setting
    from fedprune.config import ModelConfig
    from fedprune.prune.cnn import reference_cnn

    model = reference_cnn(ModelConfig(name="vit", width=16), "cifar10", 20).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = measure_setting(model, "cifar10", "dense", {}, args, speed=False)
    rows = [{"method": "dense", "setting": "-", "accuracy": dense["accuracy"], "flops": 1.0}]
    runs = [(label, m, s, {"keep": [float(k) for k in s.split(",")], **o})
            for s in args.schedules for label, m, o in VARIANTS]
    runs += [("tome", "tome", f"r {r}", {"r": r}) for r in args.rs]
    for label, method, setting, options in runs:
        got = measure_setting(model, "cifar10", method, options, args, speed=False)
        rows.append({"method": label, "setting": setting, "accuracy": got["accuracy"],
                     "flops": got["flops"] / dense["flops"]})
        print(json.dumps(rows[-1]), flush=True)
        (out / "rows.json").write_text(json.dumps({"command": " ".join(sys.argv),
                                                   "eval_images": args.eval_images,
                                                   "rows": rows}, indent=1))
    (out / "results.md").write_text(table(rows, args.eval_images))
    print(table(rows, args.eval_images))


def table(rows: list[dict], eval_images: int) -> str:
    """Schedules as rows, the variants as columns (top-1 %), ToMe below."""
    dense = rows[0]
    labels = [v[0] for v in VARIANTS]
    cell = {(r["setting"], r["method"]): r for r in rows[1:]}
    schedules = list(dict.fromkeys(r["setting"] for r in rows[1:] if r["method"] != "tome"))
    lines = [f"First {eval_images} CIFAR-10 test images; dense {100 * dense['accuracy']:.2f}%.",
             "", "| schedule (keep per block) | FLOPs / dense | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for s in schedules:
        flops = cell[(s, labels[0])]["flops"]
        accs = [f"{100 * cell[(s, lab)]['accuracy']:.2f}" if (s, lab) in cell else "—"
                for lab in labels]
        lines.append(f"| {s} | {flops:.3f} | " + " | ".join(accs) + " |")
    tome = [r for r in rows[1:] if r["method"] == "tome"]
    if tome:
        lines += ["", "ToMe: " + "; ".join(f"{r['setting']} {100 * r['accuracy']:.2f}% at "
                                           f"{r['flops']:.3f} of the dense FLOPs" for r in tome)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
