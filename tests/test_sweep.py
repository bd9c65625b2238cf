"""Non-IID study harness: row configs, the sweep's commands and resume, the report's table.

No training here: the report reads hand-written summary.json / metrics.csv files.
"""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path

import pytest
from script_helpers import experiment_scripts

from fedprune.config import load_config, to_flat_dict

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIRS = [REPO / "experiments" / "configs" / "noniid",
               REPO / "experiments" / "configs" / "noniid_full"]
ROWS = ("dense", "random", "erk", "snip", "synflow", "prunefl", "feddst", "gates",
        "fedtiny", "reinit")
ALL_CONFIGS = sorted(p for d in CONFIG_DIRS for p in d.glob("*.yaml"))


@pytest.fixture(scope="module")
def tools():
    """The two experiment scripts, imported as the sweep imports them (script folder)."""
    return experiment_scripts("report_noniid", "sweep_noniid")


# ----------------------------------------------------------------------------- configs


def test_every_row_has_a_config_in_both_dirs():
    for d in CONFIG_DIRS:
        assert {p.stem for p in d.glob("*.yaml")} >= set(ROWS), d
    full = {p.stem for p in CONFIG_DIRS[1].glob("*.yaml")}
    assert {"dense_vgg11", "fedtiny_vgg11"} <= full


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_loads_and_defines_its_method(path):
    cfg = load_config(str(path))
    row, m = path.stem.split("_")[0], cfg.method
    if row == "dense":
        assert (m.name, m.init, cfg.mask.density) == ("fixed", "dense", 1.0)
    elif row in ("random", "erk"):
        assert (m.name, m.init, cfg.mask.density) == ("fixed", row, 0.05)
    elif row in ("snip", "synflow"):
        assert (m.name, m.consensus, cfg.mask.density) == (row, "average", 0.05)
    elif row in ("prunefl", "feddst"):
        assert (m.name, m.init) == (row, "erk")
        assert m.delta_r == (2 if cfg.fed.rounds == 12 else 10)
    elif row == "gates":
        assert m.name == "gates" and cfg.mask.density == 0.05
        assert m.rounds == cfg.fed.rounds // 3
    elif row == "fedtiny":
        assert (m.name, m.candidates) == ("fedtiny", 5)
        assert m.delta_r == (1 if cfg.fed.rounds == 12 else 5)
    elif row == "fedtinywarm":  # issue 14: selection after dense warm-up, many candidates
        assert (m.name, m.candidates, m.warmup_rounds, m.warmup_mask) == (
            "fedtiny", 16, 3, "dense")
    elif row == "fedtinyerr":  # the same, judged on error rate (issue 14, part 2)
        assert (m.name, m.candidates, m.warmup_rounds, m.select_on) == (
            "fedtiny", 16, 3, "error")
    elif row == "progonly":  # ablation: progressive pruning from ERK, no BN selection
        assert (m.name, m.candidates, m.delta_r, m.init) == ("fedtiny", 0, 1, "erk")
    elif row == "reinit":
        assert (m.name, m.init, cfg.run.seed) == ("fixed", "file", 1)
        assert m.file.endswith("fedtiny-a0.5-d0.05/mask.safetensors")
    else:
        pytest.fail(f"unknown row {path.stem}")
    assert (cfg.data.partitioner, cfg.data.alpha) == ("dirichlet", 0.5)
    assert cfg.run.name.startswith(path.stem + "-a0.5-d")


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_budget_and_header(path):
    cfg = load_config(str(path))
    text = path.read_text()
    assert f"fedprune run experiments/configs/{path.parent.name}/{path.name}" in text
    assert "experiments/sweep_noniid.py" in text
    assert "# result: (filled by report_noniid.py's table" in text
    if path.parent.name == "noniid":
        budget = (cfg.model.name, cfg.model.width, cfg.data.num_clients, cfg.data.train_subset,
                  cfg.data.test_subset, cfg.fed.rounds, cfg.fed.fraction_train)
        assert budget == ("resnet8", 16, 10, 5000, 2000, 12, 1.0)
    else:
        assert cfg.model.name == ("vgg11_bn" if "vgg11" in path.stem else "resnet18")
        budget = (cfg.model.width, cfg.data.num_clients, cfg.data.train_subset, cfg.fed.rounds,
                  cfg.fed.fraction_train, cfg.run.device)
        assert budget == (64, 100, 0, 300, 0.1, "auto")
        assert "Untested on a GPU" in text
    assert (cfg.train.local_epochs, cfg.train.batch_size, cfg.train.lr) == (1, 32, 0.05)


