"""Non-IID study report: one table per label skew, methods x densities, plus plots.

    .venv/bin/python experiments/report_noniid.py --runs experiments/results/noniid/runs \
        --out experiments/results/noniid

Reads every run directory named ``<method>-a<alpha>-d<density>[-s<seed>]`` (the names
``sweep_noniid.py`` gives; alpha is a Dirichlet concentration or ``iid``; no seed suffix
means seed 0) and writes:

* ``results.csv``: one row per finished run (its ``summary.json``);
* ``results.md``: per alpha, final test accuracy (%) with methods as rows and densities as
  columns, the best sparse baseline of each column in bold, FedTiny's gap to that baseline
  and to dense FedAvg (and the random-reinit control's gap to FedTiny) under the table;
  runs that failed or have not finished are listed at the end;
* ``acc_vs_density.png`` (a subplot per alpha, a line per method), ``acc_vs_round.png``
  (one cell, a line per method, from each run's ``metrics.csv``) and, when
  ``experiments/results/memory/memory.json`` exists and is readable, ``client_memory.png``.

Dense FedAvg does not depend on density: it runs once per alpha (``d1.0``) and its number
is repeated in every density column. A cell with no finished run shows "—".

Seeds (paired design: every method of a cell runs on the same seeds, i.e. the same
partition and initial weights): a cell with several seeds shows the mean and the
half-width of its 95% Student-t interval, and under each table every method's paired
difference to the column's best baseline (by mean) with its interval; "not
distinguishable" marks an interval that contains zero (``fedprune.study.paired``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from fedprune.study import Interval, mean_interval, paired_difference

REPO = Path(__file__).resolve().parent.parent
MEMORY_JSON = REPO / "experiments" / "results" / "memory" / "memory.json"
ROUNDS_FILE = "metrics.csv"  # per-round rows (fedprune/fl/recorder.py)

# Table order = sweep order (reinit needs fedtiny's mask). A suffix ("fedtiny_vgg11")
# names a variant of the method before it, compared within its own suffix family.
METHODS = ("dense", "random", "erk", "snip", "synflow", "prunefl", "feddst", "gates",
           "fedtiny", "fedtinywarm", "fedtinyerr", "progonly", "reinit")  # progonly:
# FedTiny without BN selection; fedtinywarm: FedTiny selecting after dense warm-up rounds;
# fedtinyerr: the same, judging candidates on error rate instead of loss
BASELINES = ("random", "erk", "snip", "synflow", "prunefl", "feddst", "gates")
REF_CELL = ("0.5", 0.05)  # acc_vs_round.png: alpha 0.5, density 0.05
CSV_COLUMNS = ["method", "alpha", "density", "seed", "final_accuracy", "best_accuracy",
               "achieved_density", "flops_vs_dense", "bytes_vs_dense", "wall_seconds",
               "rounds", "run", "machine"]
SETTING_KEYS = ("model.name", "model.width", "data.num_clients", "data.train_subset",
                "data.test_subset", "fed.rounds", "fed.fraction_train", "train.local_epochs",
                "train.batch_size", "train.lr")
DASH = "—"
_NAME = re.compile(r"^(?P<method>[A-Za-z0-9_]+)-a(?P<alpha>iid|[0-9.]+)-d(?P<density>[0-9.]+)"
                   r"(?:-s(?P<seed>[0-9]+))?$")


def cell_name(method: str, alpha: str, density: str, seed: int = 0) -> str:
    """Run directory name of one sweep cell, e.g. ``fedtiny-a0.5-d0.05`` (seed 0) or
    ``fedtiny-a0.5-d0.05-s2``."""
    return f"{method}-a{alpha}-d{density}" + (f"-s{seed}" if seed else "")


def parse_cell_name(name: str) -> tuple[str, str, float, int] | None:
    """``fedtiny-a0.5-d0.05-s2`` -> ("fedtiny", "0.5", 0.05, 2); None for other names."""
    match = _NAME.match(name)
    if not match:
        return None
    return (match["method"], match["alpha"], float(match["density"]),
            int(match["seed"] or 0))


def split_method(method: str) -> tuple[str, str]:
    """``fedtiny_vgg11`` -> ("fedtiny", "_vgg11"): base method and variant suffix."""
    base, sep, rest = method.partition("_")
    return base, sep + rest


def method_order(methods: set[str]) -> list[str]:
    def key(m: str) -> tuple:
        base, suffix = split_method(m)
        return (suffix, METHODS.index(base) if base in METHODS else len(METHODS), m)

    return sorted(methods, key=key)


def _alpha_key(alpha: str) -> float:
    return math.inf if alpha == "iid" else float(alpha)


def alpha_order(alphas: set[str]) -> list[str]:
    return sorted(alphas, key=_alpha_key)


# ----------------------------------------------------------------------------- reading


def load_runs(runs_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the finished runs, and the cells (with a one-line status) of run dirs that
    have no summary.json: failed (error.log) or not finished."""
    rows, unfinished = [], []
    if not runs_dir.is_dir():
        return rows, unfinished
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        cell = parse_cell_name(run.name)
        if cell is None:
            continue
        summary_path = run / "summary.json"
        if summary_path.exists():
            rows.append(_row(run.name, cell, json.loads(summary_path.read_text())))
        else:
            unfinished.append({"method": cell[0], "alpha": cell[1], "density": cell[2],
                               "seed": cell[3], "status": _unfinished_line(run)})
    return rows, unfinished


