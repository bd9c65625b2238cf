"""Private text clients: partitions over sources (domain, Dirichlet, IID), exact window
counts, disjoint windows drawn only from calibration splits, determinism, the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprune.config import TEXT_SOURCES, ConfigError, TextConfig, load_config
from fedprune.lm.clients import (mixtures, partition_text, source_windows,
                                 text_partition_report, window_counts)
from fedprune.lm.text import SOURCES
from fedprune.lm.tiny_models import ByteTokenizer
from fedprune.lm.tokens import encode_split

TOK = ByteTokenizer()


def test_config_names_exactly_the_known_sources():
    assert set(TEXT_SOURCES) == set(SOURCES)


def test_domain_spreads_clients_over_sources_and_iid_mixes_evenly():
    text = TextConfig(partitioner="domain", windows=4, length=8)
    assert window_counts(text, 5).tolist() == [[4, 0, 0], [0, 4, 0], [0, 0, 4], [4, 0, 0],
                                               [0, 4, 0]]
    iid = window_counts(TextConfig(partitioner="iid", windows=7, length=8), 2)
    assert iid.tolist() == [[3, 2, 2], [3, 2, 2]]  # largest remainder, ties to the first


def test_dirichlet_skew_follows_alpha_and_counts_are_exact():
    def spread(alpha):  # mean max-share of a client: 1/3 for even mixtures, 1 for one source
        return mixtures(TextConfig(partitioner="dirichlet", alpha=alpha), 200).max(1).mean()
    assert spread(0.1) > 0.85 and spread(100.0) < 0.45
    text = TextConfig(partitioner="dirichlet", alpha=0.5, windows=13, length=8, seed=3)
    counts = window_counts(text, 9)
    assert (counts.sum(axis=1) == 13).all() and (counts >= 0).all()
    assert np.array_equal(counts, window_counts(text, 9))


def test_windows_are_disjoint_from_calibration_text_only(data_root, tmp_path):
    text = TextConfig(sources=["ptb", "shakespeare"], partitioner="iid", windows=6, length=32,
                      seed=1)
    clients = partition_text(text, 3, TOK, cache_dir=str(tmp_path))
    assert [c.windows.shape for c in clients] == [torch.Size([6, 32])] * 3
    assert [c.sources.count("ptb") for c in clients] == [3, 3, 3]
    seen = set()
    for c in clients:
        for w in c.windows:
            key = tuple(w.tolist())
            assert key not in seen  # no window is held by two clients
            seen.add(key)
    # every window is a slice of its source's calibration split, none of the test split
    for j, source in enumerate(text.sources):
        pool = source_windows(TOK, source, 32, text.seed + j, cache_dir=str(tmp_path))
        mine = {tuple(w.tolist()) for c in clients for w, s in zip(c.windows, c.sources)
                if s == source}
        assert mine <= {tuple(w.tolist()) for w in pool}
        test = encode_split(TOK, source, "test", cache_dir=str(tmp_path))
        test_windows = {tuple(w.tolist()) for w in test[:len(test) // 32 * 32].view(-1, 32)}
        assert not mine & test_windows, source
    again = partition_text(text, 3, TOK, cache_dir=str(tmp_path))
    assert all(torch.equal(a.windows, b.windows) for a, b in zip(clients, again))


def test_too_little_text_names_the_source(data_root, tmp_path):
    text = TextConfig(sources=["shakespeare"], windows=10**6, length=64)
    with pytest.raises(ValueError, match="'shakespeare' has .* windows of 64 tokens"):
        partition_text(text, 2, TOK, cache_dir=str(tmp_path))


@pytest.mark.parametrize("override, key", [("text.sources=[kjv2]", "text.sources"),
                                           ("text.partitioner=zipf", "text.partitioner"),
                                           ("text.windows=0", "text.windows"),
                                           ("text.sources=[ptb,ptb]", "text.sources")])
def test_bad_settings_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("default", [override])


def test_report_counts_tokens_per_client_per_source(tmp_path):
    text = TextConfig(partitioner="domain", windows=2, length=16)
    result = text_partition_report(text, 3, tmp_path)
    rows = (tmp_path / "partition_text.csv").read_text().splitlines()
    assert rows[0] == "client,size,ptb,wikitext2,shakespeare"
    assert rows[1:] == ["0,32,32,0,0", "1,32,0,32,0", "2,32,0,0,32"]
    assert (tmp_path / "partition_text_heatmap.png").stat().st_size > 0
    assert "tokens" in (tmp_path / "partition_text.md").read_text()
    assert result["summary"]["mean_labels_per_client"] == 1.0
