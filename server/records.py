"""Flower records: ArrayRecord <-> numpy dicts and their serialized size; the config record."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord

from fedprune.config import ExperimentConfig, to_yaml
from fedprune.deploy.node import for_clients


def config_record(cfg: ExperimentConfig) -> ConfigRecord:
    """The experiment config every message carries, as UTF-8 YAML bytes (Flower's strategy
    start-up log prints a ConfigRecord's strings in full but bytes as '<bytes>'), without
    the settings each client node owns (fedprune.deploy.node)."""
    return ConfigRecord({"fedprune-config": to_yaml(for_clients(cfg)).encode()})


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of an ArrayRecord's arrays (what the transport carries)."""
    return sum(len(arr.data) for arr in record.values())


def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def to_numpy(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}
