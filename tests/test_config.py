"""Config loading: YAML + overrides merge, and each kind of bad input names the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedprune.config import (RUN_CONFIG_KEYS, ConfigError, ExperimentConfig, config_dir,
                             from_run_config, from_yaml, load_config, to_yaml,
                             with_absolute_paths)


def test_defaults_yaml_and_overrides_merge_in_order():
    cfg = load_config("default", ["data.alpha=0.1", "fed.rounds=3", "mask.exclude=[conv1.weight]"])
    assert cfg.data.alpha == 0.1 and cfg.fed.rounds == 3
    assert cfg.mask.exclude == ["conv1.weight"]
    # untouched YAML values survive, untouched schema defaults too
    assert cfg.data.num_clients == 10 and cfg.method.init == "erk"
    assert cfg.train.momentum == ExperimentConfig().train.momentum


def test_every_shipped_config_loads():
    names = sorted(p.stem for p in config_dir().glob("*.yaml"))
    assert "default" in names
    for name in names:
        assert isinstance(load_config(name), ExperimentConfig), name


@pytest.mark.parametrize("override, needle", [
    ("data.alpah=1", "data.alpah"),                 # unknown key
    ("data.alpha=abc", "data.alpha"),               # wrong type
    ("data.partitioner=zipf", "dirichlet"),         # wrong value lists the valid choices
    ("mask.density=0", "mask.density"),             # out of range
    ("mask.density=1.5", "mask.density"),
    ("method.init=lottery", "global_magnitude"),
    ("method.name=lottery", "fedtiny"),             # the registered methods are listed
    ("mask.init=erk", "mask.init"),                 # a method option outside the method
    ("model.name=resnet50", "resnet8"),
    ("fed.rounds=0", "fed.rounds"),
    ("run.device=tpu", "cuda"),
    ("nokey", "key=value"),
])
def test_bad_input_names_the_key_or_choices(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert needle in str(err.value)


def test_cross_field_check_names_both_keys():
    with pytest.raises(ConfigError, match="data.num_clients"):
        load_config("default", ["data.num_clients=1", "fed.min_train_clients=2"])


def test_missing_config_file_lists_known_names():
    with pytest.raises(ConfigError, match="default"):
        load_config("no_such_config")


def test_yaml_round_trip_is_exact():
    cfg = load_config("default", ["data.alpha=0.3", "mask.exclude=[fc.weight]"])
    assert from_yaml(to_yaml(cfg)) == cfg


def test_run_config_bridge():
    cfg = from_run_config({"config": "default", "overrides": "fed.rounds=2 data.num_clients=3"})
    assert cfg.fed.rounds == 2 and cfg.data.num_clients == 3
    with pytest.raises(ConfigError, match="unknown run_config keys"):
        from_run_config({"config": "default", "data.alpha": 0.1})


def test_pyproject_declares_exactly_the_bridge_keys():
    import tomllib
    from pathlib import Path

    py = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert set(py["tool"]["flwr"]["app"]["config"]) == set(RUN_CONFIG_KEYS)
    assert set(RUN_CONFIG_KEYS) == {"config", "overrides", "run_dir", "resume"}


def test_run_config_bridge_ignores_run_dir_for_the_experiment(tmp_path):
    cfg = from_run_config({"config": "default", "overrides": "", "run_dir": str(tmp_path)})
    assert cfg == load_config("default")


def test_with_absolute_paths_anchors_relative_settings_only(tmp_path):
    cfg = load_config("default", ["data.root=../data", "run.out_dir=runs",
                                  "data.cache_dir=/abs/cache"])
    out = with_absolute_paths(cfg, base=tmp_path / "here")
    assert out.data.root == str(tmp_path / "data")
    assert out.run.out_dir == str(tmp_path / "here" / "runs")
    assert out.data.cache_dir == "/abs/cache"
    assert out.method.file == ""  # unset stays unset
    assert cfg.data.root == "../data"  # a copy: the input is untouched
    # a method's own path options are anchored too
    reinit = load_config("default", ["method.init=file", "method.file=m/mask.safetensors"])
    assert with_absolute_paths(reinit, base=tmp_path).method.file == str(
        tmp_path / "m" / "mask.safetensors")
    # a model option is a path only where one exists; an alias stays a name
    llm = ["method.name=pooled", "fed.rounds=0"]
    alias = load_config("default", [*llm, "method.model=smollm2-135m"])
    assert with_absolute_paths(alias, base=tmp_path).method.model == "smollm2-135m"
    (tmp_path / "mine").mkdir()
    folder = load_config("default", [*llm, "method.model=mine"])
    assert with_absolute_paths(folder, base=tmp_path).method.model == str(tmp_path / "mine")


def test_cli_rejects_bad_key_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedprune.cli", "run", "default",
                           "data.alpah=1", f"run.out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "data.alpah" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_wire_config_goes_through_the_same_checks_as_files():
    text = to_yaml(load_config("default"))
    with pytest.raises(ConfigError, match="data.alpah"):
        from_yaml(text.replace("alpha:", "alpah:"))
    with pytest.raises(ConfigError, match="mask.density"):
        from_yaml(text.replace("density: 0.1", "density: 2.0"))
    # the old wire loader accepted a bool as a count and failed with a bare TypeError on
    # a string number; the one loader converts or refuses with the key named
    with pytest.raises(ConfigError, match="data.num_clients"):
        from_yaml(text.replace("num_clients: 10", "num_clients: true"))
    assert from_yaml(text.replace("rounds: 15", "rounds: '3'")).fed.rounds == 3
    with pytest.raises(ConfigError, match="fed.rounds"):
        from_yaml(text.replace("rounds: 15", "rounds: three"))
    with pytest.raises(ConfigError, match="mapping"):
        from_yaml("- a list")


def test_switching_the_method_drops_the_files_options_for_the_old_one():
    cfg = load_config("default", ["method.name=gates", "method.rounds=2", "mask.density=0.5"])
    assert cfg.method.name == "gates" and cfg.method.rounds == 2  # default.yaml's init dropped
    with pytest.raises(ConfigError, match="method.init"):  # an option of another method
        load_config("default", ["method.name=gates", "method.init=erk"])


def test_switching_the_method_keeps_the_options_both_methods_declare():
    cfg = load_config("llm_pooled", ["method.name=mask-vote", "method.pruner=sparsegpt"])
    assert (cfg.method.name, cfg.method.model, cfg.method.pruner) == (
        "mask-vote", "smollm2-135m", "sparsegpt")
    cnn = load_config("cnn_oneshot_fed", ["method.name=l0-average"])
    assert (cnn.method.model, cnn.method.sparsity, cnn.method.calib_images) == ("cnn", 0.7, 128)
