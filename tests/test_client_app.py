"""The ClientApp called directly with a hand-built train message (no Ray, no SuperLink)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.client_app import app as client_app
from fedprune.config import load_config, to_yaml
from fedprune.data import client_split
from fedprune.fl.server_core import SparseServer
from flower_helpers import server_message, set_identity

OVERRIDES = ["data.num_clients=3", "data.train_subset=600", "model.width=4",
             "mask.density=0.2", "train.max_steps=3", "train.batch_size=16"]


def _call(cfg, core, partition_id, num_partitions=3):
    msg = server_message(partition_id + 1, core.encode_down(core.state),
                         {"fedprune-config": to_yaml(cfg), "server-round": 1})
    set_identity(partition_id + 1)
    ctx = Context(run_id=1, node_id=partition_id + 1,
                  node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                  state=RecordDict(), run_config={})
    return client_app(msg, ctx)


def test_train_reply_carries_only_kept_values_and_trains(data_root):
    cfg = load_config("default", OVERRIDES)
    core = SparseServer(cfg)
    out = _call(cfg, core, partition_id=1)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    payload = {k: v.numpy() for k, v in out.content["arrays"].items()}
    assert all(k.split("/")[0] in ("value", "dense") for k in payload)  # no dense masked tensor
    for name, mask in core.masks.items():
        assert payload[f"value/{name}"].size == int(mask.sum())
    metrics = out.content["metrics"]
    assert metrics["num-examples"] == len(client_split(cfg.data, 1))
    assert metrics["steps"] == 3
    # decoding strictly succeeds and the kept weights changed (training happened)
    state = core.decode_reply(payload, "client 1")
    name = next(iter(core.masks))
    assert not np.array_equal(state[name], core.state[name])
    assert np.all(state[name][~core.masks[name]] == 0)


def test_wrong_partition_count_is_a_clear_error(data_root):
    cfg = load_config("default", OVERRIDES)
    core = SparseServer(cfg)
    # Flower's runtime turns this exception into an error reply that the strategy logs
    with pytest.raises(ValueError) as err:
        _call(cfg, core, partition_id=0, num_partitions=5)
    assert "num-partitions=5" in str(err.value) and "data.num_clients=3" in str(err.value)
