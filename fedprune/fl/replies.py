"""One validation layer for every client reply (Flower-free).

Every message kind declares what a reply must hold: its metrics (:class:`Metric`: int or
float or list of floats, finiteness, bounds, length) and its array records, each either a
set of named tensors (:class:`Tensor`: dtype, exact shape or 1-D length bound, finiteness,
value bounds, symmetry) or a decoder (the strict wire codec). :func:`validate` checks a
reply against its :class:`ReplySpec` before anything is aggregated and raises
:class:`ReplyError` naming the client, the field and the reason; callers log it, count the
reply as rejected and go on with the others.

Example counts are integers in ``[1, bound]``: a float is refused (never truncated), and the
bound is the smaller of a configured per-client maximum and the partition size the server
knows, so no client can take over an example-weighted aggregate by claiming more data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..masks.wire import WireError


class ReplyError(ValueError):
    """A reply breaks its spec: ``client``, ``field`` (e.g. ``metrics.num-examples``,
    ``arrays/conv1.weight``) and ``reason``."""

    def __init__(self, client: str, field_name: str, reason: str) -> None:
        super().__init__(f"{client}: {field_name}: {reason}")
        self.client, self.field, self.reason = client, field_name, reason

    def __reduce__(self):  # picklable across processes with its three parts
        return (type(self), (self.client, self.field, self.reason))


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """One metric of a reply. ``kind``: "int" (a Python/numpy integer, never a float or a
    bool), "float" (int or float), "floats" (a list of numbers, ``length`` long if set)."""

    kind: str = "float"
    low: float | None = None
    high: float | None = None
    length: int | None = None
    required: bool = True
    finite: bool = True


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _check_number(value: Any, spec: Metric, client: str, name: str) -> float | int:
    if spec.kind == "int" and not _is_int(value):
        raise ReplyError(client, name, f"must be an integer, got {type(value).__name__} "
                                       f"{value!r}")
    if not _is_number(value):
        raise ReplyError(client, name, f"must be a number, got {type(value).__name__}")
    if spec.finite and not math.isfinite(float(value)):
        raise ReplyError(client, name, f"must be finite, got {value!r}")
    if spec.low is not None and value < spec.low:
        raise ReplyError(client, name, f"{value!r} is below the minimum {spec.low!r}")
    if spec.high is not None and value > spec.high:
        raise ReplyError(client, name, f"{value!r} is above the maximum {spec.high!r}")
    return int(value) if spec.kind == "int" else float(value)


def check_metric(value: Any, spec: Metric, client: str, name: str) -> Any:
    if spec.kind != "floats":
        return _check_number(value, spec, client, name)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ReplyError(client, name, f"must be a list of numbers, got {type(value).__name__}")
    if spec.length is not None and len(value) != spec.length:
        raise ReplyError(client, name, f"has {len(value)} values, expected {spec.length}")
    return [_check_number(v, spec, client, f"{name}[{i}]") for i, v in enumerate(value)]


def check_metrics(metrics: Mapping[str, Any], specs: Mapping[str, Metric], client: str
                  ) -> dict[str, Any]:
    """The declared metrics, checked; undeclared ones pass through unchanged (they are only
    recorded, never computed with)."""
    out = dict(metrics)
    for name, spec in specs.items():
        if name not in metrics:
            if spec.required:
                raise ReplyError(client, f"metrics.{name}", "missing")
            continue
        out[name] = check_metric(metrics[name], spec, client, f"metrics.{name}")
    return out


def examples(bound: int) -> Metric:
    """An example count: an integer in [1, bound]."""
    return Metric("int", low=1, high=bound)


# ----------------------------------------------------------------------------- tensors


_KINDS = {"float": np.floating, "int": np.integer, "uint8": np.uint8, "bool": np.bool_}


@dataclass(frozen=True)
class Tensor:
    """One array of a reply. ``shape``: exact, or None with ``max_len`` for a 1-D array of
    variable length. ``dtype``: "float", "int", "uint8", "bool" (a kind; any width)."""

    shape: tuple[int, ...] | None = None
    dtype: str = "float"
    finite: bool = True
    low: float | None = None
    high: float | None = None
    max_len: int | None = None
    symmetric: bool = False  # the last two axes (e.g. a Gram matrix)


def check_tensor(arr: Any, spec: Tensor, client: str, name: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ReplyError(client, name, f"is {type(arr).__name__}, not an array")
    if not np.issubdtype(arr.dtype, _KINDS[spec.dtype]):
        raise ReplyError(client, name, f"dtype {arr.dtype}, expected {spec.dtype}")
    if spec.shape is not None and tuple(arr.shape) != tuple(spec.shape):
        raise ReplyError(client, name, f"shape {tuple(arr.shape)}, expected {tuple(spec.shape)}")
    if spec.shape is None and (arr.ndim != 1 or (spec.max_len is not None
                                                 and arr.size > spec.max_len)):
        raise ReplyError(client, name, f"shape {tuple(arr.shape)}, expected 1-D with at most "
                                       f"{spec.max_len} entries")
    if spec.finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ReplyError(client, name, f"{int((~np.isfinite(arr)).sum())} non-finite values")
    if spec.low is not None and arr.size and arr.min() < spec.low:
        raise ReplyError(client, name, f"value {arr.min()!r} below the minimum {spec.low!r}")
    if spec.high is not None and arr.size and arr.max() > spec.high:
        raise ReplyError(client, name, f"value {arr.max()!r} above the maximum {spec.high!r}")
    if spec.symmetric and not np.array_equal(arr, np.swapaxes(arr, -1, -2)):
        raise ReplyError(client, name, "is not symmetric")
    return arr


def check_tensors(arrays: Mapping[str, Any], specs: Mapping[str, Tensor], client: str,
                  record: str) -> dict[str, np.ndarray]:
    """Exactly the declared tensor names, each checked."""
    missing, extra = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
    if missing or extra:
        raise ReplyError(client, record, f"missing tensors {missing[:3]}, unexpected "
                                         f"{extra[:3]} ({len(missing)} / {len(extra)} in all)")
    return {n: check_tensor(arrays[n], s, client, f"{record}/{n}") for n, s in specs.items()}


def tensors(specs: Mapping[str, Tensor]) -> Callable[[Mapping[str, Any], str, str], Any]:
    """A record decoder checking exactly ``specs``."""
    return lambda arrays, client, record: check_tensors(arrays, specs, client, record)


# ----------------------------------------------------------------------------- replies

# decoder(arrays of one record, client, record name) -> decoded value; raises ReplyError
# (or the wire codec's WireError, a ValueError naming the tensor) to reject the reply.
Decoder = Callable[[Mapping[str, np.ndarray], str, str], Any]


@dataclass
class ReplySpec:
    """What one reply of a message kind must hold: metrics, records (each decoded by its
    decoder) and ``checks`` across fields, run on the decoded reply (raise ReplyError)."""

    metrics: dict[str, Metric] = field(default_factory=dict)
    records: dict[str, Decoder] = field(default_factory=dict)
    checks: list[Callable[["Checked"], None]] = field(default_factory=list)

    def merged(self, other: "ReplySpec") -> "ReplySpec":
        """This spec plus ``other``'s fields (``other`` wins on a shared name)."""
        return ReplySpec({**self.metrics, **other.metrics}, {**self.records, **other.records},
                         self.checks + other.checks)