# ----------------------------------------------------------------------------- sweep


def _dry_run(tools, capsys, *args: str) -> list[str]:
    _, sweep = tools
    assert sweep.main(["--dry-run", *args]) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if ln]


def test_dry_run_commands_and_reinit_mask_file(tools, capsys, tmp_path):
    lines = _dry_run(tools, capsys, "--methods", "reinit", "fedtiny", "dense", "--alphas",
                     "0.5", "iid", "--densities", "0.01", "0.1", "--out", str(tmp_path),
                     "--set", "train.lr=0.1")
    runs = tmp_path.resolve() / "runs"
    cmds = [shlex.split(ln) for ln in lines]
    names = [c[-1].removeprefix("run.name=") for c in cmds]
    assert names == ["dense-a0.5-d1.0", "fedtiny-a0.5-d0.01", "reinit-a0.5-d0.01",
                     "fedtiny-a0.5-d0.1", "reinit-a0.5-d0.1", "dense-aiid-d1.0",
                     "fedtiny-aiid-d0.01", "reinit-aiid-d0.01", "fedtiny-aiid-d0.1",
                     "reinit-aiid-d0.1"]
    cfg_dir = REPO / "experiments" / "configs" / "noniid"
    assert cmds[2] == [sys.executable, "-m", "fedprune.cli", "run", str(cfg_dir / "reinit.yaml"),
                       "data.partitioner=dirichlet", "data.alpha=0.5", "mask.density=0.01",
                       f"method.file={runs / 'fedtiny-a0.5-d0.01' / 'mask.safetensors'}",
                       "train.lr=0.1", f"run.out_dir={runs}", "run.name=reinit-a0.5-d0.01"]
    assert cmds[0][4:] == [str(cfg_dir / "dense.yaml"), "data.partitioner=dirichlet",
                           "data.alpha=0.5", "train.lr=0.1", f"run.out_dir={runs}",
                           "run.name=dense-a0.5-d1.0"]
    assert cmds[6][5:7] == ["data.partitioner=iid", "mask.density=0.01"]
    assert f"method.file={runs / 'fedtiny-aiid-d0.1' / 'mask.safetensors'}" in cmds[9]


def test_seeds_pair_every_method_of_a_cell(tools, capsys, tmp_path):
    lines = _dry_run(tools, capsys, "--methods", "reinit", "fedtiny", "dense", "--alphas",
                     "0.1", "--densities", "0.01", "0.05", "--seeds", "0", "1",
                     "--out", str(tmp_path))
    runs = tmp_path.resolve() / "runs"
    cmds = [shlex.split(ln) for ln in lines]
    names = [c[-1].removeprefix("run.name=") for c in cmds]
    # per density, all seeds; dense once per seed; seed 0 keeps the old names
    assert names == ["dense-a0.1-d1.0", "fedtiny-a0.1-d0.01", "reinit-a0.1-d0.01",
                     "dense-a0.1-d1.0-s1", "fedtiny-a0.1-d0.01-s1", "reinit-a0.1-d0.01-s1",
                     "fedtiny-a0.1-d0.05", "reinit-a0.1-d0.05",
                     "fedtiny-a0.1-d0.05-s1", "reinit-a0.1-d0.05-s1"]
    seeded = ["data.seed=1", "mask.seed=1", "run.seed=1"]
    assert all(all(s in c for s in seeded) == n.endswith("-s1") for c, n in zip(cmds, names))
    assert f"method.file={runs / 'fedtiny-a0.1-d0.01-s1' / 'mask.safetensors'}" in cmds[5]
    with pytest.raises(SystemExit, match="distinct seeds"):
        tools[1].main(["--seeds", "1", "1", "--dry-run", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="use --seeds"):
        tools[1].main(["--seeds", "0", "1", "--set", "run.seed=3", "--dry-run",
                       "--out", str(tmp_path)])


def test_rounds_override_scales_gates(tools, capsys, tmp_path):
    lines = _dry_run(tools, capsys, "--methods", "gates", "--alphas", "0.1", "--densities",
                     "0.05", "--rounds", "6", "--out", str(tmp_path))
    assert "fed.rounds=6 method.rounds=2" in lines[0]  # 4 of 12 -> 2 of 6
    lines = _dry_run(tools, capsys, "--methods", "gates", "--alphas", "0.1", "--densities",
                     "0.05", "--set", "fed.rounds=2", "--out", str(tmp_path))
    assert lines[0].endswith(f"fed.rounds=2 method.rounds=1 run.out_dir={tmp_path.resolve()}"
                             "/runs run.name=gates-a0.1-d0.05")


def _fake_summary(tools, run: Path, cell_args: list[str], rounds: int, **changes) -> None:
    """A summary.json whose config is what the sweep would run, with ``changes``."""
    config = to_flat_dict(load_config(*cell_args))
    config.update(changes)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"rounds": rounds, "config": config,
                                                  "final_accuracy": 0.5}))


