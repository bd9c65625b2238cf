"""Split the training set among federated clients with flwr-datasets partitioners.

The partitioners see only a two-column table (``label``, ``idx``) built from the labels, so
partitioning never touches images; reading ``idx`` back gives indices into the train split.
Schemes: IID; Dirichlet label skew (Hsu et al. 2019, p_k ~ Dir(alpha) per label); label-sorted
shards (McMahan et al. 2017); pathological k labels per client. The rows are handed over in a
seeded random order, because IidPartitioner cuts contiguous blocks of whatever order it gets.
The result is cached on disk, so a thousand virtual clients of one run compute it once, and
``datasets``/``flwr_datasets`` (about 1 s to import) are only imported on a cache miss:
deployed Flower clients start a fresh process per message.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import numpy as np

from fedprune.config import DataConfig
from fedprune.data.cache import atomic_write, build_once, resolve_cache_dir
from fedprune.data.sources import ArraySplit, load_split

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

PARTITION_SCHEME = 1  # bump when the partitioning here changes, to retire old cache entries
# Config fields each partitioner depends on, beyond those every scheme uses.
SCHEME_FIELDS = {"iid": (), "dirichlet": ("alpha", "min_partition_size"),
                 "shards": ("shards_per_client",), "pathological": ("classes_per_client",)}
COMMON_FIELDS = ("dataset", "partitioner", "num_clients", "train_subset", "seed")


def relevant_fields(cfg: DataConfig) -> dict[str, Any]:
    """The ``data.*`` settings that determine the partition, keyed by their dotted names."""
    names = COMMON_FIELDS + SCHEME_FIELDS[cfg.partitioner]
    return {f"data.{name}": getattr(cfg, name) for name in names}


def _describe(cfg: DataConfig) -> str:
    return " ".join(f"{k}={v!r}" for k, v in relevant_fields(cfg).items())


def train_pool(num_examples: int, cfg: DataConfig) -> np.ndarray:
    """Train indices to partition, in seeded random order (a subset if data.train_subset)."""
    if cfg.train_subset > num_examples:
        raise ValueError(f"data.train_subset={cfg.train_subset} exceeds the "
                         f"{num_examples} examples of the {cfg.dataset} training set")
    order = np.random.default_rng(cfg.seed).permutation(num_examples)
    return order[:cfg.train_subset] if cfg.train_subset else order


def _check_feasible(cfg: DataConfig, num_examples: int, num_labels: int) -> None:
    """Refuse configs a partitioner would fail on late, obscurely, or after many retries."""
    need = {"dirichlet": cfg.min_partition_size, "shards": cfg.shards_per_client}
    per_client = max(1, need.get(cfg.partitioner, 1))
    if cfg.num_clients * per_client > num_examples:
        raise ValueError(f"cannot give each of data.num_clients={cfg.num_clients} clients "
                         f"{per_client} of the {num_examples} training examples "
                         f"({_describe(cfg)})")
    if cfg.partitioner == "pathological" and cfg.classes_per_client > num_labels:
        raise ValueError(f"data.classes_per_client={cfg.classes_per_client} exceeds the "
                         f"{num_labels} labels present ({_describe(cfg)})")


def _make_partitioner(cfg: DataConfig) -> Partitioner:
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           PathologicalPartitioner, ShardPartitioner)

    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=cfg.num_clients)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=cfg.num_clients, partition_by="label", alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=True, seed=cfg.seed)
    if cfg.partitioner == "shards":
        return ShardPartitioner(num_partitions=cfg.num_clients, partition_by="label",
                                num_shards_per_partition=cfg.shards_per_client, seed=cfg.seed)
    # first-deterministic gives client i label i mod L, so every label is held by someone
    # whenever there are at least as many clients as labels.
    return PathologicalPartitioner(
        num_partitions=cfg.num_clients, partition_by="label",
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic", seed=cfg.seed)


def _read_idx(part: datasets.Dataset) -> np.ndarray:
    # Through Arrow: indexing the column directly builds one Python object per row.
    return part.with_format("arrow")[:]["idx"].to_numpy().astype(np.int64)


def partition_labels(labels: np.ndarray, cfg: DataConfig) -> list[np.ndarray]:
    """One int64 array of train indices per client, computed from ``labels`` (no cache)."""
    import datasets

    labels = np.asarray(labels, dtype=np.int64)
    pool = train_pool(len(labels), cfg)
    _check_feasible(cfg, len(pool), len(np.unique(labels[pool])))
    partitioner = _make_partitioner(cfg)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[pool], "idx": pool})
    try:
        return [_read_idx(partitioner.load_partition(i)) for i in range(cfg.num_clients)]
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"data.partitioner={cfg.partitioner!r} cannot split "
                         f"{len(pool)} examples as configured ({_describe(cfg)}): {err}"
                         ) from err


def _partition_key(cfg: DataConfig, labels: np.ndarray) -> str:
    # The label hash ties the entry to one ordering of one training set (hub and local
    # copies of CIFAR-10 hold the same labels in different orders).
    payload = {
        "fields": relevant_fields(cfg),
        "num_examples": len(labels),
        "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
        "flwr_datasets": version("flwr-datasets"),
        "scheme": PARTITION_SCHEME,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def partition(cfg: DataConfig) -> list[np.ndarray]:
    """Per-client train indices for ``cfg``, computed once and then read from the cache."""
    labels = np.asarray(load_split(cfg.dataset, "train", cfg.root, cfg.cache_dir).labels)
    path = (resolve_cache_dir(cfg.cache_dir) / "partitions"
            / f"{cfg.dataset}-{cfg.partitioner}-{_partition_key(cfg, labels)}.npz")

    def build() -> None:
        parts = partition_labels(labels, cfg)
        offsets = np.cumsum([0] + [len(p) for p in parts])
        flat = np.concatenate(parts).astype(np.int64)
        atomic_write(path, lambda h: np.savez(h, indices=flat, offsets=offsets))

    build_once([path], build)
    with np.load(path) as stored:
        flat, offsets = stored["indices"], stored["offsets"]
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def client_split(cfg: DataConfig, partition_id: int) -> ArraySplit:
    """The training examples of one client (a copy; the full split stays memory-mapped)."""
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(f"partition_id={partition_id} is out of range for "
                         f"data.num_clients={cfg.num_clients} (valid: 0..{cfg.num_clients - 1})")
    indices = partition(cfg)[partition_id]
    train = load_split(cfg.dataset, "train", cfg.root, cfg.cache_dir)
    return ArraySplit(np.asarray(train.images[indices]), np.asarray(train.labels[indices]))


def test_split(cfg: DataConfig) -> ArraySplit:
    """The server's test set: all of it, or the first data.test_subset of a seeded shuffle."""
    test = load_split(cfg.dataset, "test", cfg.root, cfg.cache_dir)
    if cfg.test_subset == 0:
        return test
    if cfg.test_subset > len(test):
        raise ValueError(f"data.test_subset={cfg.test_subset} exceeds the {len(test)} "
                         f"examples of the {cfg.dataset} test set")
    order = np.random.default_rng(cfg.seed).permutation(len(test))[:cfg.test_subset]
    return ArraySplit(np.asarray(test.images[order]), np.asarray(test.labels[order]))