def _row(run: str, cell: tuple[str, str, float, int], summary: dict) -> dict[str, Any]:
    method, alpha, density, seed = cell
    return {"method": method, "alpha": alpha, "density": density, "seed": seed,
            "final_accuracy": summary.get("final_accuracy"),
            "best_accuracy": summary.get("best_accuracy"),
            "achieved_density": summary.get("density"),
            "flops_vs_dense": summary.get("flops_vs_dense"),
            "bytes_vs_dense": summary.get("bytes_vs_dense"),
            "wall_seconds": summary.get("wall_seconds"),
            "rounds": summary.get("rounds"), "run": run,
            "config": summary.get("config", {}), "selection": summary.get("selection"),
            "machine": summary.get("machine")}


def _unfinished_line(run: Path) -> str:
    error = run / "error.log"
    if error.exists():
        lines = [ln for ln in error.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
        return f"`{run.name}`: failed ({run.name}/error.log: {last[:200]})"
    done = 0
    if (run / ROUNDS_FILE).exists():
        done = sum(1 for r in _read_rounds(run) if r["round"] > 0)
    return f"`{run.name}`: not finished ({done} rounds in {ROUNDS_FILE})"


def _read_rounds(run: Path) -> list[dict[str, float]]:
    with open(run / ROUNDS_FILE, newline="") as f:
        return [{"round": int(r["round"]), "accuracy": float(r["accuracy"])}
                for r in csv.DictReader(f) if r.get("accuracy") not in (None, "")]


def read_sweep_info(out_dir: Path) -> dict[str, Any]:
    """What sweep_noniid.py recorded in ``sweep.json`` (commands, machine, grid); {} if none."""
    path = out_dir / "sweep.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------- tables


class Grid:
    """Finished runs indexed by (method, alpha, density), each a {seed: row}; dense
    repeats across densities."""

    def __init__(self, rows: list[dict[str, Any]], unfinished: list[dict[str, Any]],
                 sweep: dict[str, Any]) -> None:
        self.by_cell: dict[tuple, dict[int, dict]] = {}
        self.dense_by: dict[tuple, dict[int, dict]] = {}
        for r in sorted(rows, key=lambda r: r.get("seed", 0)):
            self.by_cell.setdefault((r["method"], r["alpha"], r["density"]), {})[
                r.get("seed", 0)] = r
            if r["density"] == 1.0:
                self.dense_by.setdefault((r["method"], r["alpha"]), {})[r.get("seed", 0)] = r
        cells = rows + unfinished  # a failed cell still gets its row and column
        methods = {r["method"] for r in cells} | set(sweep.get("methods", []))
        alphas = {r["alpha"] for r in cells} | {str(a) for a in sweep.get("alphas", [])}
        densities = {r["density"] for r in cells if r["density"] != 1.0}
        densities |= {float(d) for d in sweep.get("densities", [])}
        self.methods = method_order(methods)
        self.alphas = alpha_order(alphas)
        self.densities = sorted(densities)

    def colors(self) -> dict[str, str]:
        """One colour per method across every plot; density-free (dense) rows in black."""
        free = {m for m, _ in self.dense_by}
        sparse = [m for m in self.methods if m not in free]
        return {**{m: f"C{i % 10}" for i, m in enumerate(sparse)}, **{m: "k" for m in free}}

    def seeds(self, method: str, alpha: str, density: float) -> dict[int, dict[str, Any]]:
        return self.by_cell.get((method, alpha, density)) or \
            self.dense_by.get((method, alpha)) or {}

    def get(self, method: str, alpha: str, density: float) -> dict[str, Any] | None:
        """The cell's first seed's row (costs are the same on every seed)."""
        runs = self.seeds(method, alpha, density)
        return runs[min(runs)] if runs else None

    def accs(self, method: str, alpha: str, density: float) -> dict[int, float]:
        return {s: r["final_accuracy"] for s, r in self.seeds(method, alpha, density).items()
                if r["final_accuracy"] is not None}

    def interval(self, method: str, alpha: str, density: float) -> Interval | None:
        accs = self.accs(method, alpha, density)
        return mean_interval(list(accs.values())) if accs else None

    def acc(self, method: str, alpha: str, density: float) -> float | None:
        """Mean final accuracy over the cell's seeds."""
        iv = self.interval(method, alpha, density)
        return None if iv is None else iv.mean

    def best_baseline(self, suffix: str, alpha: str, density: float
                      ) -> tuple[float, list[str]] | None:
        """Highest final accuracy among the sparse baselines of one family, and who has it."""
        scores = {}
        for m in self.methods:
            base, suf = split_method(m)
            acc = self.acc(m, alpha, density)
            if suf == suffix and base in BASELINES and acc is not None:
                scores[m] = acc
        if not scores:
            return None
        best = max(scores.values())
        return best, [m for m, a in scores.items() if a == best]


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.2f}"


