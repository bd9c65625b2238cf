"""The three-regime study scripts: the reference's connectivity, regime rules, the table,
and a tiny central sweep end to end (real CIFAR-10 images)."""

from __future__ import annotations

import json

import pytest
import torch
from script_helpers import experiment_scripts


@pytest.fixture(scope="module")
def scripts():
    return experiment_scripts("three_regime", "report_three_regime")


def _path(errors):
    return [{"t": i / (len(errors) - 1), "error": e} for i, e in enumerate(errors)]


def test_mc_error_follows_the_reference_sign(scripts):
    tr, _ = scripts
    # ends' mean 0.15; the farthest point 0.5 rises 0.35 above it: a barrier, negative
    assert tr.mc_error(_path([0.1, 0.5, 0.2])) == pytest.approx(-0.35)
    # a path that dips below its ends is "better than connected": positive
    assert tr.mc_error(_path([0.3, 0.1, 0.3])) == pytest.approx(0.2)
    assert tr.mc_error(_path([0.2, 0.2])) == 0.0


def _row(value, density, acc, mc, cka):
    return {"cell": f"epochs={value}/d={density:g}", "axis": "epochs", "value": str(value),
            "density": density, "test_accuracy": [acc, acc], "mc_error": mc, "cka": cka}


ROWS = [_row(16, 0.05, 0.40, -0.20, 0.80), _row(2, 0.05, 0.50, -0.01, 0.90),
        _row(16, 0.4, 0.70, -0.02, 0.97), _row(2, 0.4, 0.60, 0.00, 0.95)]


def test_regimes_by_barrier_then_relative_similarity(scripts):
    _, rep = scripts
    names = rep.regimes(ROWS)
    # connected CKAs 0.90, 0.97, 0.95: median 0.95
    assert names == {"epochs=16/d=0.05": "I", "epochs=2/d=0.05": "II-A",
                     "epochs=16/d=0.4": "II-B", "epochs=2/d=0.4": "II-B"}


def test_table_orders_hottest_first_and_names_the_best_temperature(scripts, tmp_path):
    _, rep = scripts
    assert rep.axes(ROWS) == ("epochs", ["2", "16"], [0.05, 0.4])
    lines = rep.transitions(ROWS)
    assert lines == ["- density 0.05: best epochs=2 (50.00%; spread over epochs 10.00 points)",
                     "- density 0.4: best epochs=16 (70.00%; spread over epochs 10.00 points)"]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    text = rep.write_report(tmp_path).read_text()
    assert "| 2 | 50.00 / -0.010 / 0.900 / II-A | 60.00 / +0.000 / 0.950 / II-B |" in text
    assert (tmp_path / "phase.png").stat().st_size > 1000


def test_bad_arguments_are_named(scripts):
    tr, _ = scripts
    with pytest.raises(SystemExit):
        tr.parse_args(["--seeds", "1"])
    with pytest.raises(SystemExit):
        tr.parse_args(["--temps", "20"])
    with pytest.raises(SystemExit):
        tr.parse_args(["--federated", "data.alpha"])
    assert tr.knob_overrides("data.alpha", "iid") == ["data.partitioner=iid"]
    assert tr.knob_overrides("train.local_epochs", "3") == ["train.local_epochs=3"]


@pytest.fixture
def fed_calls(scripts, tmp_path, monkeypatch):
    """Run name -> overrides of every ``fedprune run`` a federated cell asks for (none runs)."""
    tr, _ = scripts
    calls = {}

    def fake_run(args, out, name, overrides):
        calls[name] = overrides
        return tmp_path / name
    monkeypatch.setattr(tr, "fed_run", fake_run)
    monkeypatch.setattr(tr, "load_model", lambda path: torch.nn.Identity())
    return calls


@pytest.mark.parametrize("knob_in, retrain_has_knob", [("both", True), ("dense", False)])
def test_knob_in_decides_which_runs_get_the_knob(scripts, tmp_path, fed_calls,
                                                 knob_in, retrain_has_knob):
    # a training temperature (local epochs) must not leak into the retraining when the
    # study says it is a knob of dense training only; a data knob (alpha) goes to both
    tr, _ = scripts
    calls = fed_calls
    args = tr.parse_args(["--federated", "train.local_epochs", "--values", "4",
                          "--knob-in", knob_in])
    models, reused = tr.fed_cell(args, tmp_path, "4", 0.05, args.seeds)
    assert len(models) == 2 and not reused  # no summaries in tmp_path: runs made here
    assert calls["dense-local_epochs4"] == ["train.local_epochs=4", "method.init=dense"]
    for seed in (1, 2):
        retrain = calls[f"retrain-local_epochs4-d0.05-s{seed}"]
        assert ("train.local_epochs=4" in retrain) is retrain_has_knob
        assert f"model.init_file={tmp_path / 'dense-local_epochs4'}" in retrain
        assert f"run.seed={seed}" in retrain and "mask.density=0.05" in retrain
    with pytest.raises(SystemExit):
        tr.parse_args(["--federated", "data.alpha", "--values", "1", "--knob-in", "x"])


