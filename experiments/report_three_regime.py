"""Table and phase diagram of a three_regime.py sweep (``<out>/rows.jsonl``).

    .venv/bin/python experiments/report_three_regime.py experiments/results/three_regime

Writes ``<out>/results.md`` and ``<out>/phase.png``. Rows of the diagram are the
temperature axis, hottest at the top (central: fewest dense epochs first; federated: the
knob's values as given, in the order the sweep ran them), columns the load (density).
Regimes (the reference draws its boundaries by hand; these rules are ours and printed with
the table): I where the training-error barrier of the linear path between retrained
solutions, ``-mc``, exceeds ``BARRIER_TOL``; among the rest, II-B where the softmax CKA is at
least the median CKA of the well-connected cells, II-A below it. Cells probed along a
curved path too (``--curve-epochs``) get a second table: linear against curved barriers.

Grids that differ only in their seeds (one pair each, in separate ``--out`` folders) pool
into one seed table per density:

    .venv/bin/python experiments/report_three_regime.py --pool POOLED.md OUT1 OUT2 ...

Each temperature's test accuracy over every retrained model (mean and 95% t interval), its
paired difference to the best temperature (per seed: every temperature retrains with the
same seeds), and connectivity per pair. The seeds vary the retraining only; every grid
prunes the same dense checkpoints, whose own seed-to-seed spread is not in the interval.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BARRIER_TOL = 0.05  # training error (fraction): 5 points above the ends' mean
# sweep options that shape only one kind of grid (the other kind never reads them)
CENTRAL_ONLY = ("dense_epochs", "temps", "retrain_epochs", "lr")
FEDERATED_ONLY = ("values", "knob_in", "pair", "set")


def applicable(settings: dict) -> dict:
    """The settings a central or a federated grid (``settings["federated"]``) reads."""
    skip = CENTRAL_ONLY if settings.get("federated") else FEDERATED_ONLY
    return {k: v for k, v in settings.items() if k not in skip}


def load(out: Path) -> list[dict]:
    path = out / "rows.jsonl"
    if not path.exists():
        raise SystemExit(f"report: no {path}; run experiments/three_regime.py first")
    # a cell's row is appended again when it gains probes (the curved path): last one wins
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["cell"]] = row
    return list(rows.values())


def axes(rows: list[dict]) -> tuple[str, list[str], list[float]]:
    """The temperature axis name, its values hottest first, and the densities."""
    axis = rows[0]["axis"]
    values = list(dict.fromkeys(r["value"] for r in rows))
    if axis == "epochs":
        values.sort(key=int)  # fewer epochs = hotter
    return axis, values, sorted({r["density"] for r in rows})


def regimes(rows: list[dict], barrier_tol: float = BARRIER_TOL) -> dict[str, str]:
    """cell -> I / II-A / II-B (see the module docstring)."""
    from fedprune.study.landscape import regime

    connected = [r["cka"] for r in rows if -r["mc_error"] <= barrier_tol]
    split = float(np.median(connected)) if connected else 1.0
    return {r["cell"]: regime(-r["mc_error"], r["cka"], barrier_tol, split) for r in rows}


def table(rows: list[dict], names: dict[str, str]) -> list[str]:
    axis, values, densities = axes(rows)
    by = {(r["value"], r["density"]): r for r in rows}
    lines = [f"| {axis} \\ density | " + " | ".join(f"{d:g}" for d in densities) + " |",
             "|---" * (len(densities) + 1) + "|"]
    for v in values:
        cells = []
        for d in densities:
            r = by.get((v, d))
            cells.append("—" if r is None else
                         f"{100 * np.mean(r['test_accuracy']):.2f} / {r['mc_error']:+.3f} / "
                         f"{r['cka']:.3f} / {names[r['cell']]}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def curve_table(rows: list[dict]) -> list[str]:
    """Linear against curved connectivity, for the cells that have a curve."""
    curved = [r for r in rows if "curve_mc_error" in r]
    if not curved:
        return []
    axis, values, densities = axes(rows)
    order = {v: i for i, v in enumerate(values)}
    curved.sort(key=lambda r: (r["density"], order[r["value"]]))
    lines = ["", "Curved path (quadratic Bezier, bend trained on the training images; mc on "
             "training error, loss barrier in nats):", "",
             f"| {axis} | density | bend epochs | mc linear | mc curve | loss barrier linear "
             "| loss barrier curve |", "|---|---|---|---|---|---|---|"]
    for r in curved:
        lines.append(f"| {r['value']} | {r['density']:g} | {r['curve_epochs']} | "
                     f"{r['mc_error']:+.3f} | {r['curve_mc_error']:+.3f} | "
                     f"{r['loss_barrier']:.3f} | {r['curve_loss_barrier']:.3f} |")
    return lines


def transitions(rows: list[dict]) -> list[str]:
    """Per density: the temperature with the best mean test accuracy."""
    axis, values, densities = axes(rows)
    by = {(r["value"], r["density"]): float(np.mean(r["test_accuracy"])) for r in rows}
    out = []
    for d in densities:
        accs = {v: by[(v, d)] for v in values if (v, d) in by}
        if len(accs) > 1:
            best = max(accs, key=accs.get)
            spread = 100 * (max(accs.values()) - min(accs.values()))
            out.append(f"- density {d:g}: best {axis}={best} "
                       f"({100 * accs[best]:.2f}%; spread over {axis} {spread:.2f} points)")
    return out


def plot(rows: list[dict], names: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis, values, densities = axes(rows)
    by = {(r["value"], r["density"]): r for r in rows}

    def grid(fn):
        return np.array([[fn(by[(v, d)]) if (v, d) in by else np.nan for d in densities]
                         for v in values])
    acc = grid(lambda r: 100 * float(np.mean(r["test_accuracy"])))
    panels = [("test error - column best (points)", np.nanmax(acc, 0) - acc),
              ("mc on training error", grid(lambda r: r["mc_error"])),
              ("CKA (softmax)", grid(lambda r: r["cka"]))]
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, data) in zip(axs, panels):
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(densities)), [f"{d:g}" for d in densities])
        ax.set_yticks(range(len(values)), values)
        ax.set_xlabel("load: density")
        ax.set_ylabel(f"temperature: {axis} (hottest on top)")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    for i, v in enumerate(values):
        for j, d in enumerate(densities):
            if (v, d) in by:
                axs[0].text(j, i, names[by[(v, d)]["cell"]], ha="center", va="center",
                            color="white", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path) -> Path:
    rows = load(out)
    setup = out / "setup.json"
    info = json.loads(setup.read_text()) if setup.exists() else {}
    lines = ["# Three-regime study: test accuracy (%) / mc / CKA / regime", ""]
    lines += [f"Command: `{i['command']}`" for i in info.get("invocations", [])]
    lines += ["", f"Settings: {json.dumps(applicable(info.get('settings', {})))}",
              f"Machine: {info.get('machine', '?')}", "",
              f"Regimes: I where -mc > {BARRIER_TOL} (training error); otherwise II-B where "
              "CKA >= the median CKA of the well-connected cells, else II-A.", ""]
    names = regimes(rows)
    lines += table(rows, names) + curve_table(rows)
    lines += ["", "Best temperature per density:"] + transitions(rows)
    plot(rows, names, out / "phase.png")
    lines += ["", "![phase diagram](phase.png)", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def pooled_rows(outs: list[Path]) -> list[dict]:
    """Rows of several grids that differ only in seeds (refused otherwise, naming the
    setting), one per (cell, grid)."""
    ignore = {"seeds", "curve_epochs", "densities", "temps", "values"}
    first, rows = None, []
    for out in outs:
        settings = applicable(json.loads((out / "setup.json").read_text())["settings"])
        settings = {k: v for k, v in settings.items() if k not in ignore}
        if first is None:
            first = (out, settings)
        for key in sorted(set(settings) | set(first[1])):
            if settings.get(key) != first[1].get(key):
                raise SystemExit(f"report: {out} ran {key}={settings.get(key)!r}, "
                                 f"{first[0]} {first[1].get(key)!r}: not one grid")
        rows += load(out)
    return rows


def seed_table(rows: list[dict], density: float) -> list[str]:
    from fedprune.study.paired import mean_interval, paired_difference

    axis, values, _ = axes(rows)
    acc: dict[str, dict[int, float]] = {v: {} for v in values}
    pairs: dict[str, list[str]] = {v: [] for v in values}
    for r in rows:
        if r["density"] == density:
            for seed, a in zip(r["seeds"], r["test_accuracy"]):
                if seed in acc[r["value"]]:
                    raise SystemExit(f"report: seed {seed} of {r['cell']} appears twice")
                acc[r["value"]][seed] = 100 * a
            curve = f", curve {r['curve_mc_error']:+.3f}" if "curve_mc_error" in r else ""
            pairs[r["value"]].append(f"{r['seeds']}: {r['mc_error']:+.3f}{curve}")
    values = [v for v in values if acc[v]]
    best = max(values, key=lambda v: mean_interval(list(acc[v].values())).mean)
    lines = [f"Density {density:g}: test accuracy (%) per seed, mean [95% interval], paired "
             f"difference to the best {axis} ({best}); mc (linear, curve) per pair:", "",
             f"| {axis} | per seed | mean [95%] | − best [95%] | mc per pair |",
             "|---|---|---|---|---|"]
    for v in values:
        m = mean_interval(list(acc[v].values()))
        d = paired_difference(acc[v], acc[best])
        diff = "—" if v == best else (f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
                                      + ("" if d.distinguishable else " nd"))
        seeds = ", ".join(f"{acc[v][s]:.2f}" for s in sorted(acc[v]))
        lines.append(f"| {v} | {seeds} | {m.mean:.2f} [{m.low:.2f}, {m.high:.2f}] | {diff} "
                     f"| {'; '.join(pairs[v])} |")
    return lines + ["", "nd: the interval contains zero (not distinguishable)."]


def write_pooled(path: Path, outs: list[Path]) -> Path:
    rows = pooled_rows(outs)
    lines = ["# Three-regime grids pooled over seeds", "",
             "Grids: " + ", ".join(f"`{o}`" for o in outs), ""]
    for density in sorted({r["density"] for r in rows}):
        lines += seed_table(rows, density) + [""]
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pool"]:
        if len(sys.argv) < 5:
            raise SystemExit("usage: report_three_regime.py --pool POOLED.md OUT1 OUT2 ...")
        print(write_pooled(Path(sys.argv[2]), [Path(a) for a in sys.argv[3:]]))
    else:
        print(write_report(Path(sys.argv[1] if len(sys.argv) > 1 else
                                "experiments/results/three_regime")))