def _pct_interval(iv: Interval | None) -> str:
    """"12.34" for one seed, "12.34 ± 0.56 (n=3)" for several."""
    if iv is None:
        return DASH
    if iv.n == 1:
        return _pct(iv.mean)
    return f"{100 * iv.mean:.2f} ± {100 * iv.half_width:.2f} (n={iv.n})"


def _pp_interval(iv: Interval) -> str:
    text = f"{100 * iv.mean:+.2f} pp"
    if iv.n == 1:
        return text + " (one seed)"
    verdict = "" if iv.distinguishable else ", not distinguishable"
    return f"{text} [{100 * iv.low:+.2f}, {100 * iv.high:+.2f}] (n={iv.n}{verdict})"


def _gap(a: float | None, b: float | None) -> str:
    return DASH if a is None or b is None else f"{100 * (a - b):+.2f} pp"


def alpha_title(alpha: str) -> str:
    return "IID" if alpha == "iid" else f"Dirichlet alpha = {alpha}"


def accuracy_table(grid: Grid, alpha: str) -> list[str]:
    """Markdown lines: methods x densities, best baseline in bold, gaps below."""
    head = "| method | " + " | ".join(f"density {d:g}" for d in grid.densities) + " |"
    lines = [head, "|---" * (len(grid.densities) + 1) + "|"]
    for method in grid.methods:
        suffix = split_method(method)[1]
        cells = []
        for d in grid.densities:
            text = _pct_interval(grid.interval(method, alpha, d))
            best = grid.best_baseline(suffix, alpha, d)
            if best and method in best[1]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""] + gap_lines(grid, alpha) + paired_lines(grid, alpha)