def test_resume_skips_only_matching_finished_cells(tools, capsys, tmp_path):
    runs = tmp_path.resolve() / "runs"
    erk = str(REPO / "experiments" / "configs" / "noniid" / "erk.yaml")
    common = ["data.partitioner=dirichlet", "data.alpha=0.5"]
    _fake_summary(tools, runs / "erk-a0.5-d0.05", [erk, common + ["mask.density=0.05"]], 12)
    _fake_summary(tools, runs / "erk-a0.5-d0.1", [erk, common + ["mask.density=0.1"]], 5)
    _fake_summary(tools, runs / "erk-a0.5-d0.01", [erk, common + ["mask.density=0.01"]], 12,
                  **{"train.lr": 0.2})
    lines = _dry_run(tools, capsys, "--methods", "erk", "--alphas", "0.5", "--out",
                     str(tmp_path))
    assert lines[0].endswith("run.name=erk-a0.5-d0.01")  # lr differs: runs again
    assert lines[1] == "# skip erk-a0.5-d0.05 (finished: summary.json with 12 rounds)"
    assert lines[2].endswith("run.name=erk-a0.5-d0.1")  # 5 of 12 rounds: runs again


def test_unknown_method_exits(tools, tmp_path):
    _, sweep = tools
    with pytest.raises(SystemExit, match="no config for"):
        sweep.main(["--dry-run", "--methods", "nope", "--out", str(tmp_path)])


def test_failing_cell_writes_error_log(tools, tmp_path):
    _, sweep = tools
    cell = sweep.Cell("reinit", "0.5", "0.1", tmp_path / "x.yaml", (),
                      mask_from="fedtiny-a0.5-d0.1")
    reason = sweep.run_cell(cell, tmp_path / "runs" / cell.name, timeout=None)
    assert "fedtiny-a0.5-d0.1 has not finished" in reason
    log = (tmp_path / "runs" / cell.name / "error.log").read_text()
    assert log.startswith("command: ") and "fedtiny-a0.5-d0.1 has not finished" in log


# ----------------------------------------------------------------------------- report

# (run name, final acc, best acc, achieved density, flops, bytes, wall, per-round accuracy)
FAKE = [
    ("dense-a0.5-d1.0", 0.6000, 0.6100, 1.0, 1.0, 1.0, 100.0, [0.1, 0.4, 0.6]),
    ("erk-a0.5-d0.05", 0.4000, 0.4200, 0.05, 0.08, 0.06, 50.0, [0.1, 0.3, 0.4]),
    ("random-a0.5-d0.05", 0.4500, 0.4500, 0.05, 0.05, 0.055, 40.0, [0.1, 0.35, 0.45]),
    ("fedtiny-a0.5-d0.05", 0.4321, 0.4400, 0.0512, 0.07, 0.07, 60.0, [0.1, 0.38, 0.4321]),
    ("erk-aiid-d0.1", 0.5500, 0.5600, 0.1, 0.12, 0.11, 55.0, [0.1, 0.5, 0.55]),
]


