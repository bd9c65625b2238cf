"""Private text clients: partitions over sources (domain, Dirichlet, IID), exact window
counts, disjoint windows drawn only from calibration splits, determinism, the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprune.lm.clients import (TextPartition, mixtures, partition_text, source_windows,
                                 text_partition_report, window_counts)
from fedprune.lm.tiny_models import ByteTokenizer
from fedprune.lm.tokens import encode_split

TOK = ByteTokenizer()


def test_domain_spreads_clients_over_sources_and_iid_mixes_evenly():
    part = TextPartition(partitioner="domain", clients=5, windows=4, length=8)
    assert window_counts(part).tolist() == [[4, 0, 0], [0, 4, 0], [0, 0, 4], [4, 0, 0],
                                            [0, 4, 0]]
    iid = window_counts(TextPartition(partitioner="iid", clients=2, windows=7, length=8))
    assert iid.tolist() == [[3, 2, 2], [3, 2, 2]]  # largest remainder, ties to the first


def test_dirichlet_skew_follows_alpha_and_counts_are_exact():
    def spread(alpha):  # mean max-share of a client: 1/3 for even mixtures, 1 for one source
        m = mixtures(TextPartition(partitioner="dirichlet", alpha=alpha, clients=200))
        return m.max(axis=1).mean()
    assert spread(0.1) > 0.85 and spread(100.0) < 0.45
    counts = window_counts(TextPartition(partitioner="dirichlet", alpha=0.5, clients=9,
                                         windows=13, length=8, seed=3))
    assert (counts.sum(axis=1) == 13).all() and (counts >= 0).all()
    again = window_counts(TextPartition(partitioner="dirichlet", alpha=0.5, clients=9,
                                        windows=13, length=8, seed=3))
    assert np.array_equal(counts, again)


def test_windows_are_disjoint_from_calibration_text_only(data_root, tmp_path):
    part = TextPartition(sources=("ptb", "shakespeare"), partitioner="iid", clients=3,
                         windows=6, length=32, seed=1)
    clients = partition_text(part, TOK, cache_dir=str(tmp_path))
    assert [c.windows.shape for c in clients] == [torch.Size([6, 32])] * 3
    assert [c.sources.count("ptb") for c in clients] == [3, 3, 3]
    seen = set()
    for c in clients:
        for w in c.windows:
            key = tuple(w.tolist())
            assert key not in seen  # no window is held by two clients
            seen.add(key)
    # every window is a slice of its source's calibration split, none of the test split
    for source, split in (("ptb", "train"), ("shakespeare", "train")):
        pool = source_windows(TOK, source, 32, part.seed + part.sources.index(source),
                              cache_dir=str(tmp_path))
        mine = {tuple(w.tolist()) for c in clients for w, s in zip(c.windows, c.sources)
                if s == source}
        assert mine <= {tuple(w.tolist()) for w in pool}
        test = encode_split(TOK, source, "test", cache_dir=str(tmp_path))
        test_windows = {tuple(w.tolist()) for w in test[:len(test) // 32 * 32].view(-1, 32)}
        assert not mine & test_windows, split
    again = partition_text(part, TOK, cache_dir=str(tmp_path))
    assert all(torch.equal(a.windows, b.windows) for a, b in zip(clients, again))


def test_too_little_text_names_the_source(data_root, tmp_path):
    part = TextPartition(sources=("shakespeare",), clients=2, windows=10**6, length=64)
    with pytest.raises(ValueError, match="'shakespeare' has .* windows of 64 tokens"):
        partition_text(part, TOK, cache_dir=str(tmp_path))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="kjv2"):
        TextPartition(sources=("kjv2",))
    with pytest.raises(ValueError, match="zipf"):
        TextPartition(partitioner="zipf")
    with pytest.raises(ValueError, match="windows=0"):
        TextPartition(windows=0)


def test_report_counts_tokens_per_client_per_source(tmp_path):
    part = TextPartition(partitioner="domain", clients=3, windows=2, length=16)
    result = text_partition_report(part, tmp_path)
    rows = (tmp_path / "partition_text.csv").read_text().splitlines()
    assert rows[0] == "client,size,ptb,wikitext2,shakespeare"
    assert rows[1:] == ["0,32,32,0,0", "1,32,0,32,0", "2,32,0,0,32"]
    assert (tmp_path / "partition_text_heatmap.png").stat().st_size > 0
    assert "tokens" in (tmp_path / "partition_text.md").read_text()
    assert result["summary"]["mean_labels_per_client"] == 1.0
