"""Settings a client node owns (fedprune.deploy.node): the server never sends them, a
client refuses a config that sets them, and a client reads files a server names only
under its trusted paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.client_app import app as client_app
from fedprune.config import ConfigError, from_yaml, load_config, to_yaml
from fedprune.deploy.node import for_clients, localize, node_environment
from fedprune.fl.server_core import SparseServer
from flower_helpers import server_message, set_identity
from server.records import config_record

OWNED = ["data.root=/srv/data", "data.cache_dir=/srv/cache", "run.device=cpu",
         "sim.torch_threads=3"]
TINY = ["data.num_clients=2", "data.train_subset=200", "model.width=4", "mask.density=0.2",
        "train.max_steps=1", "train.batch_size=16"]


def test_the_server_sends_no_node_setting():
    cfg = load_config("default", OWNED)
    sent = bytes(config_record(cfg)["fedprune-config"]).decode()
    assert "/srv/data" not in sent and "/srv/cache" not in sent
    back = from_yaml(sent)
    assert (back.data.root, back.data.cache_dir, back.run.device, back.sim.torch_threads) == \
        ("", "", "auto", 1)
    assert back.mask == cfg.mask and back.train == cfg.train  # the experiment itself travels


def test_node_config_wins_over_environment_and_is_typed():
    cfg = for_clients(load_config("default"))
    env = {"FEDPRUNE_DATA_ROOT": "/env/data", "FEDPRUNE_TORCH_THREADS": "2",
           "FEDPRUNE_CACHE": "/env/cache"}
    out = localize(cfg, {"data-root": "/node/data", "device": "cpu"}, env)
    assert (out.data.root, out.data.cache_dir, out.run.device, out.sim.torch_threads) == \
        ("/node/data", "/env/cache", "cpu", 2)
    assert localize(cfg, {}, {}).data.root == ""  # nothing set: the old defaults
    with pytest.raises(ConfigError, match="torch-threads.*positive integer.*'many'"):
        localize(cfg, {"torch-threads": "many"}, {})
    with pytest.raises(ConfigError, match="device.*'tpu'"):
        localize(cfg, {}, {"FEDPRUNE_DEVICE": "tpu"})


@pytest.mark.parametrize("override", OWNED)
def test_a_client_refuses_a_server_that_sets_a_node_setting(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"the server set {key}=.*this node's own setting"):
        localize(load_config("default", [override]), {}, {})


def test_files_named_by_the_server_must_be_trusted(tmp_path):
    weights = tmp_path / "models" / "ref.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    cfg = for_clients(load_config("default", [
        "method.name=pooled", "method.model=cnn", f"method.weights={weights}", "fed.rounds=0"]))
    with pytest.raises(ConfigError, match=r"method\.weights=.*outside its trusted paths"):
        localize(cfg, {}, {})
    trusted = localize(cfg, {"trusted-paths": str(tmp_path / "models")}, {})
    assert trusted.method.weights == str(weights)
    escape = for_clients(load_config("default", [  # '..' out of the trusted folder
        "method.name=pooled", "method.model=cnn", "fed.rounds=0",
        f"method.weights={tmp_path / 'models' / '..' / 'secret.safetensors'}"]))
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="outside its trusted paths"):
        localize(escape, {"trusted-paths": str(tmp_path / "models")}, {})
    # a file only the server reads (fixed's round-0 mask) is none of the client's business
    server_only = for_clients(load_config("default", [
        "method.name=fixed", "method.init=file", "method.file=/srv/masks.safetensors"]))
    assert localize(server_only, {}, {}).method.file == "/srv/masks.safetensors"
    with pytest.raises(ConfigError, match="trusted paths"):  # a sibling folder is not inside
        localize(cfg, {"trusted-paths": str(tmp_path / "mod")}, {})
    lm = for_clients(load_config("default", ["method.name=pooled", "fed.rounds=0",
                                             "method.model=smollm2-135m"]))
    assert localize(lm, {}, {}).method.model == "smollm2-135m"  # an alias, not a file
    folder = for_clients(load_config("default", ["method.name=pooled", "fed.rounds=0",
                                                 f"method.model={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"method\.model="):
        localize(folder, {}, {})


def test_simulation_gives_its_virtual_nodes_the_configs_own_settings(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    cfg = load_config("default", OWNED[:2] + [
        "method.name=pooled", "method.model=cnn", f"method.weights={weights}", "fed.rounds=0"])
    env = node_environment(cfg)
    assert env["FEDPRUNE_DATA_ROOT"] == "/srv/data" and env["FEDPRUNE_CACHE"] == "/srv/cache"
    assert "FEDPRUNE_DEVICE" not in env  # left at its default: the node decides
    out = localize(for_clients(cfg), {}, env)
    assert out.data.root == "/srv/data" and out.method.weights == str(weights)


def _train(cfg, node_config: dict):
    core = SparseServer(cfg)
    msg = server_message(1, core.encode_down(core.state),
                         {"fedprune-config": to_yaml(cfg).encode(), "server-round": 1})
    set_identity(1)
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"partition-id": 0, "num-partitions": 2, **node_config})
    return client_app(msg, ctx)


def test_the_client_app_reads_its_data_where_its_node_says(data_root, monkeypatch):
    monkeypatch.setenv("FEDPRUNE_DATA_ROOT", "/nonexistent")
    cfg = load_config("default", TINY)
    out = _train(for_clients(cfg), {"data-root": str(data_root)})
    assert not out.has_error() and out.content["metrics"]["steps"] == 1
    with pytest.raises(ConfigError, match=r"the server set data\.root="):
        _train(load_config("default", TINY + [f"data.root={Path(data_root)}"]), {})
