"""Replies summed under secure aggregation: the fixed-point layout both sides agree on.

Flower's SecAgg+ (``secaggplus_mod`` on the client, ``SecAggPlusWorkflow`` on the server)
returns the *example-weighted mean* of the clients' vectors, each clipped to
[-clip, clip] and quantized to ``2**quant_bits`` levels. A method that needs the *sum* of
its clients' arrays (``pooled``: squared norms, Gram matrices) therefore has each client
send ``array / (examples * scale)`` with weight ``examples``: the weighted mean is then
``sum(arrays) / (total examples * scale)`` and the server multiplies back. ``scale`` is
public and per entry, chosen by the server so that the values sit well inside [-1, 1]
(``clip`` = 1): a vector ``u`` per array, the scale of entry j being ``u[j]`` (1-D
arrays) or ``u[j] * u[k]`` (matrices). For a Gram matrix with ``u = sqrt(c * diag)`` of
an estimate of its diagonal this is the Cauchy-Schwarz bound ``|G_jk| <= sqrt(G_jj
G_kk)`` times ``c``: every entry keeps its precision relative to its own size, where one
scale per matrix would drown the small input channels under the largest one's
quantization steps (it made SmolLM2's summed Grams indefinite). A client counts the
entries it had to clip (a count, sent in the clear). Symmetric matrices travel as their
upper triangle (half the entries).

Error bound (per entry of the sum): each client's stochastic rounding moves its value by
less than one step 2 / 2**quant_bits, so the weighted mean moves by less than that and
the sum by less than ``2 * scale * total_examples / 2**quant_bits`` (clipping aside).

Flower-free: the Flower ends are ``server/secure.py`` and ``client/client_app.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..masks.wire import from_upper_triangle, upper_triangle

SCALE_PREFIX = "secure-scale/"  # the scale vectors travel beside the query's arrays


@dataclass
class SecureSum:
    """Which reply arrays are summed securely, their shapes and public scale vectors."""

    shapes: dict[str, tuple[int, ...]]
    scales: dict[str, np.ndarray]  # name -> u: entry scales u[j] (1-D) or u[j] u[k] (2-D)
    triangular: set[str] = field(default_factory=set)  # symmetric (n, n): upper triangle

    def __post_init__(self) -> None:
        if set(self.scales) != set(self.shapes):
            raise ValueError("SecureSum: every array needs exactly one scale vector")
        for name, u in self.scales.items():
            u = self.scales[name] = np.asarray(u, dtype=np.float64)
            shape = tuple(self.shapes[name])
            if u.shape != shape[:1] or len(shape) > 2 or (len(shape) == 2 and
                                                          shape[0] != shape[1]):
                raise ValueError(f"SecureSum: {name!r} of shape {shape} needs a scale vector "
                                 f"of its first dimension, got {u.shape}")
            if not (np.isfinite(u).all() and (u > 0).all()):
                raise ValueError(f"SecureSum: the scales of {name!r} must be finite and > 0")
        for name in self.triangular:
            shape = self.shapes[name]
            if len(shape) != 2 or shape[0] != shape[1]:
                raise ValueError(f"SecureSum: {name!r} of shape {shape} is not square")

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def scale(self, name: str) -> np.ndarray:
        """The scale of every entry of ``name`` (its shape)."""
        u = self.scales[name]
        return np.outer(u, u) if len(self.shapes[name]) == 2 else u

    def to_json(self) -> str:
        """Shapes and packing; the scale vectors go as arrays (:meth:`scale_arrays`)."""
        return json.dumps({"shapes": {n: list(s) for n, s in self.shapes.items()},
                           "triangular": sorted(self.triangular)})

    def scale_arrays(self) -> dict[str, np.ndarray]:
        return {f"{SCALE_PREFIX}{n}": u for n, u in self.scales.items()}

    @classmethod
    def from_json(cls, text: str, arrays: Mapping[str, np.ndarray]) -> "SecureSum":
        raw = json.loads(text)
        shapes = {n: tuple(s) for n, s in raw["shapes"].items()}
        missing = sorted(n for n in shapes if f"{SCALE_PREFIX}{n}" not in arrays)
        if missing:
            raise ValueError(f"SecureSum: no scale vector for {missing[:3]}")
        return cls(shapes, {n: arrays[f"{SCALE_PREFIX}{n}"] for n in shapes},
                   set(raw["triangular"]))

    def encode(self, arrays: Mapping[str, np.ndarray], examples: int
               ) -> tuple[list[np.ndarray], int]:
        """A client's vector (one float64 array per name, in ``names`` order) and how many
        of its entries fall outside [-1, 1] (Flower clips them)."""
        if examples < 1:
            raise ValueError(f"SecureSum: {examples} examples, need >= 1")
        missing = sorted(set(self.shapes) - set(arrays))
        if missing:
            raise ValueError(f"SecureSum: the reply lacks {missing[:3]}")
        vector, clipped = [], 0
        for name in self.names:
            a = np.asarray(arrays[name], dtype=np.float64)
            if a.shape != tuple(self.shapes[name]):
                raise ValueError(f"SecureSum: {name!r} has shape {a.shape}, expected "
                                 f"{tuple(self.shapes[name])}")
            a = a / (examples * self.scale(name))
            if name in self.triangular:
                a = upper_triangle(a)
            clipped += int((np.abs(a) > 1).sum())
            vector.append(a)
        return vector, clipped

    def decode(self, vector: list[np.ndarray], total_examples: int) -> dict[str, np.ndarray]:
        """The sums from the aggregated (example-weighted mean) vector."""
        if len(vector) != len(self.shapes):
            raise ValueError(f"SecureSum: {len(vector)} arrays, expected {len(self.shapes)}")
        out = {}
        for name, a in zip(self.names, vector):
            a = np.asarray(a, dtype=np.float64)
            if name in self.triangular:
                a = from_upper_triangle(a, self.shapes[name][0])
            out[name] = a.reshape(self.shapes[name]) * (self.scale(name) * total_examples)
        return out

    def bound(self, name: str, total_examples: int, quant_bits: int) -> np.ndarray:
        """The largest quantization error of each entry of ``name``'s sum (no clipping)."""
        return 2.0 * self.scale(name) * total_examples / 2 ** quant_bits

    def entries(self) -> int:
        """Numbers in one client's vector (what SecAgg+ masks and sends up)."""
        return sum(s[0] * (s[0] + 1) // 2 if n in self.triangular else int(np.prod(s))
                   for n, s in self.shapes.items())