def paired_lines(grid: Grid, alpha: str) -> list[str]:
    """Every method minus the column's best baseline, paired over the seeds both ran
    (only where some cell of this alpha has more than one seed)."""
    if not any(len(grid.accs(m, alpha, d)) > 1 for m in grid.methods for d in grid.densities):
        return []
    out = ["", "Paired differences to the best baseline of each column (mean over common "
           "seeds, 95% t interval):"]
    for method in grid.methods:
        suffix = split_method(method)[1]
        parts = []
        for d in grid.densities:
            best = grid.best_baseline(suffix, alpha, d)
            mine = grid.accs(method, alpha, d)
            if not best or not mine or method in best[1]:
                continue
            theirs = grid.accs(best[1][0], alpha, d)
            if set(mine) & set(theirs):
                parts.append(f"{d:g}: {_pp_interval(paired_difference(mine, theirs))} "
                             f"vs {best[1][0]}")
        if parts:
            out.append(f"- {method}: " + "; ".join(parts))
    return out


def seed_table(grid: Grid, alpha: str, density: float) -> list[str]:
    """One cell of the grid with a column per seed, the mean with its 95% half-width, and
    each method's paired difference to the best baseline (empty when no method of the
    cell ran more than one seed)."""
    seeds = sorted({s for m in grid.methods for s in grid.accs(m, alpha, density)})
    if not any(len(grid.accs(m, alpha, density)) > 1 for m in grid.methods):
        return []
    best = grid.best_baseline("", alpha, density)
    ref = best[1][0] if best else None
    lines = [f"### {alpha_title(alpha)}, density {density:g}: every seed", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) +
             f" | mean ± 95% half-width | paired difference to {ref or 'the best baseline'} |",
             "|---" * (len(seeds) + 3) + "|"]
    for method in grid.methods:
        accs = grid.accs(method, alpha, density)
        if not accs:
            continue
        mean = _pct_interval(grid.interval(method, alpha, density)).replace(
            f" (n={len(accs)})", "")
        if method == ref:
            mean, diff = f"**{mean}**", DASH
        elif ref and set(accs) & set(grid.accs(ref, alpha, density)):
            diff = _pp_interval(paired_difference(accs, grid.accs(ref, alpha, density)))
        else:
            diff = DASH
        lines.append(f"| {method} | " + " | ".join(_pct(accs.get(s)) for s in seeds) +
                     f" | {mean} | {diff} |")
    return lines + [""]


# The questions the study asks of FedTiny's parts, as (method, minus which), paired over
# seeds: does the budget separate dense from random masks; does FedTiny beat its own
# starting allocation; what BN selection costs (progonly = FedTiny without it); what the
# warm-up and the error signal change; whether the mask or its weights matter (reinit).
ABLATIONS = (("dense", "random"), ("fedtiny", "erk"), ("progonly", "fedtiny"),
             ("progonly", "erk"), ("fedtinywarm", "fedtiny"), ("fedtinywarm", "erk"),
             ("fedtinyerr", "fedtinywarm"), ("fedtinyerr", "erk"), ("reinit", "fedtiny"))


