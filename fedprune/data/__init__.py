"""Data: real CIFAR-10 and MNIST, offline-capable, split among clients by flwr-datasets.

- :mod:`~fedprune.data.sources`: find, decode and cache the splits (local root or the hub),
- :mod:`~fedprune.data.partitioning`: per-client train indices, client and test splits,
- :mod:`~fedprune.data.loader`: normalized (and for CIFAR-10 augmented) tensor batches,
- :mod:`~fedprune.data.report`: label-count tables and heatmap of a partition.
"""

from fedprune.data.cache import resolve_cache_dir
from fedprune.data.loader import BatchLoader, make_loader
from fedprune.data.partitioning import client_split, partition, partition_labels, test_split
from fedprune.data.report import label_counts, partition_report, partition_summary
from fedprune.data.sources import ArraySplit, load_split, resolve_data_root

__all__ = [
    "ArraySplit",
    "BatchLoader",
    "client_split",
    "label_counts",
    "load_split",
    "make_loader",
    "partition",
    "partition_labels",
    "partition_report",
    "partition_summary",
    "resolve_cache_dir",
    "resolve_data_root",
    "test_split",
]
