"""Run the non-IID study: every method (table row) x label skew x density, then the table.

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/sweep_noniid.py
    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/sweep_noniid.py \
        --configs experiments/configs/noniid_full --out experiments/results/noniid_full

A method is one config, ``<configs>/<method>.yaml``. Each cell runs, in a subprocess and one
after another::

    python -m fedprune.cli run <configs>/<method>.yaml <partition> mask.density=D [--set ...]
        run.out_dir=<out>/runs run.name=<method>-a<alpha>-d<density>[-s<seed>]

where the partition is ``data.partitioner=iid`` for alpha ``iid`` and
``data.partitioner=dirichlet data.alpha=A`` otherwise. ``--seeds S ...`` (default 0) runs
every cell on each seed: ``data.seed=S mask.seed=S run.seed=S`` for every method of the
cell (the same partition and, where the method allows, the same initial weights: a paired
design); seed 0 keeps the unsuffixed run names. Cells run per alpha, per density, per seed,
so the first alphas and densities given get all their seeds first. Dense FedAvg
(``method.init=dense`` of the ``fixed`` method) has no density: it runs once per alpha (and
seed) as ``d1.0``. ``reinit`` rows (the
random-reinit control) take ``method.file`` from the finished ``fedtiny`` run of the same cell
(``reinit_vgg11`` from ``fedtiny_vgg11``), so cells run in the order of
``report_noniid.METHODS``. With a rounds override, the gates' ``method.rounds`` keeps its share of
``fed.rounds``.

Resume: a cell whose run dir has a summary.json with the configured rounds and the same
config is skipped. A failing cell leaves ``<run>/error.log`` (command, exit status, stderr
tail) and the sweep goes on. After every cell ``report_noniid.build_report`` rewrites
``<out>/results.{csv,md}`` and the plots; ``<out>/sweep.json`` records the command and
the machine for them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedprune.config import ConfigError, ExperimentConfig, load_config, to_flat_dict
from fedprune.machine import describe_machine
from report_noniid import build_report, cell_name, method_order, split_method

REPO = Path(__file__).resolve().parent.parent
MASK_FROM = {"reinit": "fedtiny"}  # row -> row whose final mask it trains from scratch
IGNORED_KEYS = ("run.out_dir", "run.name")  # where a run lives is not what it computed
TAIL_LINES = 60


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a method's config at one alpha and density."""

    method: str
    alpha: str
    density: str  # as given on the command line; "1.0" for density-independent rows
    config: Path
    overrides: tuple[str, ...]
    mask_from: str = ""  # run name whose mask.safetensors this cell loads
    seed: int = 0

    @property
    def name(self) -> str:
        return cell_name(self.method, self.alpha, self.density, self.seed)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fedprune.cli", "run", str(self.config),
                *self.overrides]


# ----------------------------------------------------------------------------- planning


def partition_overrides(alpha: str) -> list[str]:
    if alpha == "iid":
        return ["data.partitioner=iid"]
    return ["data.partitioner=dirichlet", f"data.alpha={alpha}"]


def set_value(sets: list[str], key: str) -> str | None:
    """The last ``key=value`` among the --set overrides, or None."""
    values = [s.split("=", 1)[1] for s in sets if s.split("=", 1)[0] == key]
    return values[-1] if values else None


def rounds_overrides(base: ExperimentConfig, rounds: int | None, sets: list[str]) -> list[str]:
    """fed.rounds from --rounds; the gates method's rounds scaled to keep their share."""
    out = [f"fed.rounds={rounds}"] if rounds else []
    total = rounds or int(set_value(sets, "fed.rounds") or base.fed.rounds)
    if (base.method.name == "gates" and total != base.fed.rounds
            and set_value(sets, "method.rounds") is None):
        share = round(total * base.method.rounds / base.fed.rounds)
        out.append(f"method.rounds={max(1, min(share, total - 1))}")
    return out


def is_density_free(base: ExperimentConfig) -> bool:
    """Dense FedAvg: no mask at all, so one run per alpha covers every density."""
    return base.method.name == "fixed" and base.method.init == "dense"


def seed_overrides(seed: int) -> list[str]:
    """One seed for everything seeded: the partition, the mask choices, the weights."""
    return [f"data.seed={seed}", f"mask.seed={seed}", f"run.seed={seed}"]


