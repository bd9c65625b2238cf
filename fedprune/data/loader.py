"""Mini-batches of normalized tensors from an :class:`ArraySplit`.

Batches are converted from uint8 one at a time, so a process holding many clients keeps only
uint8 arrays around. CIFAR-10 augmentation is the usual random 32x32 crop of the image
zero-padded by 4 pixels plus a horizontal flip (He et al. 2016), done with tensor indexing on
the whole batch. Each pass over a loader is one epoch, shuffled and augmented by a generator
seeded with ``seed + epoch``, so runs repeat exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fedprune.data.sources import ArraySplit

# Per-channel mean and std of the training images in [0, 1].
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
}
AUGMENTED_DATASETS = ("cifar10",)
CROP_PADDING = 4


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator
                     ) -> torch.Tensor:
    """Random crop of the zero-padded images at the original size, then a random h-flip."""
    b, h, w, _ = images.shape  # (B, H, W, C)
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))  # (B, H+2p, W+2p, C)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    cropped = padded[torch.arange(b)[:, None, None], rows, cols]  # (B, H, W, C)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(2), cropped)


class BatchLoader:
    """Re-iterable (x, y) batches: x float32 (B, C, H, W) normalized, y int64 (B,)."""

    def __init__(self, split: ArraySplit, dataset: str, batch_size: int, shuffle: bool,
                 augment: bool = False, seed: int = 0, device: str | torch.device = "cpu"
                 ) -> None:
        if dataset not in NORMALIZATION:
            raise ValueError(f"data.dataset={dataset!r} is not valid; choose one of "
                             f"{list(NORMALIZATION)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        # Crop and flip suit natural images only; flipped digits change meaning.
        self.augment = augment and dataset in AUGMENTED_DATASETS
        self.seed = seed
        self.device = torch.device(device)
        mean, std = NORMALIZATION[dataset]
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        n = len(self.split)
        order = torch.randperm(n, generator=generator).numpy() if self.shuffle else None
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            idx = order[start:stop] if order is not None else slice(start, stop)
            yield self._batch(idx, generator)

    def _batch(self, idx: np.ndarray | slice, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # np.array copies: memory-mapped rows are read-only and torch wants writable memory.
        images = torch.from_numpy(np.array(self.split.images[idx]))  # (B, H, W, C) uint8
        if self.augment:
            images = random_crop_flip(images, CROP_PADDING, generator)
        x = images.permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W) in [0, 1]
        # contiguous: callers may .view() the batch (e.g. flatten for an MLP head).
        x = ((x - self._mean) / self._std).contiguous()
        y = torch.from_numpy(np.array(self.split.labels[idx], dtype=np.int64))
        return x.to(self.device), y.to(self.device)


def make_loader(split: ArraySplit, dataset: str, batch_size: int, shuffle: bool,
                augment: bool = False, seed: int = 0, device: str | torch.device = "cpu"
                ) -> BatchLoader:
    """Batches over ``split``; iterate once per epoch (augment applies to CIFAR-10 only)."""
    return BatchLoader(split, dataset, batch_size, shuffle, augment, seed, device)
