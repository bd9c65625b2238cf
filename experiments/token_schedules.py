"""Zero-TPrune's schedule on the ViT trained here: does pruning at a few blocks from a
quarter of the depth on (as the first author's precursor code does on DeiT: after blocks 3,
6 and 9 of 12) close the gap to random drop that pruning every block leaves?

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/token_schedules.py \\
        --out experiments/results/token_schedules

Each schedule runs zero-tprune (I' -> S -> I), its I-stage alone (``s_share=0``) and random
drop at the same token counts, then ToMe at two r for reference; accuracy on the first
``--eval-images`` test images, FLOPs from the token counts (no timing: run it beside other
work if you must). The last block's keep only saves FLOPs: its MLP output reaches the
classifier through the class token alone, so every method loses nothing there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEDULES = ["1,.8,.8,.8,.8,.8", "1,1,.6,1,.6,.3", "1,1,.7,.7,.7,.3", "1,.7,1,.7,1,.3",
             "1,1,1,.5,.5,.1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/token_schedules")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--schedules", nargs="+", default=SCHEDULES)
    ap.add_argument("--rs", type=int, nargs="+", default=[6, 8])
    args = ap.parse_args()
    from fedprune.config import ModelConfig
    from fedprune.prune.cnn import reference_cnn
    from fedprune.prune.tokens import token_pruner
    from fedprune.prune.tokens.job import measure

    model = reference_cnn(ModelConfig(name="vit", width=16), "cifar10", 20).eval()
    dense = measure(model, "cifar10", args.eval_images, speed=False)
    rows = [{"method": "dense", "setting": "-", "accuracy": dense["accuracy"], "flops": 1.0}]
    runs = [(m, f"keep {s}" + (" (I-stage only)" if o else ""),
             {"keep": [float(k) for k in s.split(",")], **o})
            for s in args.schedules
            for m, o in (("zero-tprune", {}), ("zero-tprune", {"s_share": 0.0}),
                         ("random", {}))]
    runs += [("tome", f"r {r}", {"r": r}) for r in args.rs]
    for method, setting, options in runs:
        pruner = token_pruner(method, **options)
        pruner.attach(model)
        try:
            got = measure(model, "cifar10", args.eval_images, speed=False)
        finally:
            pruner.detach(model)
        rows.append({"method": method, "setting": setting, "accuracy": got["accuracy"],
                     "flops": got["flops"] / dense["flops"]})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps({"command": " ".join(sys.argv),
                                               "eval_images": args.eval_images,
                                               "rows": rows}, indent=1))
    lines = [f"First {args.eval_images} CIFAR-10 test images; dense "
             f"{100 * dense['accuracy']:.2f}%.", "",
             "| method | setting | FLOPs / dense | top-1 (%) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['setting']} | {r['flops']:.3f} | "
              f"{100 * r['accuracy']:.2f} |" for r in rows[1:]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
