"""Masks from an earlier run's mask.safetensors (random-reinit control): strict loading."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedprune.config import load_config
from fedprune.fl.server_core import SparseServer
from fedprune.masks.files import load_masks


def _cfg(*extra):
    return load_config("default", ["model.width=2", "mask.density=0.2", *extra])


def test_file_masks_on_fresh_weights(tmp_path):
    first = SparseServer(_cfg())
    path = tmp_path / "mask.safetensors"
    save_file({n: m.astype(np.uint8) for n, m in first.masks.items()}, str(path))
    again = SparseServer(_cfg("method.init=file", f"method.file={path}", "run.seed=1"))
    for name, mask in first.masks.items():
        np.testing.assert_array_equal(again.masks[name], mask)  # same architecture
        assert np.all(again.state[name][~mask] == 0)
    w0, w1 = first.state["conv1.weight"], again.state["conv1.weight"]
    both = first.masks["conv1.weight"]
    assert not np.allclose(w0[both], w1[both])  # fresh random weights, not the old ones


def test_bad_mask_files_name_the_problem(tmp_path):
    model = SparseServer(_cfg()).model
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_masks(tmp_path / "nope.safetensors", model)
    good = {n: np.ones(tuple(p.shape), np.uint8) for n, p in model.named_parameters()
            if n.endswith("weight") and p.dim() > 1}
    cases = {
        "shape": {**good, "conv1.weight": np.ones((1, 1), np.uint8)},
        "binary": {**good, "fc.weight": np.full(good["fc.weight"].shape, 2, np.uint8)},
        "missing": {k: v for k, v in good.items() if k != "fc.weight"},
    }
    for what, arrays in cases.items():
        path = tmp_path / f"{what}.safetensors"
        save_file(arrays, str(path))
        with pytest.raises(ValueError, match="fc.weight|conv1.weight") as err:
            load_masks(path, model)
        assert what.split("_")[0][:4] in str(err.value) or "missing" in str(err.value)
    with pytest.raises(Exception, match="method.file"):
        load_config("default", ["method.init=file"])  # init=file needs the file