def _write_fake_runs(runs: Path) -> None:
    for name, final, best, dens, flops, sent, wall, curve in FAKE:
        run = runs / name
        run.mkdir(parents=True)
        config = {"model.name": "resnet8", "fed.rounds": len(curve) - 1}
        (run / "summary.json").write_text(json.dumps({
            "rounds": len(curve) - 1, "final_accuracy": final, "best_accuracy": best,
            "density": dens, "flops_vs_dense": flops, "bytes_vs_dense": sent,
            "wall_seconds": wall, "config": config}))
        with open(run / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "accuracy", "loss"])
            writer.writerows([r, a, 1.0] for r, a in enumerate(curve))
    failed = runs / "reinit-a0.5-d0.05"
    failed.mkdir()
    (failed / "error.log").write_text("command: x\nValueError: mask.init='file' unknown\n")


def test_build_report_csv_table_and_plots(tools, tmp_path):
    report, _ = tools
    runs, out = tmp_path / "runs", tmp_path / "out"
    _write_fake_runs(runs)
    result = report.build_report(runs, out, memory_json=tmp_path / "no-memory.json")

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["alpha"], r["density"]) for r in rows] == [
        ("dense", "0.5", "1.0"), ("random", "0.5", "0.05"), ("erk", "0.5", "0.05"),
        ("fedtiny", "0.5", "0.05"), ("erk", "iid", "0.1")]
    assert rows[3] == {"method": "fedtiny", "alpha": "0.5", "density": "0.05", "seed": "0",
                       "final_accuracy": "0.4321", "best_accuracy": "0.44",
                       "achieved_density": "0.0512", "flops_vs_dense": "0.07",
                       "bytes_vs_dense": "0.07", "wall_seconds": "60.0", "rounds": "2",
                       "run": "fedtiny-a0.5-d0.05", "machine": ""}

    md = (out / "results.md").read_text()
    assert md == result["markdown"]
    table_05 = md.split("## Dirichlet alpha = 0.5")[1].split("##")[0]
    assert "| method | density 0.05 | density 0.1 |" in table_05
    assert "| dense | 60.00 | 60.00 |" in table_05  # repeated in every column
    assert "| random | **45.00** | — |" in table_05  # best baseline, bold
    assert "| erk | 40.00 | — |" in table_05
    assert "| fedtiny | 43.21 | — |" in table_05
    assert "| reinit | — | — |" in table_05  # failed: a dash, listed below
    assert "fedtiny minus the best baseline: 0.05: -1.79 pp (vs random 45.00); 0.1: —" in table_05
    assert "fedtiny minus dense: 0.05: -16.79 pp; 0.1: —" in table_05
    table_iid = md.split("## IID")[1].split("##")[0]
    assert "| erk | — | **55.00** |" in table_iid
    assert "| dense | — | — |" in table_iid
    assert "`reinit-a0.5-d0.05`: failed" in md and "mask.init='file' unknown" in md
    assert "no-memory.json does not exist" in md

    for png in ("acc_vs_density.png", "acc_vs_round.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "client_memory.png").exists()
    assert "alpha = 0.5, density 0.05" in md  # acc_vs_round's cell


def _summary(run: Path, final: float) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "rounds": 2, "final_accuracy": final, "best_accuracy": final, "density": 0.05,
        "flops_vs_dense": 0.1, "bytes_vs_dense": 0.1, "wall_seconds": 1.0,
        "config": {"fed.rounds": 2}}))