def test_pair_changes_with_the_knob_and_names_the_runs(scripts, tmp_path, fed_calls):
    # holding local steps fixed: 4 local epochs go with 3 rounds, in the dense run only
    tr, _ = scripts
    calls = fed_calls
    args = tr.parse_args(["--federated", "train.local_epochs", "--values", "1", "2", "4",
                          "--pair", "fed.rounds=12,6,3", "--knob-in", "dense"])
    tr.fed_cell(args, tmp_path, "4", 0.05, args.seeds)
    assert calls["dense-local_epochs4-rounds3"] == ["train.local_epochs=4", "fed.rounds=3",
                                                    "method.init=dense"]
    retrain = calls["retrain-local_epochs4-rounds3-d0.05-s1"]
    assert not any(o.startswith(("fed.rounds", "train.local_epochs")) for o in retrain)
    assert tr.row_label(args, "2") == "2, fed.rounds=6"
    plain = tr.parse_args(["--federated", "data.alpha", "--values", "iid"])
    assert tr.row_label(plain, "iid") == "iid"
    for bad in (["--values", "1", "2", "--pair", "fed.rounds=12"],  # one value short
                ["--values", "1", "--pair", "=12"]):  # no key
        with pytest.raises(SystemExit):
            tr.parse_args(["--federated", "train.local_epochs", *bad])
    with pytest.raises(SystemExit):  # a central grid has no knob to pair with
        tr.parse_args(["--pair", "fed.rounds=12"])


def test_resuming_under_another_setting_is_refused(scripts, tmp_path):
    # retrain run names do not carry --knob-in or --retrain-epochs, so resuming an --out
    # under another value would silently reuse the other grid's runs
    tr, _ = scripts
    base = ["--federated", "train.local_epochs", "--values", "1", "--out", str(tmp_path)]
    tr.record(tr.parse_args(base + ["--knob-in", "dense"]), tmp_path, base)
    # extending the grid (more values, densities, seeds) is what resuming is for
    more = base + ["--knob-in", "dense", "--values", "1", "2", "--seeds", "1", "2", "3"]
    tr.record(tr.parse_args(more), tmp_path, more)
    assert len(json.loads((tmp_path / "setup.json").read_text())["invocations"]) == 2
    with pytest.raises(SystemExit, match="--knob-in='both'.*'dense'"):
        tr.record(tr.parse_args(base), tmp_path, base)
    with pytest.raises(SystemExit, match="--probe-images=500"):
        bad = base + ["--knob-in", "dense", "--probe-images", "500"]
        tr.record(tr.parse_args(bad), tmp_path, bad)
    # a central-only option never reaches a federated run: no reason to refuse
    lr = base + ["--knob-in", "dense", "--lr", "0.1"]
    tr.record(tr.parse_args(lr), tmp_path, lr)
    # setup.json written before --knob-in existed: those runs used its default, "both"
    info = json.loads((tmp_path / "setup.json").read_text())
    del info["settings"]["knob_in"]
    (tmp_path / "setup.json").write_text(json.dumps(info))
    tr.record(tr.parse_args(base), tmp_path, base)


@pytest.mark.slow
def test_tiny_central_sweep_keeps_masks_and_resumes(scripts, tmp_path, monkeypatch):
    tr, rep = scripts
    args = ["--out", str(tmp_path), "--train-subset", "256", "--probe-images", "128",
            "--dense-epochs", "2", "--temps", "1", "2", "--densities", "0.3",
            "--retrain-epochs", "1", "--points", "3", "--test-subset", "200"]
    parsed = tr.parse_args(args)
    train, _ = tr.splits(parsed)
    dense = tr.central_dense(parsed, tmp_path, train)
    models, reused = tr.central_cell(parsed, dense[2], 0.3, train, parsed.seeds)
    assert not reused  # no folder to keep them in: trained here
    for model in models:  # retraining kept the one-shot mask: 30% of every conv's weights
        for name, w in model.named_parameters():
            if name.endswith("weight") and w.dim() == 4:
                assert float((w != 0).float().mean()) == pytest.approx(0.3, abs=0.01), name
    assert not torch.equal(models[0].fc.weight, models[1].fc.weight)  # different seeds
    assert tr.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == ["epochs=1/d=0.3", "epochs=2/d=0.3"]
    for r in rows:
        assert 0 <= r["cka"] <= 1 + 1e-9 and len(r["path_error"]) == 3
        assert r["mc_error"] <= 0.5 and len(r["test_accuracy"]) == 2
    tr.main(args)  # a rerun skips finished cells
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    assert "epochs \\ density" in (tmp_path / "results.md").read_text()
    # the curved path joins finished cells on a rerun, from the saved retrained models
    saved = sorted((tmp_path / "retrained").glob("*.safetensors"))
    assert len(saved) == 4
    stamps = [p.stat().st_mtime_ns for p in saved]
    tr.main(args + ["--curve-epochs", "1", "--densities", "0.3"])
    assert [p.stat().st_mtime_ns for p in saved] == stamps  # not retrained
    rows = rep.load(tmp_path)
    assert [r["cell"] for r in rows] == ["epochs=1/d=0.3", "epochs=2/d=0.3"]
    for r in rows:
        assert r["curve_epochs"] == 1 and len(r["curve_path_error"]) == 3
        # both paths share their ends: only the middle differs
        assert r["curve_path_error"][0] == pytest.approx(r["path_error"][0], abs=1e-6)
        assert r["curve_path_error"][-1] == pytest.approx(r["path_error"][-1], abs=1e-6)
    assert "mc curve" in (tmp_path / "results.md").read_text()
    tr.main(args + ["--curve-epochs", "1"])  # curves done: nothing to add
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4
    # a missing model is retrained, and then the whole row is redone, not only its curve;
    # finished rows keep their seeds (no seed-3 model just for a curve)
    saved[0].unlink()
    tr.main(args + ["--curve-epochs", "2", "--seeds", "1", "2", "3"])
    lines = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["cell"], "curve_epochs" in r) for r in lines[4:]] == [
        ("epochs=1/d=0.3", False), ("epochs=1/d=0.3", True), ("epochs=2/d=0.3", True)]
    assert all(r["seeds"] == [1, 2] for r in rep.load(tmp_path))
    assert saved[0].exists() and not list((tmp_path / "retrained").glob("*-s3.*"))


