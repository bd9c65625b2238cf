"""Replies summed under secure aggregation: the fixed-point layout both sides agree on.

Flower's SecAgg+ (``secaggplus_mod`` on the client, ``SecAggPlusWorkflow`` on the server)
returns the *example-weighted mean* of the clients' vectors, each clipped to
[-clip, clip] and quantized to ``2**quant_bits`` levels. A method that needs the *sum* of
its clients' arrays (``pooled``: squared norms, Gram matrices) therefore has each client
send ``array / (examples * scale)`` with weight ``examples``: the weighted mean is then
``sum(arrays) / (total examples * scale)`` and the server multiplies back. ``scale`` is
public, one per array, chosen by the server so that the values sit well inside [-1, 1]
(``clip`` = 1); a client counts the entries it had to clip (a count, sent in the clear).
Symmetric matrices travel as their upper triangle (half the entries).

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


@dataclass
class SecureSum:
    """Which reply arrays are summed securely, their shapes and public scales."""

    shapes: dict[str, tuple[int, ...]]
    scales: dict[str, float]
    triangular: set[str] = field(default_factory=set)  # symmetric (n, n): upper triangle

    def __post_init__(self) -> None:
        if set(self.scales) != set(self.shapes):
            raise ValueError("SecureSum: every array needs exactly one scale")
        for name, scale in self.scales.items():
            if not (np.isfinite(scale) and scale > 0):
                raise ValueError(f"SecureSum: scale of {name!r} is {scale}, must be > 0")
        for name in self.triangular:
            shape = self.shapes[name]
            if len(shape) != 2 or shape[0] != shape[1]:
                raise ValueError(f"SecureSum: {name!r} of shape {shape} is not square")

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def to_json(self) -> str:
        return json.dumps({"shapes": {n: list(s) for n, s in self.shapes.items()},
                           "scales": self.scales, "triangular": sorted(self.triangular)})

    @classmethod
    def from_json(cls, text: str) -> "SecureSum":
        raw = json.loads(text)
        return cls({n: tuple(s) for n, s in raw["shapes"].items()},
                   {n: float(v) for n, v in raw["scales"].items()}, set(raw["triangular"]))

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
            if name in self.triangular:
                a = a[np.triu_indices(a.shape[0])]
            a = a / (examples * self.scales[name])
            clipped += int((np.abs(a) > 1).sum())
            vector.append(a)
        return vector, clipped

    def decode(self, vector: list[np.ndarray], total_examples: int) -> dict[str, np.ndarray]:
        """The sums from the aggregated (example-weighted mean) vector."""
        if len(vector) != len(self.shapes):
            raise ValueError(f"SecureSum: {len(vector)} arrays, expected {len(self.shapes)}")
        out = {}
        for name, a in zip(self.names, vector):
            a = np.asarray(a, dtype=np.float64) * (self.scales[name] * total_examples)
            if name in self.triangular:
                n = self.shapes[name][0]
                full = np.zeros((n, n))
                full[np.triu_indices(n)] = a
                a = full + np.triu(full, 1).T
            out[name] = a.reshape(self.shapes[name])
        return out

    def bound(self, name: str, total_examples: int, quant_bits: int) -> float:
        """The largest quantization error of one entry of ``name``'s sum (no clipping)."""
        return 2.0 * self.scales[name] * total_examples / 2 ** quant_bits

    def entries(self) -> int:
        """Numbers in one client's vector (what SecAgg+ masks and sends up)."""
        return sum(s[0] * (s[0] + 1) // 2 if n in self.triangular else int(np.prod(s))
                   for n, s in self.shapes.items())