def plan(methods: list[str], alphas: list[str], densities: list[str], configs: Path,
         out: Path, sets: list[str], rounds: int | None, seeds: list[int] = (0,)
         ) -> list[Cell]:
    """Cells in run order: per alpha, per density, per seed, methods in dependency order."""
    bases = {m: load_config(str(configs / f"{m}.yaml")) for m in methods}
    runs = out.resolve() / "runs"
    cells = []
    for alpha in alphas:
        for i, density in enumerate(densities):
            for seed in seeds:
                for method in methods:
                    base = bases[method]
                    if is_density_free(base) and i > 0:
                        continue
                    cells.append(_cell(method, base, alpha, density, seed, configs, runs,
                                       sets, rounds))
    return cells


def _cell(method: str, base: ExperimentConfig, alpha: str, density: str, seed: int,
          configs: Path, runs: Path, sets: list[str], rounds: int | None) -> Cell:
    free = is_density_free(base)
    d = "1.0" if free else density
    overrides = partition_overrides(alpha) + ([] if free else [f"mask.density={d}"])
    source = MASK_FROM.get(split_method(method)[0])
    mask_from = ""
    if source:
        mask_from = cell_name(source + split_method(method)[1], alpha, d, seed)
        overrides.append(f"method.file={runs / mask_from / 'mask.safetensors'}")
    overrides += list(sets) + rounds_overrides(base, rounds, sets)
    overrides += seed_overrides(seed) if seed else []  # seed 0: the configs' own (all 0)
    overrides += [f"run.out_dir={runs}", f"run.name={cell_name(method, alpha, d, seed)}"]
    return Cell(method, alpha, d, (configs / f"{method}.yaml").resolve(), tuple(overrides),
                mask_from, seed)


