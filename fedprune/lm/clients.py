"""Private text clients for federated pruning of language models (Flower-free).

Each source's calibration split (``fedprune.lm.spec.CALIBRATION_SPLITS``: train;
WikiText-2: valid) is tokenized once and cut into non-overlapping windows of ``length``
tokens, shuffled with the seed. Clients get disjoint windows: no window is held by two
clients, so each client's text is its own. Every source's evaluation split (test) is held
out: no client calibrates on it.

Partitions (the ``text`` config section) of ``clients`` clients holding ``windows`` windows
each, as a mixture over the sources turned into exact per-source window counts (largest
remainder):

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

from ..config import TextConfig
from ..masks.allocate import largest_remainder
from .spec import CALIBRATION_SPLITS
from .tokens import encode_split

@dataclass
class ClientText:
    """One client's windows (N, L) and the source of each."""

    windows: torch.Tensor
    sources: list[str]


def mixtures(text: TextConfig, clients: int) -> np.ndarray:
    """(clients, sources) rows summing to 1: each client's share of each source."""
    s = len(text.sources)
    if text.partitioner == "iid":
        return np.full((clients, s), 1.0 / s)
    if text.partitioner == "domain":
        return np.eye(s)[np.arange(clients) % s]
    rng = np.random.default_rng(text.seed)
    return rng.dirichlet(np.full(s, text.alpha), size=clients)


def window_counts(text: TextConfig, clients: int) -> np.ndarray:
    """(clients, sources) integer windows per client per source, each row summing to
    ``text.windows`` exactly."""
    n = text.windows
    rows = [largest_remainder(list(m * n), [n] * len(m), n, floor=0)
            for m in mixtures(text, clients)]
    return np.asarray(rows, dtype=np.int64)


def source_windows(tokenizer: Any, source: str, length: int, seed: int, root: str = "",
                   cache_dir: str = "") -> torch.Tensor:
    """All non-overlapping windows of the source's calibration split, shuffled, (K, L)."""
    ids = encode_split(tokenizer, source, CALIBRATION_SPLITS[source], root, cache_dir)
    k = ids.numel() // length
    windows = ids[:k * length].reshape(k, length)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    return windows[order]


def partition_text(text: TextConfig, clients: int, tokenizer: Any, root: str = "",
                   cache_dir: str = "") -> list[ClientText]:
    """Every client's windows, disjoint across clients; an error names the source that
    does not have enough text for the partition."""
    counts = window_counts(text, clients)
    pools = {}
    for j, source in enumerate(text.sources):
        pool = source_windows(tokenizer, source, text.length, text.seed + j, root, cache_dir)
        need = int(counts[:, j].sum())
        if need > len(pool):
            raise ValueError(f"text source {source!r} has {len(pool)} windows of "
                             f"{text.length} tokens in its calibration split, the partition "
                             f"needs {need}: lower text.windows, text.length or the number "
                             "of clients")
        pools[source] = pool
    taken = dict.fromkeys(text.sources, 0)
    out = []
    for row in counts:
        windows, names = [], []
        for source, n in zip(text.sources, row):
            start = taken[source]
            windows.append(pools[source][start:start + int(n)])
            names += [source] * int(n)
            taken[source] += int(n)
        out.append(ClientText(torch.cat(windows), names))
    return out


def text_partition_report(text: TextConfig, clients: int, out_dir: Path) -> dict[str, Any]:
    """Tokens per client per source: partition_text.{csv,md} and a heatmap."""
    from ..data.report import write_count_report

    counts = window_counts(text, clients) * text.length
    title = (f"Text partition: {text.partitioner}"
             + (f" (alpha {text.alpha})" if text.partitioner == "dirichlet" else "")
             + f", {clients} clients x {text.windows} windows of {text.length} tokens")
    return write_count_report(counts, out_dir, "partition_text", title, list(text.sources),
                              "tokens")
