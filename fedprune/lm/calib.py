"""Calibration windows: N segments of L tokens drawn from a tokenized text split.

The protocol of the reference pruning code (SparseGPT ``datautils.get_wikitext2/get_ptb``,
Wanda ``lib/data.get_wikitext2``): tokenize the whole split once, then for each of the N
samples draw ``i = random.randint(0, T - L - 1)`` and take ``ids[i:i + L]``, with Python's
``random`` seeded by the seed. Here the generator is a private ``random.Random(seed)``
(same sequence as ``random.seed(seed)``, no global state), so for the same token ids and
seed the windows are exactly the reference's. Windows may overlap; as in the reference the
last token of the split is never drawn (``randint``'s bound is inclusive, ``i + L <= T - 1``).
The split needs at least L + 1 tokens.

``N = all`` instead takes every non-overlapping window in order, ``ids[:K*L]`` as (K, L)
with K = T // L, and ignores the seed.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from fedprune.lm.spec import TextSpec, parse_spec
from fedprune.lm.tokens import encode_split


def sample_windows(ids: torch.Tensor, count: int | None, length: int, seed: int,
                   name: str = "token ids") -> torch.Tensor:
    """Windows of ``length`` tokens from ids (T,): ``count`` at random offsets, or all (N, L)."""
    ids = ids.reshape(-1)
    total = ids.numel()
    if count is None:
        windows = total // length
        if windows == 0:
            raise ValueError(f"{name}: {total} tokens, fewer than one window of {length}")
        return ids[: windows * length].reshape(windows, length).clone()
    if total < length + 1:
        raise ValueError(f"{name}: {total} tokens, but drawing windows of {length} needs at "
                         f"least {length + 1}")
    rng = random.Random(seed)
    starts = [rng.randint(0, total - length - 1) for _ in range(count)]
    return torch.stack([ids[i:i + length] for i in starts])  # (N, L)


def calibration_batches(tokenizer: Any, spec: str | TextSpec, seed: int, root: str = "",
                        cache_dir: str = "") -> torch.Tensor:
    """Calibration windows for ``spec`` (default split: train; wikitext2: valid), (N, L) int64."""
    parsed = parse_spec(spec)
    ids = encode_split(tokenizer, parsed.source, parsed.calibration_split(), root, cache_dir)
    name = f"text spec '{parsed}' ({parsed.source} {parsed.calibration_split()})"
    return sample_windows(ids, parsed.count, parsed.length, seed, name)