def done_reason(cell: Cell, run_dir: Path) -> str | None:
    """Why the cell counts as finished (resume), or None when it must run."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        expected = to_flat_dict(load_config(str(cell.config), list(cell.overrides)))
    except (ConfigError, json.JSONDecodeError, OSError):
        return None
    if summary.get("rounds") != expected["fed.rounds"]:
        return None
    recorded = summary.get("config", {})
    if any(not _same(k, recorded[k], v) for k, v in expected.items()
           if k in recorded and k not in IGNORED_KEYS):
        return None
    return f"finished: summary.json with {summary['rounds']} rounds"


def _same(key: str, recorded: object, expected: object) -> bool:
    """Equal config values; method.file compared as a path (a row's own run uses a relative
    one, the sweep an absolute one)."""
    if key == "method.file" and recorded and expected:
        return (REPO / str(recorded)).resolve() == (REPO / str(expected)).resolve()
    return recorded == expected


# ----------------------------------------------------------------------------- running


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    shared = REPO.parent / "shared" / "data"
    if "FEDPRUNE_DATA_ROOT" not in env and shared.is_dir():
        env["FEDPRUNE_DATA_ROOT"] = str(shared)
    return env


def run_cell(cell: Cell, run_dir: Path, timeout: float | None) -> str | None:
    """Run one cell in its own process group; None on success, else the reason."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "metrics.jsonl", "error.log"):
        (run_dir / stale).unlink(missing_ok=True)
    if cell.mask_from and not (run_dir.parent / cell.mask_from / "summary.json").exists():
        return _fail(cell, run_dir, None, f"mask source {cell.mask_from} has not finished "
                                          "(no summary.json): run its row first")
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cell.command(), stdout=out, stderr=err, cwd=REPO,
                                env=child_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return _fail(cell, run_dir, None, f"timed out after {timeout:.0f} s")
        except BaseException:
            _kill_group(proc)
            raise
    if rc != 0:
        return _fail(cell, run_dir, rc, f"exit status {rc}")
    if not (run_dir / "summary.json").exists():
        return _fail(cell, run_dir, rc, "exit status 0 but no summary.json")
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    """End the cell's process and what it started (Ray workers): its own group only."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _fail(cell: Cell, run_dir: Path, rc: int | None, reason: str) -> str:
    """Write error.log: the command, the reason, then the stderr tail (its last line is
    usually the exception, which results.md quotes)."""
    stderr = run_dir / "stderr.log"
    tail = stderr.read_text(errors="replace").splitlines()[-TAIL_LINES:] if stderr.exists() \
        else []
    head = [f"command: {shlex.join(cell.command())}", f"exit status: {rc}", f"failed: {reason}"]
    body = [f"stderr (last {TAIL_LINES} lines of stderr.log):", *tail] if tail else []
    (run_dir / "error.log").write_text("\n".join(head + body) + "\n")
    return reason


def record_sweep(out: Path, argv: list[str], methods: list[str], alphas: list[str],
                 densities: list[str], seeds: list[int] = (0,)) -> None:
    """Append this invocation to <out>/sweep.json (what results.md quotes)."""
    path = out / "sweep.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info.setdefault("invocations", []).append(
        {"command": "experiments/sweep_noniid.py " + shlex.join(argv),
         "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe_machine()})
    # one sweep-wide "machine" was kept before: it named the latest machine for all runs
    info.pop("machine", None)
    info.update(methods=methods, alphas=alphas, densities=densities, seeds=list(seeds))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def sweep(cells: list[Cell], out: Path, timeout: float | None) -> list[str]:
    """Run the unfinished cells in order, rewriting the report after each; return failures."""
    runs = out.resolve() / "runs"
    todo = [c for c in cells if done_reason(c, runs / c.name) is None]
    print(f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already finished, "
          f"{len(todo)} to run; logs in {runs}/<cell>/stdout.log", flush=True)
    start, failures = time.time(), []
    for i, cell in enumerate(todo, 1):
        t0 = time.time()
        print(f"[sweep] {i}/{len(todo)} {cell.name} ...", flush=True)
        reason = run_cell(cell, runs / cell.name, timeout)
        took, elapsed = time.time() - t0, time.time() - start
        eta = elapsed / i * (len(todo) - i)
        if reason:
            failures.append(cell.name)
            status = f"FAILED ({reason}; see {runs / cell.name / 'error.log'})"
        else:
            acc = json.loads((runs / cell.name / "summary.json").read_text())["final_accuracy"]
            status = f"final accuracy {100 * acc:.2f}%"
        print(f"[sweep] {i}/{len(todo)} {cell.name}: {status} in {_clock(took)}; "
              f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}", flush=True)
        try:
            build_report(runs, out)
        except Exception as err:  # a report bug must not stop hours of runs
            print(f"[sweep] report failed: {err!r}", file=sys.stderr, flush=True)
    return failures


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=None,
                   help="rows to run (default: every <configs>/*.yaml); run in dependency "
                        "order whatever the order given")
    p.add_argument("--alphas", nargs="+", default=["0.1", "0.5", "1.0", "iid"],
                   help="Dirichlet concentrations, or iid")
    p.add_argument("--densities", nargs="+", default=["0.01", "0.05", "0.1"],
                   help="target densities of the sparse rows")
    p.add_argument("--configs", default="experiments/configs/noniid",
                   help="folder of <method>.yaml row configs")
    p.add_argument("--out", default="experiments/results/noniid",
                   help="results folder; runs go to <out>/runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds of every cell (data, mask and run seed; a paired design)")
    p.add_argument("--rounds", type=int, default=None, help="override fed.rounds of every row")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every cell (repeatable)")
    p.add_argument("--cell-timeout", type=float, default=0,
                   help="seconds before a cell is stopped and counted as failed (0 = none)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, configs: Path) -> list[str]:
    """Methods in dependency order; exits with a message on a bad value."""
    known = sorted(p.stem for p in configs.glob("*.yaml"))
    methods = args.methods or known
    missing = [m for m in methods if m not in known]
    if missing:
        raise SystemExit(f"sweep: no config for {missing} in {configs}; have {known}")
    for alpha in args.alphas:
        if alpha != "iid" and not _positive(alpha):
            raise SystemExit(f"sweep: --alphas {alpha!r}: need a number > 0 or iid")
    for d in args.densities:
        if not _positive(d) or float(d) > 1:
            raise SystemExit(f"sweep: --densities {d!r}: need a number in (0, 1]")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"sweep: --seeds {args.seeds}: need distinct seeds >= 0")
    seeded = [s for s in args.set if s.split("=", 1)[0] in ("data.seed", "mask.seed",
                                                               "run.seed")]
    if seeded and args.seeds != [0]:
        raise SystemExit(f"sweep: --set {seeded} and --seeds both set seeds: use --seeds")
    bad = [s for s in args.set if "=" not in s]
    if bad:
        raise SystemExit(f"sweep: --set {bad}: need key=value")
    return method_order(set(methods))


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configs, out = Path(args.configs), Path(args.out)
    methods = check_args(args, configs)
    try:
        cells = plan(methods, args.alphas, args.densities, configs, out, args.set, args.rounds,
                     args.seeds)
    except ConfigError as err:
        raise SystemExit(f"sweep: config error: {err}") from None
    if args.dry_run:
        for cell in cells:
            reason = done_reason(cell, out.resolve() / "runs" / cell.name)
            print(f"# skip {cell.name} ({reason})" if reason else shlex.join(cell.command()))
        return 0
    record_sweep(out, argv, methods, args.alphas, args.densities, args.seeds)
    failures = sweep(cells, out, args.cell_timeout or None)
    build_report(out.resolve() / "runs", out)
    print(f"[sweep] done; {len(failures)} failed{': ' + ', '.join(failures) if failures else ''}"
          f"; table in {out / 'results.md'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
