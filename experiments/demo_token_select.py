"""Federated choice of a token-pruning configuration on non-IID CIFAR-10 clients.

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/demo_token_select.py \\
        --out experiments/results/token_select

1. The ViT trained here (``reference_cnn``: width 16, ``--epochs`` of AdamW, cached) is
   written to ``<out>/model/vit-init.safetensors``.
2. Every schedule of experiments/configs/token_select.yaml is evaluated centrally on the
   CIFAR-10 test split (10,000 images): the oracle the clients cannot see.
3. For each ``--alphas`` value, ``fedprune run token_select`` (a real Flower simulation,
   10 clients, Dirichlet(alpha) label skew) starts from that file; in round 1 every client
   scores each schedule on its own first training batches and the server keeps the lowest
   pooled loss within the FLOPs budget.

``results.md`` sets the federated choices beside the test-set oracle. Runs already in
``<out>/runs`` are reused (delete one to redo it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = "token_select"


def reference(out: Path, epochs: int) -> Path:
    from safetensors.torch import save_file

    from fedprune.config import ModelConfig
    from fedprune.prune.cnn import reference_cnn

    path = out / "model" / "vit-init.safetensors"  # a subfolder: not committed
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = reference_cnn(ModelConfig(name="vit", width=16), "cifar10", epochs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def oracle(init: Path, out: Path) -> list[dict]:
    """Test accuracy and FLOPs of every schedule, centrally (cached in oracle.json)."""
    from fedprune.config import ModelConfig, load_config
    from fedprune.methods.tokens import make_pruner, parse_schedules
    from fedprune.models import build_model
    from fedprune.models.weights import load_weights_file
    from fedprune.prune.tokens.job import measure

    path = out / "oracle.json"
    if path.exists():
        return json.loads(path.read_text())
    o = load_config(CONFIG).method
    model = build_model(ModelConfig(name="vit", width=16), "cifar10")
    load_weights_file(model, str(init))
    model.eval()
    rows = [{"schedule": "dense", **measure(model, "cifar10", speed=False)}]
    for schedule in parse_schedules(o.schedules, o.pruner):
        pruner = make_pruner(o.pruner, schedule)
        pruner.attach(model)
        try:
            rows.append({"schedule": schedule, **measure(model, "cifar10", speed=False)})
        finally:
            pruner.detach(model)
        print(f"[oracle] {schedule}: {100 * rows[-1]['accuracy']:.2f}%", flush=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


def federated(init: Path, out: Path, alpha: float) -> dict:
    run = out / "runs" / f"alpha-{alpha}"
    if not (run / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "fedprune.cli", "run", CONFIG,
                        f"data.alpha={alpha}", f"model.init_file={init}",
                        f"run.out_dir={run.parent}", f"run.name={run.name}"], check=True)
    return json.loads((run / "summary.json").read_text())["method_report"]["token_selection"]


def table(rows: list[dict], choices: dict[float, dict]) -> str:
    dense = rows[0]
    from fedprune.config import load_config

    first = next(iter(choices.values()))
    budget = load_config(CONFIG).method.flops_budget
    allowed = set(first["allowed"])
    best = max(allowed, key=lambda k: rows[k + 1]["accuracy"])
    head = "| schedule (keep per block) | FLOPs / dense | test top-1 (%) | " + " | ".join(
        f"clients' loss, alpha {a}" for a in choices) + " |"
    lines = [f"Dense ViT: {100 * dense['accuracy']:.2f}% test top-1. Budget: FLOPs <= "
             f"{budget:g} of dense.", "", head,
             "|" + "---|" * (3 + len(choices))]
    for k, row in enumerate(rows[1:]):
        mark = " (over budget)" if k not in allowed else (" **test best**" if k == best else "")
        cells = []
        for c in choices.values():
            chosen = " **chosen**" if c["chosen"] == k else ""
            cells.append(f"{c['loss'][k]:.4f}{chosen}")
        lines.append(f"| {','.join(f'{v:g}' for v in row['schedule'])}{mark} | "
                     f"{first['flops_ratio'][k]:.3f} | {100 * row['accuracy']:.2f} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    for alpha, c in choices.items():
        k = c["chosen"]
        lines.append(f"- alpha {alpha}: {c['clients']} clients, {c['examples']} examples; "
                     f"chose schedule {k} (test {100 * rows[k + 1]['accuracy']:.2f}%, "
                     f"{100 * (rows[best + 1]['accuracy'] - rows[k + 1]['accuracy']):.2f} "
                     "points below the test-set best within the budget).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/token_select")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init = reference(out, args.epochs)
    rows = oracle(init, out)
    choices = {a: federated(init, out, a) for a in args.alphas}
    text = table(rows, choices)
    (out / "results.md").write_text(text)
    (out / "choices.json").write_text(json.dumps({str(a): c for a, c in choices.items()},
                                                 indent=1))
    print(text)


if __name__ == "__main__":
    main()
