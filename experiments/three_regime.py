"""Three-regime model of pruning (Zhou et al., ICML 2023) on this CPU: the transition
centrally, then with a federated knob on the temperature axis.

    # central: one dense run checkpointed at several epochs (fewer epochs = hotter),
    # each checkpoint pruned to each density and retrained with two seeds
    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/three_regime.py \
        --out experiments/results/three_regime
    # federated: temperature axis = a federated knob (Dirichlet alpha here; or
    # train.local_epochs / data.num_clients), dense FedAvg then federated retraining
    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/three_regime.py \
        --federated data.alpha --values 0.1 1.0 iid --out experiments/results/three_regime_fed
    # local epochs as a temperature of dense FedAvg only; retraining keeps 1 local epoch
    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/three_regime.py \
        --federated train.local_epochs --values 1 2 4 --knob-in dense \
        --densities 0.02 0.05 0.1 0.4 --out experiments/results/three_regime_fed_epochs
    # ... with local steps held fixed: rounds x local epochs = 12 in every row
    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/three_regime.py \
        --federated train.local_epochs --values 1 2 4 --pair fed.rounds=12,6,3 \
        --knob-in dense --densities 0.02 0.05 0.1 0.4 \
        --out experiments/results/three_regime_fed_steps
    .venv/bin/python experiments/three_regime.py --out ... --table   # table + phase diagram

Protocol, scaled down from the reference code (github.com/YefanZhou/ThreeRegimePruning:
PreResNet-20, 160 + 160 epochs): ResNet-8 (width 16) on ``--train-subset`` CIFAR-10
training images. Dense: SGD (momentum 0.9, weight decay 1e-4, batch 64, lr ``--lr``, x0.1 at
50% and 75% of ``--dense-epochs``), checkpoints at ``--temps`` epochs; as in the reference
the temperatures are checkpoints of one run, so those before the first decay share its
learning rate. Pruning: one-shot, the same density in every conv layer by |w| (the
reference's ``unif`` L1 pruning; the classifier is not pruned). Retraining: the same
schedule restarted for ``--retrain-epochs`` with the mask fixed, once per ``--seeds``
(data order only: same checkpoint, same mask). Probes on the first ``--probe-images``
training images (no augmentation): the linear path between each pair of retrained models
(11 points, BN statistics recomputed on the probe images at every point), its training
error and loss; the reference's connectivity ``mc = (E0 + E1)/2 - E(t*)`` with t* the point
farthest from the ends' mean (negative = a barrier), and the loss barrier of
``fedprune.study.landscape``; linear CKA of the softmax outputs (the reference's choice).
Test accuracy on the CIFAR-10 test split (``--test-subset`` images; mean over the
retrained models). With ``--curve-epochs N`` each pair is also joined by a quadratic Bezier
curve (Garipov et al. 2018) whose bend trains N epochs on the training images
(``fedprune.study.landscape.fit_bend``), probed the same way: the reference code carries
Garipov's curve machinery but evaluates only the linear path (``init_linear``, no curve
training), so the curve is our addition. Central retrained models are kept in
``<out>/retrained`` (federated ones are the runs' own weights; both folders stay on the
machine that ran them, not in git), so curves added to finished cells by a rerun reuse
them; where they are missing the cell is retrained and all its probes are redone, so a row
never mixes models.

Federated cells run ``fedprune run`` (the ``dense`` row config of the non-IID study, 10
clients, 12 rounds of 1 local epoch unless ``--set`` says otherwise): dense FedAvg at each
knob value, then retraining from its final weights under ``method.init=uniform`` with the
classifier excluded, one run per seed (``run.seed``: client data order; same partition),
under the knob too unless ``--knob-in dense`` keeps it to the dense run. The
probes read the federation's pooled training images (the first ``--probe-images`` of its
training pool): a study-only view that no deployed server has.

Rows go to ``rows.jsonl`` as cells finish (a cell that gains a curve is appended again; the
last row of a cell counts); a rerun skips finished cells and keeps their seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from report_three_regime import applicable, write_report

REPO = Path(__file__).resolve().parent.parent
EXCLUDE = ["fc.weight"]  # the reference prunes every conv, not the classifier
FED_CONFIG = REPO / "experiments" / "configs" / "noniid" / "dense.yaml"


# ----------------------------------------------------------------------------- training


def fit(model, split, epochs: int, lr: float, seed: int, masks=None, on_epoch=None) -> None:
    """SGD with the reference's step schedule (x0.1 at 50% and 75% of ``epochs``); masked
    weights stay zero; ``on_epoch(epoch)`` after every epoch (1-based)."""
    from fedprune.data import make_loader
    from fedprune.masks import apply_masks_

    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    # a milestone at 0 would decay the rate before the first epoch (epochs=1)
    steps = [m for m in (epochs // 2, (3 * epochs) // 4) if m > 0]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, steps, 0.1)
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in make_loader(split, "cifar10", 64, shuffle=True, augment=True,
                                seed=seed * 1000 + epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if masks:
                apply_masks_(model, masks)
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch)


def new_model():
    from fedprune.config import ModelConfig
    from fedprune.models import build_model

    return build_model(ModelConfig(name="resnet8", width=16), "cifar10")


def load_model(path: Path):
    """A ResNet-8 holding the weights of ``path`` (a run's ``model.safetensors`` too)."""
    from fedprune.models.weights import load_weights_file

    model = new_model()
    load_weights_file(model, str(path), setting=str(path))
    return model


def save_model(model, path: Path) -> None:
    from safetensors.torch import save

    from fedprune.data.cache import atomic_write

    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write(path, lambda f: f.write(data))


def prune(model, density: float):
    from fedprune.masks import apply_masks_, init_masks

    masks = init_masks(model, density, "uniform", exclude=EXCLUDE)
    apply_masks_(model, masks)
    return masks


# ----------------------------------------------------------------------------- probes


def splits(args):
    """The training images and the probes' images: centrally the first ``--train-subset``
    and their first ``--probe-images``; federated, the federation's own pooled training
    images (``train_pool`` of the run config, the same for every knob value that leaves
    the pool alone) and their first ``--probe-images``, so the probes read training error."""
    from fedprune.data import ArraySplit, load_split

    full = load_split("cifar10", "train")
    images, labels = np.asarray(full.images), np.asarray(full.labels)
    if args.federated:
        from fedprune.config import load_config
        from fedprune.data.partitioning import train_pool

        cfg = load_config(str(FED_CONFIG), list(args.set))
        order = train_pool(len(labels), cfg.data)
    else:
        order = np.arange(args.train_subset)
    if args.probe_images > len(order):
        raise SystemExit(f"--probe-images {args.probe_images} exceeds the "
                         f"{len(order)} training images")
    train = ArraySplit(images[order], labels[order])
    probe = ArraySplit(images[order[:args.probe_images]], labels[order[:args.probe_images]])
    return train, probe


def mc_error(rows: list[dict]) -> float:
    """The reference's connectivity on training error: (E0 + E1)/2 - E(t*), t* the point
    farthest from the ends' mean (negative: the path rises above its ends)."""
    ends = (rows[0]["error"] + rows[-1]["error"]) / 2
    far = max(rows, key=lambda r: abs(ends - r["error"]))
    return ends - far["error"]


def probe_batches(probe):
    from fedprune.data import make_loader

    return make_loader(probe, "cifar10", 256, shuffle=False)


def path_probe(a, b, probe, points: int, bend=None, prefix: str = "") -> dict:
    """Training error and loss along the linear path (or, with ``bend``, the curve)."""
    from fedprune.study.landscape import barrier, path_losses
    from fedprune.train import evaluate

    def train_metrics(model) -> dict:
        got = evaluate(model, probe_batches(probe))
        return {"loss": got["loss"], "error": 1 - got["accuracy"]}

    rows = path_losses(a, b, train_metrics, points=points, bn_batches=lambda: probe_batches(
        probe), bend=bend)
    return {f"{prefix}mc_error": mc_error(rows), f"{prefix}loss_barrier": barrier(rows),
            f"{prefix}error_barrier": barrier(rows, "error"),
            f"{prefix}path_error": [r["error"] for r in rows]}


def probe_pair(a, b, probe, points: int) -> dict:
    from fedprune.study.landscape import linear_cka, outputs

    pa, pb = (F.softmax(outputs(m, probe_batches(probe)), 1) for m in (a, b))
    return {**path_probe(a, b, probe, points), "cka": linear_cka(pa, pb)}


def curve_pair(a, b, train, probe, points: int, epochs: int, lr: float) -> dict:
    """The Bezier curve between a pair, its bend trained for ``epochs`` on the training
    images (augmented, batch 64, as in retraining), probed like the linear path."""
    from fedprune.data import make_loader
    from fedprune.study.landscape import fit_bend

    def batches(epoch: int):
        return make_loader(train, "cifar10", 64, shuffle=True, augment=True,
                           seed=10 ** 6 + epoch)
    bend = fit_bend(a, b, batches, epochs, lr)
    return path_probe(a, b, probe, points, bend=bend, prefix="curve_")


def mean_over_pairs(pairs: list[dict]) -> dict:
    return {k: (np.mean([p[k] for p in pairs], axis=0).tolist() if k.endswith("path_error")
                else float(np.mean([p[k] for p in pairs]))) for k in pairs[0]}


def analyze(models: list, probe, points: int, test_subset: int = 0) -> dict:
    """Test accuracy of each model, and the probes averaged over every pair."""
    from fedprune.prune.cnn import accuracy_on_test

    pairs = [probe_pair(a, b, probe, points) for a, b in itertools.combinations(models, 2)]
    return {"test_accuracy": [accuracy_on_test(m, "cifar10", subset=test_subset)
                              for m in models], **mean_over_pairs(pairs)}


def curve_settings(args) -> dict:
    """What a row's curve depends on; a row whose record differs gets its curve redone."""
    return {"curve_epochs": args.curve_epochs, "curve_lr": args.lr}


def analyze_curves(models: list, train, probe, args) -> dict:
    """The curved-path probes, averaged over every pair, with the bend's epochs."""
    t0 = time.perf_counter()
    pairs = [curve_pair(a, b, train, probe, args.points, args.curve_epochs, args.lr)
             for a, b in itertools.combinations(models, 2)]
    return {**mean_over_pairs(pairs), **curve_settings(args),
            "curve_seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- cells


def central_dense(args, out: Path, train) -> dict[int, Path]:
    """Checkpoints of the one dense run at each ``--temps`` epoch (cached)."""
    paths = {e: out / "dense" / f"epoch-{e}.safetensors" for e in args.temps}
    if all(p.exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = new_model()

    def keep(epoch: int) -> None:
        if epoch in paths:
            save_model(model, paths[epoch])
            print(f"[three-regime] dense epoch {epoch} saved", flush=True)
    fit(model, train, args.dense_epochs, args.lr, seed=0, on_epoch=keep)
    return paths


def central_cell(args, checkpoint: Path, density: float, train, seeds: list[int],
                 keep: Path | None = None) -> tuple[list, bool]:
    """The checkpoint pruned to ``density`` and retrained once per seed; with ``keep`` (a
    folder) each retrained model is saved there and reused, so later probes (the curved
    path) need not retrain. Also says whether every model was reused."""
    models, reused = [], True
    for seed in seeds:
        path = keep / f"{checkpoint.stem}-d{density:g}-s{seed}.safetensors" if keep else None
        if path is not None and path.exists():
            models.append(load_model(path).eval())
            continue
        reused = False
        model = load_model(checkpoint)
        masks = prune(model, density)
        fit(model, train, args.retrain_epochs, args.lr, seed=seed, masks=masks)
        if path is not None:
            save_model(model, path)
        models.append(model.eval())
    return models, reused


def fed_run(args, out: Path, name: str, overrides: list[str]) -> Path:
    """One ``fedprune run`` (skipped when its summary exists); its final weights."""
    run = out / "runs" / name
    if not (run / "summary.json").exists():
        cmd = [sys.executable, "-m", "fedprune.cli", "run", str(FED_CONFIG), *overrides,
               *args.set, f"run.out_dir={out / 'runs'}", f"run.name={name}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"[three-regime] {name} failed ({done.returncode}):\n"
                             f"{done.stderr[-3000:]}")
    return run / "model.safetensors"


def knob_overrides(knob: str, value: str) -> list[str]:
    if knob == "data.alpha" and value == "iid":
        return ["data.partitioner=iid"]
    return [f"{knob}={value}"]


def varied(args, value: str) -> list[tuple[str, str]]:
    """(config key, value) of everything a row varies: the knob, and its ``--pair`` if any."""
    pairs = [(args.federated, value)]
    if args.pair:
        key, values = args.pair
        pairs.append((key, values[args.values.index(value)]))
    return pairs


def row_label(args, value) -> str:
    """A row's name in rows.jsonl and the table: the knob value, and its pair if any."""
    return ", ".join([str(value), *(f"{k}={v}" for k, v in varied(args, str(value))[1:])])


def fed_cell(args, out: Path, value: str, density: float, seeds: list[int]
             ) -> tuple[list, bool]:
    """The cell's retrained models, and whether every retraining run was reused."""
    knobs = varied(args, value)
    knob = knob_overrides(*knobs[0]) + [f"{k}={v}" for k, v in knobs[1:]]
    # run names carry every varied value, so grids with and without a pair never share runs
    tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in knobs)
    dense = fed_run(args, out, f"dense-{tag}", [*knob, "method.init=dense"])
    # "dense": the knob is a temperature of dense training only (the paper's reading);
    # every retraining then runs the same schedule, so cells differ only by their start
    retrain_knob = knob if args.knob_in == "both" else []
    names = [f"retrain-{tag}-d{density:g}-s{seed}" for seed in seeds]
    reused = all((out / "runs" / name / "summary.json").exists() for name in names)
    models = []
    for seed, name in zip(seeds, names):
        final = fed_run(args, out, name,
                        [*retrain_knob, "method.init=uniform", f"mask.density={density}",
                         f"mask.exclude=[{','.join(EXCLUDE)}]", f"model.init_file={dense}",
                         f"run.seed={seed}"])
        models.append(load_model(final).eval())
    return models, reused


# ----------------------------------------------------------------------------- sweep


def cell_key(axis: str, value, density: float) -> str:
    return f"{axis}={value}/d={density:g}"


def read_rows(path: Path) -> dict[str, dict]:
    from report_three_regime import load

    return {r["cell"]: r for r in load(path.parent)} if path.exists() else {}


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    curve = (f" curve mc {row['curve_mc_error']:+.3f} in {row['curve_seconds']} s"
             if "curve_mc_error" in row else "")
    print(f"[three-regime] {row['cell']}: test {100 * np.mean(row['test_accuracy']):.2f}% "
          f"mc {row['mc_error']:+.3f} cka {row['cka']:.3f} in {row['seconds']} s{curve}",
          flush=True)


def run_cells(args, out: Path) -> None:
    train, probe = splits(args)
    rows_path = out / "rows.jsonl"
    done = read_rows(rows_path)
    axis = args.federated or "epochs"
    values = args.values if args.federated else args.temps
    dense = None if args.federated else central_dense(args, out, train)
    for value, density in itertools.product(values, args.densities):
        label = row_label(args, value) if args.federated else str(value)
        key = cell_key(axis, label, density)
        # rows carry their own curve settings, so a later --curve-epochs adds or redoes
        # curves; a finished row keeps its own seeds, so its probes all read the same pairs
        old = done.get(key)
        wants_curve = args.curve_epochs and (old is None or any(
            old.get(k) != v for k, v in curve_settings(args).items()))
        if old is not None and not wants_curve:
            continue
        seeds = old["seeds"] if old else args.seeds
        t0 = time.perf_counter()
        models, reused = (fed_cell(args, out, str(value), density, seeds) if args.federated
                          else central_cell(args, dense[value], density, train, seeds,
                                            keep=out / "retrained"))
        if old is None or not reused:  # models made anew: every probe of the row is redone
            old = {"cell": key, "axis": axis, "value": label, "density": density,
                   "seeds": seeds, **analyze(models, probe, args.points, args.test_subset),
                   "seconds": round(time.perf_counter() - t0, 1)}
            append_row(rows_path, old)
        if wants_curve:  # appended again: the last row of a cell is the one that counts
            append_row(rows_path, {**old, **analyze_curves(models, train, probe, args)})


# Options a later invocation may change to extend a grid; every other option decides
# what a finished run or row means, so reusing them under another value would mix grids.
# ``pair`` is among them because run names and rows name the paired value too, and
# ``curve_epochs`` because each row records its own.
EXTENDABLE = ("out", "table", "temps", "values", "pair", "densities", "seeds",
              "curve_epochs")


def check_same_grid(old: dict, args, defaults: dict) -> None:
    """Refuse to resume ``out`` under settings that would reuse runs made differently."""
    for key, default in applicable({**defaults, "federated": args.federated}).items():
        if key in EXTENDABLE:
            continue
        # settings written before an option existed ran with its default
        then, now = old.get(key, default), getattr(args, key)
        if then != now:
            raise SystemExit(f"[three-regime] --{key.replace('_', '-')}={now!r}, but the runs "
                             f"in this --out were made with {then!r}; finished runs and rows "
                             f"would be reused under the wrong setting: pass another --out")


def record(args, out: Path, argv: list[str]) -> None:
    path = out / "setup.json"
    info = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    if "settings" in info:
        check_same_grid(info["settings"], args, vars(parse_args([])))
    info["invocations"].append({"command": "experiments/three_regime.py " + " ".join(argv),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    info["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "table")}
    info["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    path.write_text(json.dumps(info, indent=1))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results/three_regime")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--probe-images", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=0, help="test images (0: all 10,000)")
    p.add_argument("--dense-epochs", type=int, default=16)
    p.add_argument("--temps", type=int, nargs="+", default=[2, 4, 8, 16],
                   help="dense checkpoints (epochs) to prune: fewer epochs = hotter")
    p.add_argument("--densities", type=float, nargs="+",
                   default=[0.02, 0.05, 0.1, 0.2, 0.4])
    p.add_argument("--retrain-epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--points", type=int, default=11, help="points on each path")
    p.add_argument("--curve-epochs", type=int, default=0,
                   help="also probe the Bezier curve between each pair, its bend trained "
                        "this many epochs at --lr (0: linear path only); finished cells "
                        "gain it on a rerun")
    p.add_argument("--federated", default="",
                   help="config key of the federated knob (e.g. data.alpha, "
                        "train.local_epochs, data.num_clients); empty: central")
    p.add_argument("--values", nargs="+", default=[], help="the knob's values")
    p.add_argument("--knob-in", choices=["both", "dense"], default="both",
                   help="runs the knob applies to: dense training and retraining (e.g. "
                        "the federation's data, data.alpha), or dense training only (a "
                        "training temperature such as train.local_epochs)")
    p.add_argument("--pair", default="", metavar="KEY=V1,V2,...",
                   help="a second config key that changes with the knob, one value per "
                        "--values entry, in every run the knob reaches (e.g. "
                        "fed.rounds=12,6,3 with local epochs 1 2 4 holds local steps fixed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of every federated run (repeatable)")
    p.add_argument("--table", action="store_true", help="write the table and diagram only")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds: the probes compare retrained models, so give at least two")
    if args.federated and not args.values:
        p.error("--federated needs --values")
    if args.pair:
        key, _, values = args.pair.partition("=")
        args.pair = (key, values.split(","))
        if not args.federated or not key or len(args.pair[1]) != len(args.values):
            p.error(f"--pair {key}={values}: give KEY=V1,V2,... with one value per --values "
                    f"entry ({len(args.values)}) of a --federated grid")
    if not args.federated and (max(args.temps) > args.dense_epochs or min(args.temps) < 1):
        p.error(f"--temps {args.temps}: each must be in 1..--dense-epochs={args.dense_epochs}")
    if args.curve_epochs < 0:
        p.error(f"--curve-epochs {args.curve_epochs}: give 0 (no curve) or more")
    if any(not 0 < d <= 1 for d in args.densities):
        p.error(f"--densities {args.densities}: each must be in (0, 1]")
    if args.probe_images > args.train_subset:
        p.error("--probe-images must not exceed --train-subset")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        record(args, out, argv)
        run_cells(args, out)
    print(f"[three-regime] table: {write_report(out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
