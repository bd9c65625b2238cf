"""The LLM non-IID study driver (experiments/study_llm.py) on the tiny Llama: a cell holds
every protocol's perplexities and each client's own; the combined models are the Flower
methods' combining rules applied to the clients' own results; reruns skip finished cells."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import study_llm  # noqa: E402

ARGS = ["--model", "tiny-llama", "--clients", "3", "--partitions", "domain",
        "--pruners", "wanda", "sparsegpt", "--targets", "0.5", "--total-windows", "6",
        "--length", "32", "--eval-windows", "2", "--eval-length", "32"]


def test_cells_hold_every_protocol_and_each_client(tmp_path, data_root, capsys):
    study_llm.main([*ARGS, "--out", str(tmp_path)])
    wanda = json.loads((tmp_path / "cells" / "domain-c3-wanda-0.5.json").read_text())
    sgpt = json.loads((tmp_path / "cells" / "domain-c3-sparsegpt-0.5.json").read_text())
    sources = ["ptb", "wikitext2", "shakespeare"]
    for cell in (wanda, sgpt):
        assert [sorted(c["ppl"]) for c in cell["alone"]] == [sorted(sources)] * 3
        # domain: client i holds 2 windows of source i only
        assert [c["sources"] for c in cell["alone"]] == [
            {s: 2 * (s == own) for s in sources} for own in sources]
        assert set(cell["centralized"]) == set(cell["mask-vote"]) == set(sources)
    # Wanda keeps the dense values: l0-average is mask-vote; SparseGPT's updated values
    # make them differ
    assert wanda["l0_equals_vote"] and not sgpt["l0_equals_vote"]
    assert sgpt["l0-average"] != sgpt["mask-vote"]
    assert "[study] domain-c3-wanda-0.5" in capsys.readouterr().out
    study_llm.main([*ARGS, "--out", str(tmp_path)])  # finished cells are skipped
    assert "[study]" not in capsys.readouterr().out

    import report_llm_study

    report_llm_study.main(["--out", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    pooled = sum(wanda["centralized"].values()) / 3
    assert f"| domain | 3 | {pooled:.2f} |" in table  # the mean over the three sources
    assert (tmp_path / "study.png").stat().st_size > 0
    assert "| shakespeare | 0.33 |" in (tmp_path / "sources.md").read_text()


def test_unknown_partition_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study_llm.main([*ARGS, "--partitions", "shards", "--out", str(tmp_path)])
    assert "invalid choice: 'shards'" in capsys.readouterr().err