def test_report_pairs_methods_over_seeds(tools, tmp_path):
    report, _ = tools
    runs = tmp_path / "runs"
    erk = [0.40, 0.50, 0.45]  # the seeds differ a lot; fedtiny is erk + 2 pp on each
    snip = [0.41, 0.46, 0.47]  # best mean? no: erk 45.0, snip 44.67 -> erk is the best
    for seed in range(3):
        _summary(runs / report.cell_name("erk", "0.5", "0.05", seed), erk[seed])
        _summary(runs / report.cell_name("snip", "0.5", "0.05", seed), snip[seed])
        _summary(runs / report.cell_name("fedtiny", "0.5", "0.05", seed),
                 erk[seed] + 0.02 + 0.001 * seed)
    assert report.cell_name("erk", "0.5", "0.05", 0) == "erk-a0.5-d0.05"  # seed 0: old names
    assert report.parse_cell_name("erk-a0.5-d0.05-s2") == ("erk", "0.5", 0.05, 2)
    md = report.build_report(runs, tmp_path / "out", memory_json=None)["markdown"]
    # erk: mean 45.00, sd 5 pp -> half-width 4.303 * 5 / sqrt(3) = 12.42 pp
    assert "| erk | **45.00 ± 12.42 (n=3)** |" in md
    # paired: differences 2.0, 2.1, 2.2 pp -> mean 2.10, sd 0.1, half-width 0.25
    assert "- fedtiny: 0.05: +2.10 pp [+1.85, +2.35] (n=3) vs erk" in md
    # snip - erk: +1, -4, +2 pp -> the interval contains zero
    assert "- snip: 0.05: -0.33 pp" in md and "(n=3, not distinguishable) vs erk" in md
    # the cell's own table: one column per seed, the best baseline in bold, no difference
    table = md.split("### Dirichlet alpha = 0.5, density 0.05: every seed")[1]
    assert "| method | seed 0 | seed 1 | seed 2 | mean ± 95% half-width | paired difference" \
        " to erk |" in table
    assert "| erk | 40.00 | 50.00 | 45.00 | **45.00 ± 12.42** | — |" in table
    # fedtiny 42.0, 52.1, 47.2: sd sqrt((5.1^2 + 5.0^2 + 0.1^2) / 2) = 5.0507 -> 12.55
    assert "| fedtiny | 42.00 | 52.10 | 47.20 | 47.10 ± 12.55 | +2.10 pp [+1.85, +2.35] (n=3) |" \
        in table
    # the ablations: fedtiny - erk over the common seeds (only comparisons both ran)
    ablations = md.split("## Ablations")[1].split("\n## ")[0]
    assert "| comparison | alpha 0.5, 0.05 |" in ablations
    assert "| fedtiny − erk | +2.10 [+1.85, +2.35] (n=3) |" in ablations
    assert "progonly" not in ablations and "dense" not in ablations


def test_report_lists_each_bn_selection_with_its_margin(tools):
    report, _ = tools
    sel = {"candidates": ["uniform", "erk", "global_magnitude"],
           "weighted_losses": [2.30, 2.25, 2.31], "chosen": "erk", "after_round": 3,
           "margin": {"rival": 0, "margin": 0.05, "low": -0.01, "high": 0.11, "clients": 10,
                      "confident": False}}
    rows = [{"method": "fedtinywarm", "alpha": "0.5", "density": 0.01, "seed": 1,
             "run": "fedtinywarm-a0.5-d0.01-s1", "selection": sel},
            {"method": "snip", "alpha": "0.5", "density": 0.01, "seed": 0, "run": "snip-x",
             "selection": {"method": "snip", "clients": 10}}]  # not a BN selection
    assert report.selection_lines(rows) == [
        "- fedtinywarm-a0.5-d0.01-s1: chose erk of 3 after round 3; pooled losses span "
        "0.0600 nats; margin over uniform +0.0500 [-0.0100, +0.1100] over 10 clients "
        "(not confident)"]
    on_error = dict(rows[0], selection=dict(sel, select_on="error",
                                            weighted_errors=[0.9, 0.7, 0.85]))
    assert "; chosen on error (70.0-90.0%, margin in error rate); margin over uniform" in \
        report.selection_lines([on_error])[0]


