"""Injected client faults for robustness runs in simulation (the ``faults`` config section).

Each round each client draws, from a generator seeded by (``faults.seed``, round,
partition), whether it fails (raises: Flower returns an error reply), times out (answers
one second after ``fed.round_timeout``, so the server has stopped waiting) or replies
garbage: its honest reply with one of :data:`GARBAGE` applied, taken in turn by round and
partition so every class occurs. The server must reject each garbage class, log why and go
on; ``tests/test_faults.py`` checks every class against the real validation path.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

Records = dict[str, dict[str, np.ndarray]]

# bad-input class -> what it does to an honest reply
GARBAGE = {
    "nan_value": "NaN in one float value",
    "inf_value": "Inf in one float value",
    "huge_examples": "num-examples = 10^18",
    "negative_examples": "num-examples = -5",
    "float_examples": "num-examples a float (n + 0.5)",
    "missing_examples": "num-examples missing",
    "missing_tensor": "one tensor missing",
    "extra_tensor": "an unknown tensor added",
    "wrong_shape": "one value too many",
    "wrong_dtype": "float64 values for float32",
    "nan_loss": "train_loss NaN",
    "bad_partition": "partition-id = 10^6",
}


def draw(cfg, partition_id: int, server_round: int) -> str | None:
    """This client's fault in this round: "fail", "timeout", "garbage" or None."""
    f = cfg.faults
    if not (f.fail or f.timeout or f.garbage):
        return None
    u = np.random.default_rng([f.seed, server_round, partition_id]).random()
    for kind, p in (("fail", f.fail), ("timeout", f.fail + f.timeout),
                    ("garbage", f.fail + f.timeout + f.garbage)):
        if u < p:
            return kind
    return None


def inject(cfg, partition_id: int, server_round: int, records: Records,
           metrics: dict[str, Any]) -> tuple[Records, dict[str, Any]]:
    """The reply to send: the honest one, or one with this round's fault applied."""
    kind = draw(cfg, partition_id, server_round)
    if kind == "fail":
        raise RuntimeError(f"injected fault: partition {partition_id} fails in round "
                           f"{server_round}")
    if kind == "timeout":
        time.sleep(cfg.fed.round_timeout + 1.0)
    if kind == "garbage":
        which = list(GARBAGE)[(server_round + partition_id) % len(GARBAGE)]
        return corrupt(records, metrics, which)
    return records, metrics


def _first_float(records: Records) -> tuple[str, str]:
    for record, arrays in records.items():
        for name, arr in arrays.items():
            if arr.dtype.kind == "f" and arr.size:
                return record, name
    raise ValueError("the reply has no float array to corrupt")


def corrupt(records: Records, metrics: dict[str, Any], which: str
            ) -> tuple[Records, dict[str, Any]]:
    """A copy of the reply with the bad-input class ``which`` applied."""
    records = {k: dict(v) for k, v in records.items()}
    metrics = dict(metrics)
    if which in ("nan_value", "inf_value") and not any(records.values()):
        lists = [k for k, v in metrics.items() if isinstance(v, list) and v]
        if not lists:
            raise ValueError("the reply has no values to corrupt")
        bad = float("nan" if which == "nan_value" else "inf")
        metrics[lists[0]] = [bad] + metrics[lists[0]][1:]
    elif which in ("nan_value", "inf_value", "wrong_shape", "wrong_dtype"):
        record, name = _first_float(records)
        arr = records[record][name].copy()
        if which == "nan_value":
            arr.reshape(-1)[0] = np.nan
        elif which == "inf_value":
            arr.reshape(-1)[0] = np.inf
        elif which == "wrong_shape":
            arr = np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]])
        else:
            arr = arr.astype(np.float64)
        records[record][name] = arr
    elif which == "huge_examples":
        metrics["num-examples"] = 10**18
    elif which == "negative_examples":
        metrics["num-examples"] = -5
    elif which == "float_examples":
        metrics["num-examples"] = float(metrics.get("num-examples", 1)) + 0.5
    elif which == "missing_examples":
        metrics.pop("num-examples", None)
    elif which == "missing_tensor" and any(records.values()):
        record = next(r for r, a in records.items() if a)
        records[record].pop(next(iter(records[record])))
    elif which in ("extra_tensor", "missing_tensor"):
        records.setdefault(next(iter(records), "arrays"), {})["value/not.a.tensor"] = \
            np.zeros(3, np.float32)
    elif which == "nan_loss":
        if "train_loss" in metrics:
            metrics["train_loss"] = float("nan")
        else:  # a query reply: poison its values instead
            return corrupt(records, metrics, "nan_value")
    elif which == "bad_partition":
        metrics["partition-id"] = 10**6
    else:
        raise ValueError(f"unknown garbage class {which!r}; valid: {list(GARBAGE)}")
    return records, metrics