def ablation_table(grid: Grid) -> list[str]:
    """Paired differences of ABLATIONS in every (alpha, density) cell where both ran more
    than one common seed; empty when none did."""
    cells = [(a, d) for a in grid.alphas for d in grid.densities]
    rows = []
    for method, other in ABLATIONS:
        parts = []
        for alpha, density in cells:
            mine, theirs = grid.accs(method, alpha, density), grid.accs(other, alpha, density)
            common = set(mine) & set(theirs)
            parts.append(_pp_interval(paired_difference(mine, theirs)).replace(" pp", "")
                         if len(common) > 1 else DASH)
        if any(p != DASH for p in parts):
            rows.append(f"| {method} − {other} | " + " | ".join(parts) + " |")
    if not rows:
        return []
    head = " | ".join(f"alpha {a}, {d:g}" for a, d in cells)
    return ["## Ablations: paired differences in points (95% t interval over seeds)", "",
            f"| comparison | {head} |", "|---" * (len(cells) + 1) + "|", *rows, ""]


def gap_lines(grid: Grid, alpha: str) -> list[str]:
    """FedTiny vs best baseline and dense, reinit vs FedTiny, per density column."""
    out = []
    for method in grid.methods:
        base, suffix = split_method(method)
        if base != "fedtiny":
            continue
        to_best, to_dense, reinit = [], [], []
        for d in grid.densities:
            ours = grid.acc(method, alpha, d)
            best = grid.best_baseline(suffix, alpha, d)
            who = f" (vs {', '.join(best[1])} {_pct(best[0])})" if best else ""
            to_best.append(f"{d:g}: {_gap(ours, best[0] if best else None)}{who}")
            to_dense.append(f"{d:g}: {_gap(ours, grid.acc('dense' + suffix, alpha, d))}")
            reinit.append(f"{d:g}: {_gap(grid.acc('reinit' + suffix, alpha, d), ours)}")
        out.append(f"- {method} minus the best baseline: " + "; ".join(to_best))
        out.append(f"- {method} minus dense{suffix}: " + "; ".join(to_dense))
        if f"reinit{suffix}" in grid.methods:
            out.append(f"- reinit{suffix} (same mask, new weights) minus {method}: "
                       + "; ".join(reinit))
    return out