def test_report_uses_sweep_record_for_command_machine_and_grid(tools, tmp_path):
    report, _ = tools
    runs, out = tmp_path / "runs", tmp_path / "out"
    _write_fake_runs(runs)
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({
        "invocations": [{"command": "experiments/sweep_noniid.py --rounds 2"}],
        "machine": "x86_64, test CPU, 2 cores", "methods": ["dense", "erk", "snip"],
        "alphas": ["0.1", "0.5"], "densities": ["0.01", "0.05"]}))
    md = report.build_report(runs, out, memory_json=None)["markdown"]
    assert "Sweep command: `experiments/sweep_noniid.py --rounds 2`" in md
    # runs without a machine in their summary: the sweep's latest machine, said as such
    assert "Machine: not recorded per run; the latest sweep invocation ran on x86_64, test " \
        "CPU, 2 cores" in md
    table_01 = md.split("## Dirichlet alpha = 0.1")[1].split("##")[0]
    assert "| method | density 0.01 | density 0.05 | density 0.1 |" in table_01
    assert "| snip | — | — | — |" in table_01


def test_report_names_each_runs_machine_and_sweep_records_it_per_invocation(tools, tmp_path):
    report, sweep = tools
    runs, out = tmp_path / "runs", tmp_path / "out"
    _write_fake_runs(runs)
    for name, machine in (("erk-a0.5-d0.05", "CPU A"), ("random-a0.5-d0.05", "CPU A"),
                          ("dense-a0.5-d1.0", "CPU B")):
        path = runs / name / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "machine": machine}))
    md = report.build_report(runs, out, memory_json=None)["markdown"]
    assert "- CPU A: 2 runs: erk-a0.5-d0.05, random-a0.5-d0.05" in md
    assert "- CPU B: 1 runs: dense-a0.5-d1.0" in md
    assert "- not recorded (runs written before summaries named their machine): 2 runs: " \
        "erk-aiid-d0.1, fedtiny-a0.5-d0.05" in md
    with open(out / "results.csv", newline="") as f:
        assert {r["run"]: r["machine"] for r in csv.DictReader(f)}["dense-a0.5-d1.0"] == "CPU B"

    # an old sweep.json with one sweep-wide machine: each invocation now carries its own
    (out / "sweep.json").write_text(json.dumps({"invocations": [{"command": "old"}],
                                                "machine": "CPU A"}))
    sweep.record_sweep(out, ["--seeds", "1"], ["erk"], ["0.5"], ["0.05"], [1])
    info = json.loads((out / "sweep.json").read_text())
    assert "machine" not in info and "machine" not in info["invocations"][0]
    assert info["invocations"][1]["machine"] == sweep.describe_machine()


def test_memory_plot_drawn_or_skipped(tools, tmp_path):
    report, _ = tools
    good = tmp_path / "memory.json"  # bench_memory.py's layout
    good.write_text(json.dumps({"command": "x", "rows": [
        {"model": "resnet8", "density": 1.0, "method": "dense", "params_bytes": 7,
         "step_peak_bytes": 3_000_000, "step_rss_bytes": None},
        {"model": "resnet8", "density": 0.05, "method": "fedtiny", "params_bytes": 7,
         "step_peak_bytes": 1_500_000, "step_rss_bytes": 9}]}))
    assert report.parse_memory(json.loads(good.read_text())) == [
        ("dense resnet8 d=1", 3.0), ("fedtiny resnet8 d=0.05", 1.5)]
    assert report.parse_memory([{"name": "a", "mem_mb": 4}]) == [("a", 4.0)]
    path, note = report.plot_client_memory(good, tmp_path / "client_memory.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    for odd in ({"whatever": 1}, {"rows": [{"method": "x", "seconds": 2}]}, [1, 2]):
        (tmp_path / "odd.json").write_text(json.dumps(odd))
        path, note = report.plot_client_memory(tmp_path / "odd.json", tmp_path / "odd.png")
        assert path is None and "format this report does not know" in note
    assert not (tmp_path / "odd.png").exists()


def test_resume_compares_mask_file_as_a_path(tools):
    _, sweep = tools
    rel = "experiments/results/noniid/runs/fedtiny-a0.5-d0.05/mask.safetensors"
    assert sweep._same("method.file", rel, str(REPO / rel))
    assert not sweep._same("method.file", rel, str(REPO / rel.replace("d0.05", "d0.1")))
    assert not sweep._same("train.lr", 0.05, 0.1)
