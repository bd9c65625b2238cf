"""Tables and a plot from experiments/study_llm.py's cells.

  .venv/bin/python experiments/report_llm_study.py --out experiments/results/llm_study

Writes ``table.md`` (mean perplexity over the sources per protocol, and what a client
gets alone on its own main source against the pooled model on the same source),
``sources.md`` (perplexity per source, with each source's share of the clients' windows)
and ``study.png``. Means are arithmetic means of perplexities over the sources.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROTOCOLS = ("centralized", "mask-vote", "l0-average")
LABEL = {"centralized": "pooled (= centralized)", "mask-vote": "mask-vote",
         "l0-average": "l0-average"}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main_source(client: dict) -> str:
    return max(client["sources"], key=lambda s: client["sources"][s])


def own_source_rows(cell: dict) -> tuple[float, float]:
    """(alone, pooled): mean over clients of the perplexity on the client's main source,
    of its own model and of the pooled model."""
    alone = mean(c["ppl"][main_source(c)] for c in cell["alone"])
    pooled = mean(cell["centralized"][main_source(c)] for c in cell["alone"])
    return alone, pooled


def load(out: Path) -> tuple[dict, list[dict]]:
    dense = json.loads((out / "dense.json").read_text())
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    return dense, cells


def table(dense: dict, cells: list[dict]) -> str:
    lines = [f"Dense: mean {mean(dense['ppl'].values()):.2f} ("
             + ", ".join(f"{s} {v:.2f}" for s, v in dense["ppl"].items()) + ")", ""]
    for key in sorted({(c["pruner"], c["target"]) for c in cells}):
        lines += [f"**{key[0]}, {key[1]}**", "",
                  "| partition | clients | " + " | ".join(LABEL[p] for p in PROTOCOLS)
                  + " | alone (mean of clients) | alone, own source | pooled, same sources |",
                  "|---|---|" + "---|" * (len(PROTOCOLS) + 3)]
        for c in sorted((c for c in cells if (c["pruner"], c["target"]) == key),
                        key=lambda c: (c["clients"], c["partition"])):
            alone, pooled = own_source_rows(c)
            lines.append(f"| {c['partition']} | {c['clients']} | "
                         + " | ".join(f"{mean(c[p].values()):.2f}" for p in PROTOCOLS)
                         + f" | {mean(mean(a['ppl'].values()) for a in c['alone']):.2f}"
                         + f" | {alone:.2f} | {pooled:.2f} |")
        lines.append("")
    return "\n".join(lines)


def sources_table(cells: list[dict]) -> str:
    lines = []
    for c in sorted(cells, key=lambda c: (c["pruner"], c["target"], c["clients"],
                                          c["partition"])):
        total = {s: sum(a["sources"][s] for a in c["alone"]) for s in c["centralized"]}
        n = sum(total.values())
        lines += [f"**{c['partition']}, {c['clients']} clients, {c['pruner']} {c['target']}**",
                  "", "| source | share of windows | " + " | ".join(LABEL[p] for p in PROTOCOLS)
                  + " | alone, clients mainly on it |", "|---|---|" + "---|" * 4]
        for s in c["centralized"]:
            mine = [a["ppl"][s] for a in c["alone"] if main_source(a) == s]
            alone = f"{mean(mine):.2f} ({len(mine)})" if mine else "-"
            protocols = " | ".join(f"{c[p][s]:.2f}" for p in PROTOCOLS)
            lines.append(f"| {s} | {total[s] / n:.2f} | {protocols} | {alone} |")
        lines.append("")
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(c["pruner"], c["target"]) for c in cells})
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        group = sorted((c for c in cells if (c["pruner"], c["target"]) == key),
                       key=lambda c: (c["clients"], c["partition"]))
        names = [f"{c['partition']}\n{c['clients']}c" for c in group]
        series = {LABEL[p]: [mean(c[p].values()) for c in group] for p in PROTOCOLS}
        series["alone (mean)"] = [mean(mean(a["ppl"].values()) for a in c["alone"])
                                  for c in group]
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(group))], values, width, label=label)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(group))], names, fontsize=7)
        ax.set_title(f"{key[0]} {key[1]}")
        ax.set_ylabel("mean perplexity over sources")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/llm_study")
    args = ap.parse_args(argv)
    out = Path(args.out)
    dense, cells = load(out)
    if not cells:
        raise SystemExit(f"{out}/cells holds no finished cell yet")
    (out / "table.md").write_text(table(dense, cells) + "\n")
    (out / "sources.md").write_text(sources_table(cells) + "\n")
    plot(cells, out / "study.png")
    print(table(dense, cells))


if __name__ == "__main__":
    main()
