"""Private text clients for federated pruning of language models (Flower-free).

Each source's calibration split (``fedprune.lm.spec.CALIBRATION_SPLITS``: train;
WikiText-2: valid) is tokenized once and cut into non-overlapping windows of ``length``
tokens, shuffled with the seed. Clients get disjoint windows: no window is held by two
clients, so each client's text is its own. Every source's evaluation split (test) is held
out: no client calibrates on it.

Partitions of ``clients`` clients holding ``windows`` windows each, as a mixture over the
sources turned into exact per-source window counts (largest remainder):

- ``domain``: client i draws only from source ``i mod S`` (clients spread over sources),
- ``dirichlet``: client i's mixture ~ Dirichlet(alpha) over the sources (seeded),
- ``iid``: the uniform mixture.

Deterministic from the seed: the same config always gives every client the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..masks.allocate import largest_remainder
from .spec import CALIBRATION_SPLITS
from .text import SOURCES
from .tokens import encode_split

PARTITIONERS = ("domain", "dirichlet", "iid")


@dataclass(frozen=True)
class TextPartition:
    """Which text each client holds: the knobs of :func:`partition_text`."""

    sources: tuple[str, ...] = ("ptb", "wikitext2", "shakespeare")
    partitioner: str = "domain"
    alpha: float = 0.5
    clients: int = 4
    windows: int = 16
    length: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"text sources {list(self.sources)} must be distinct names from "
                             f"{list(SOURCES)}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"text partitioner {self.partitioner!r} is not valid; choose one "
                             f"of {list(PARTITIONERS)}")
        for name, value, low in (("clients", self.clients, 1), ("windows", self.windows, 1),
                                 ("length", self.length, 2)):
            if value < low:
                raise ValueError(f"text {name}={value} must be >= {low}")
        if self.alpha <= 0:
            raise ValueError(f"text alpha={self.alpha} must be > 0")


@dataclass
class ClientText:
    """One client's windows (N, L) and the source of each."""

    windows: torch.Tensor
    sources: list[str]


def mixtures(part: TextPartition) -> np.ndarray:
    """(clients, sources) rows summing to 1: each client's share of each source."""
    s = len(part.sources)
    if part.partitioner == "iid":
        return np.full((part.clients, s), 1.0 / s)
    if part.partitioner == "domain":
        return np.eye(s)[np.arange(part.clients) % s]
    rng = np.random.default_rng(part.seed)
    return rng.dirichlet(np.full(s, part.alpha), size=part.clients)


def window_counts(part: TextPartition) -> np.ndarray:
    """(clients, sources) integer windows per client per source, each row summing to
    ``windows`` exactly."""
    rows = [largest_remainder(list(m * part.windows), [part.windows] * len(m), part.windows,
                              floor=0) for m in mixtures(part)]
    return np.asarray(rows, dtype=np.int64)


def source_windows(tokenizer: Any, source: str, length: int, seed: int, root: str = "",
                   cache_dir: str = "") -> torch.Tensor:
    """All non-overlapping windows of the source's calibration split, shuffled, (K, L)."""
    ids = encode_split(tokenizer, source, CALIBRATION_SPLITS[source], root, cache_dir)
    k = ids.numel() // length
    windows = ids[:k * length].reshape(k, length)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    return windows[order]


def partition_text(part: TextPartition, tokenizer: Any, root: str = "", cache_dir: str = ""
                   ) -> list[ClientText]:
    """Every client's windows, disjoint across clients; an error names the source that
    does not have enough text for the partition."""
    counts = window_counts(part)
    pools = {}
    for j, source in enumerate(part.sources):
        pool = source_windows(tokenizer, source, part.length, part.seed + j, root, cache_dir)
        need = int(counts[:, j].sum())
        if need > len(pool):
            raise ValueError(f"text source {source!r} has {len(pool)} windows of "
                             f"{part.length} tokens in its calibration split, the partition "
                             f"needs {need}: lower the windows per client, the window length "
                             "or the number of clients")
        pools[source] = pool
    taken = dict.fromkeys(part.sources, 0)
    clients = []
    for row in counts:
        windows, names = [], []
        for source, n in zip(part.sources, row):
            start = taken[source]
            windows.append(pools[source][start:start + int(n)])
            names += [source] * int(n)
            taken[source] += int(n)
        clients.append(ClientText(torch.cat(windows), names))
    return clients


def text_partition_report(part: TextPartition, out_dir: Path) -> dict[str, Any]:
    """Tokens per client per source: partition_text.{csv,md} and a heatmap."""
    from ..data.report import write_count_report

    counts = window_counts(part) * part.length
    title = (f"Text partition: {part.partitioner}"
             + (f" (alpha {part.alpha})" if part.partitioner == "dirichlet" else "")
             + f", {part.clients} clients x {part.windows} windows of {part.length} tokens")
    return write_count_report(counts, out_dir, "partition_text", title, list(part.sources),
                              "tokens")
