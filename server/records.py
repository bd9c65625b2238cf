"""Flower ArrayRecord <-> numpy dicts, and their serialized size."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of an ArrayRecord's arrays (what the transport carries)."""
    return sum(len(arr.data) for arr in record.values())


def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def to_numpy(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}