@dataclass
class Checked:
    """A reply that passed its spec: decoded records and checked metrics."""

    client: str
    node: int
    metrics: dict[str, Any]
    records: dict[str, Any]

    @property
    def examples(self) -> int:
        return int(self.metrics["num-examples"])

    @property
    def partition(self) -> int:
        return int(self.metrics.get("partition-id", -1))


def validate(arrays: Mapping[str, Mapping[str, np.ndarray]], metrics: Mapping[str, Any],
             spec: ReplySpec, client: str, node: int = -1) -> Checked:
    """Check one reply (records as dicts of numpy arrays) against ``spec``. Records the
    spec does not declare are refused: a reply carries exactly what was asked for."""
    extra = sorted(set(arrays) - set(spec.records))
    if extra:
        raise ReplyError(client, "records", f"unexpected records {extra[:3]}")
    checked = check_metrics(metrics, spec.metrics, client)
    decoded = {}
    for name, decode in spec.records.items():
        if name not in arrays:
            raise ReplyError(client, name, "record missing")
        try:
            decoded[name] = decode(arrays[name], client, name)
        except ReplyError:
            raise
        except WireError as err:
            raise ReplyError(client, f"{name}/{err.tensor}", err.problem) from None
        except (ValueError, KeyError, TypeError) as err:
            raise ReplyError(client, name, str(err)) from None
    reply = Checked(client, node, checked, decoded)
    for check in spec.checks:
        check(reply)
    return reply