def test_federated_probes_read_the_federations_training_images(scripts, data_root):
    # the federated runs train on a seeded random subset of CIFAR-10 (train_pool), not on
    # its first images: the probes must read that pool, or "training error" is test error
    import numpy as np

    from fedprune.config import load_config
    from fedprune.data import load_split
    from fedprune.data.partitioning import train_pool

    tr, _ = scripts
    parsed = tr.parse_args(["--federated", "data.alpha", "--values", "0.1",
                            "--probe-images", "64", "--set", "data.train_subset=300"])
    train, probe = tr.splits(parsed)
    full = load_split("cifar10", "train")
    pool = train_pool(len(full.labels), load_config(str(tr.FED_CONFIG),
                                                    ["data.train_subset=300"]).data)
    assert len(train.labels) == 300 and len(probe.labels) == 64
    assert not np.array_equal(pool[:64], np.arange(64))  # a real subset, not the first
    assert np.array_equal(np.asarray(probe.labels), np.asarray(full.labels)[pool[:64]])
    assert np.array_equal(np.asarray(train.images), np.asarray(full.images)[pool])


def _grid(path, seeds, accs, retrain_epochs=16):
    # a finished central grid at density 0.02: one row per temperature, one pair of seeds
    path.mkdir()
    settings = {"dense_epochs": 16, "retrain_epochs": retrain_epochs, "seeds": seeds,
                "federated": "", "train_subset": 10000}
    (path / "setup.json").write_text(json.dumps({"settings": settings}))
    rows = [{"cell": f"epochs={t}/d=0.02", "axis": "epochs", "value": t, "density": 0.02,
             "seeds": seeds, "test_accuracy": a, "mc_error": -0.01, "cka": 0.9}
            for t, a in accs.items()]
    (path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_pooled_seed_table_by_hand(scripts, tmp_path):
    # epochs 2: 40, 42 | 44, 46 (mean 43, the best); epochs 16: 38, 41 | 40, 45 (mean 41,
    # sd sqrt(26/3), half-width t(3) 3.182 * sqrt(26/12) = 4.684); 16 - 2 per seed:
    # -2, -1, -4, -1 (mean -2, sd sqrt(2), half-width 3.182 * sqrt(2/4) = 2.250): nd
    _, rep = scripts
    a = _grid(tmp_path / "a", [1, 2], {"2": [0.40, 0.42], "16": [0.38, 0.41]})
    b = _grid(tmp_path / "b", [3, 4], {"2": [0.44, 0.46], "16": [0.40, 0.45]})
    text = rep.write_pooled(tmp_path / "pooled.md", [a, b]).read_text()
    assert "| 2 | 40.00, 42.00, 44.00, 46.00 | 43.00 [" in text
    assert ("| 16 | 38.00, 41.00, 40.00, 45.00 | 41.00 [36.32, 45.68] | -2.00 [-4.25, +0.25] "
            "nd |") in text
    other = _grid(tmp_path / "c", [5, 6], {"2": [0.4, 0.4]}, retrain_epochs=8)
    with pytest.raises(SystemExit, match="retrain_epochs"):
        rep.write_pooled(tmp_path / "x.md", [a, other])
    with pytest.raises(SystemExit, match="seed 1 of epochs=2/d=0.02 appears twice"):
        rep.write_pooled(tmp_path / "x.md", [a, a])