def cost_table(grid: Grid, alpha: str) -> list[str]:
    """Markdown lines: achieved density, FLOPs and bytes vs dense per method x density."""
    head = "| method | " + " | ".join(f"density {d:g}" for d in grid.densities) + " |"
    lines = [head, "|---" * (len(grid.densities) + 1) + "|"]
    for method in grid.methods:
        cells = []
        for d in grid.densities:
            row = grid.get(method, alpha, d)
            if row is None or row["achieved_density"] is None:
                cells.append(DASH)
                continue
            cells.append(f"{row['achieved_density']:.4f} / {_pct(row['flops_vs_dense'])} / "
                         f"{_pct(row['bytes_vs_dense'])}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def setting_line(rows: list[dict[str, Any]]) -> str:
    """The budget the runs share, from their configs (several values listed if they differ)."""
    parts = []
    for key in SETTING_KEYS:
        values = sorted({str(r["config"].get(key)) for r in rows if key in r["config"]})
        if values:
            parts.append(f"{key}={'/'.join(values)}")
    return ", ".join(parts) if parts else "no finished runs"


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acc_vs_density(grid: Grid, path: Path) -> Path:
    """One subplot per alpha: final accuracy vs density, a line per method, dense dashed."""
    plt = _pyplot()
    alphas = grid.alphas or ["iid"]
    fig, axes = plt.subplots(1, len(alphas), figsize=(4 * len(alphas), 3.6), sharey=True,
                             squeeze=False)
    colors = grid.colors()
    for ax, alpha in zip(axes[0], alphas):
        for method in grid.methods:
            if (method, alpha) in grid.dense_by:
                mean = grid.acc(method, alpha, 1.0)
                if mean is not None:
                    ax.axhline(100 * mean, ls="--", color=colors[method], lw=1, label=method)
                continue
            pts = [(d, grid.acc(method, alpha, d)) for d in grid.densities]
            pts = [(d, 100 * a) for d, a in pts if a is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[method], label=method)
        ax.set_xscale("log")
        if grid.densities:
            ax.set_xticks(grid.densities, [f"{d:g}" for d in grid.densities])
            ax.set_xticks([], minor=True)
            ax.set_xlim(grid.densities[0] / 1.5, grid.densities[-1] * 1.5)
        ax.set_title(alpha_title(alpha))
        ax.set_xlabel("density")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final test accuracy (%)")
    _legend(fig, axes[0])
    return _save(fig, path, plt)


def round_cell(grid: Grid) -> tuple[str, float]:
    """REF_CELL when it has runs, else the (alpha, density) cell with the most runs."""
    counts: dict[tuple[str, float], int] = {}
    for method, alpha, density in grid.by_cell:
        if density != 1.0:
            counts[(alpha, density)] = counts.get((alpha, density), 0) + 1
    if REF_CELL in counts or not counts:
        return REF_CELL
    return max(counts, key=lambda c: (counts[c], c == REF_CELL))


def plot_acc_vs_round(grid: Grid, runs_dir: Path, cell: tuple[str, float], path: Path) -> Path:
    """Test accuracy per round in one cell, a line per method (dense of that alpha too)."""
    plt = _pyplot()
    alpha, density = cell
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = grid.colors()
    for method in grid.methods:
        row = grid.get(method, alpha, density)
        if row is None or not (runs_dir / row["run"] / ROUNDS_FILE).exists():
            continue
        rounds = _read_rounds(runs_dir / row["run"])
        ax.plot([r["round"] for r in rounds], [100 * r["accuracy"] for r in rounds],
                marker=".", ls="--" if row["density"] == 1.0 else "-", color=colors[method],
                label=method)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{alpha_title(alpha)}, density {density:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    _legend(fig, [ax])
    return _save(fig, path, plt)


def _legend(fig: Any, axes: Any) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if labels:
        fig.legend([handles[lb] for lb in labels], labels, loc="center left",
                   bbox_to_anchor=(1.0, 0.5), fontsize=8)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- memory


def parse_memory(data: Any) -> list[tuple[str, float]] | None:
    """(label, MB) pairs from memory.json, whose format another script owns
    (experiments/bench_memory.py: ``{"rows": [{"model", "density", "method",
    "step_peak_bytes", ...}]}``); None when the format is not recognised. Also accepted: a
    bare list of records, each with a method/name/label and one numeric field whose name
    mentions peak, mem or rss. MB = 10^6 bytes, as bench_memory.py reports."""
    if isinstance(data, dict):
        data = next((data[k] for k in ("rows", "results", "runs", "methods")
                     if isinstance(data.get(k), list)), None)
    if not isinstance(data, list) or not data:
        return None
    out = []
    for rec in data:
        if not isinstance(rec, dict):
            return None
        label = next((str(rec[k]) for k in ("method", "name", "label") if k in rec), None)
        key = _memory_key(rec)
        if label is None or key is None:
            return None
        label += "".join(f" {rec[k]}" for k in ("model",) if k in rec)
        label += f" d={rec['density']:g}" if isinstance(rec.get("density"), float) else ""
        out.append((label, float(rec[key]) / (1e6 if key.lower().endswith("bytes") else 1)))
    return out


def _memory_key(rec: dict) -> str | None:
    """The record's memory field: step_peak_bytes when there, else the first numeric field
    named like peak/mem/rss."""
    numeric = [k for k, v in rec.items() if isinstance(v, (int, float))
               and not isinstance(v, bool)]
    if "step_peak_bytes" in numeric:
        return "step_peak_bytes"
    return next((k for k in numeric if any(w in k.lower() for w in ("peak", "mem", "rss"))),
                None)


def plot_client_memory(memory_json: Path, path: Path) -> tuple[Path | None, str]:
    """Bar chart of client peak memory; (None, why) when the file cannot be read."""
    try:
        pairs = parse_memory(json.loads(memory_json.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{memory_json} could not be read ({err}); client_memory.png not drawn"
    if pairs is None:
        return None, (f"{memory_json} has a format this report does not know; "
                      "client_memory.png not drawn")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(pairs)), 4))
    ax.bar([p[0] for p in pairs], [p[1] for p in pairs])
    ax.set_yscale("log")
    ax.set_ylabel("client peak memory of one local step (MB)")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, plt), f"client memory from {memory_json}: client_memory.png"


# ----------------------------------------------------------------------------- report


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        order = {m: i for i, m in enumerate(method_order({r["method"] for r in rows}))}
        for row in sorted(rows, key=lambda r: (_alpha_key(r["alpha"]), order[r["method"]],
                                                r["density"], r.get("seed", 0))):
            writer.writerow(row)
    return path


def selection_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per run that ran adaptive BN selection: the winner, the spread of the
    candidates' pooled losses, and the winner's margin over the runner-up with its 95%
    interval over clients (``fedprune.fedtiny.candidates.selection_margin``)."""
    out = []
    for r in sorted((r for r in rows if (r.get("selection") or {}).get("candidates")),
                    key=lambda r: (r["method"], _alpha_key(r["alpha"]), r["density"],
                                   r.get("seed", 0))):
        sel = r["selection"]
        losses = sel.get("weighted_losses") or []
        names = sel.get("candidates") or []
        text = (f"- {r['run']}: chose {sel.get('chosen', '?')} of {len(names)}"
                + (f" after round {sel['after_round']}" if sel.get("after_round") else ""))
        if losses:
            text += f"; pooled losses span {max(losses) - min(losses):.4f} nats"
        errors = sel.get("weighted_errors") or []
        if sel.get("select_on") == "error" and errors:
            text += (f"; chosen on error ({100 * min(errors):.1f}-{100 * max(errors):.1f}%, "
                     "margin in error rate)")
        margin = sel.get("margin")
        if margin and margin.get("rival") is not None and names:
            verdict = "confident" if margin.get("confident") else "not confident"
            text += (f"; margin over {names[margin['rival']]} {margin['margin']:+.4f} "
                     f"[{margin['low']:+.4f}, {margin['high']:+.4f}] over "
                     f"{margin['clients']} clients ({verdict})")
        out.append(text)
    return out


def machine_lines(rows: list[dict[str, Any]], sweep: dict[str, Any]) -> list[str]:
    """Where the runs ran, from each run's summary.json: one line if one machine ran them
    all, else each machine with its runs (cells from different CPUs differ as seeds do)."""
    by: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["run"]):
        by.setdefault(r.get("machine") or "", []).append(r["run"])
    if len(by) == 1 and "" not in by:
        return [f"Machine: {next(iter(by))} (every run)"]
    if set(by) <= {""}:  # no run recorded one (or no runs)
        # older sweeps kept one machine for the whole sweep, the latest invocation's
        latest = sweep.get("machine") or next(
            (inv["machine"] for inv in reversed(sweep.get("invocations", []))
             if inv.get("machine")), None)
        return [f"Machine: not recorded per run; the latest sweep invocation ran on {latest}"
                if latest else "Machine: not recorded"]
    lines = ["Machines (from each run's summary.json; cells from different CPUs are not "
             "reproducible across them):"]
    for machine, runs in sorted(by.items(), key=lambda kv: (kv[0] == "", kv[0])):
        name = machine or "not recorded (runs written before summaries named their machine)"
        lines.append(f"- {name}: {len(runs)} runs: {', '.join(runs)}")
    return lines


def markdown(grid: Grid, rows: list[dict[str, Any]], unfinished: list[dict[str, Any]],
             sweep: dict[str, Any], runs_dir: Path, notes: list[str]) -> str:
    lines = ["# Non-IID study: final test accuracy (%) by label skew and density", "",
             f"Written by `experiments/report_noniid.py` from `{runs_dir}` "
             f"({len(rows)} finished runs).", ""]
    commands = [inv["command"] for inv in sweep.get("invocations", [])]
    lines += [f"Sweep command: `{c}`" for c in dict.fromkeys(commands)] or \
        ["Sweep command: not recorded (no sweep.json beside the runs)."]
    lines += [""] + machine_lines(rows, sweep) + ["", f"Setting: {setting_line(rows)}", "",
              "Rows are methods, columns the target density; **bold**: the best sparse "
              f"baseline ({', '.join(BASELINES)}) in the column. Dense FedAvg has no mask and "
              f"is repeated in every column. {DASH}: no finished run.", ""]
    for alpha in grid.alphas:
        lines += [f"## {alpha_title(alpha)}", ""] + accuracy_table(grid, alpha) + [""]
        for density in grid.densities:
            lines += seed_table(grid, alpha, density)
    lines += ablation_table(grid)
    ref_alpha = REF_CELL[0] if REF_CELL[0] in grid.alphas else (grid.alphas or [""])[0]
    if ref_alpha:
        lines += [f"## Cost at {alpha_title(ref_alpha)}: achieved density / inference FLOPs "
                  "(% of dense) / bytes sent (% of dense FedAvg)", ""]
        lines += cost_table(grid, ref_alpha) + [""]
    chosen = selection_lines(rows)
    if chosen:
        lines += ["## Adaptive BN selection: what each run chose, and how sure", ""] + chosen + [
            ""]
    lines += ["## Plots and notes", ""] + [f"- {n}" for n in notes]
    if unfinished:
        lines += ["", "## Runs without a summary", ""] + [f"- {u['status']}" for u in unfinished]
    return "\n".join(lines) + "\n"


def build_report(runs_dir: Path | str, out_dir: Path | str,
                 memory_json: Path | str | None = MEMORY_JSON) -> dict[str, Any]:
    """Write results.csv, results.md and the plots for the runs under ``runs_dir``."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, unfinished = load_runs(runs_dir)
    sweep = read_sweep_info(out_dir)
    grid = Grid(rows, unfinished, sweep)
    paths = {"csv": write_csv(rows, out_dir / "results.csv"),
             "acc_vs_density": plot_acc_vs_density(grid, out_dir / "acc_vs_density.png")}
    cell = round_cell(grid)
    paths["acc_vs_round"] = plot_acc_vs_round(grid, runs_dir, cell, out_dir / "acc_vs_round.png")
    notes = ["acc_vs_density.png: final accuracy vs density, a subplot per alpha "
             "(dense dashed)",
             f"acc_vs_round.png: accuracy per round at {alpha_title(cell[0])}, density "
             f"{cell[1]:g}" + ("" if cell == REF_CELL else
                               f" (no run at alpha {REF_CELL[0]}, density {REF_CELL[1]:g})")]
    if memory_json is not None and Path(memory_json).exists():
        drawn, note = plot_client_memory(Path(memory_json), out_dir / "client_memory.png")
        if drawn:
            paths["client_memory"] = drawn
        notes.append(note)
    else:
        notes.append(f"client_memory.png: not drawn ({memory_json} does not exist)")
    md = markdown(grid, rows, unfinished, sweep, runs_dir, notes)
    paths["md"] = out_dir / "results.md"
    paths["md"].write_text(md)
    return {"rows": rows, "unfinished": unfinished, "paths": paths, "markdown": md}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="experiments/results/noniid/runs",
                        help="folder holding the <method>-a<alpha>-d<density> run dirs")
    parser.add_argument("--out", default="experiments/results/noniid",
                        help="where results.csv, results.md and the plots go")
    parser.add_argument("--memory", default=str(MEMORY_JSON),
                        help="client memory measurements (drawn when the file exists)")
    args = parser.parse_args(argv)
    report = build_report(args.runs, args.out, args.memory)
    print(report["markdown"])
    print(f"[report] wrote {', '.join(str(p) for p in report['paths'].values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
