"""Masks saved by an earlier run (``mask.safetensors``), loaded strictly onto a model.

Used by the random-reinit control (Liu et al. 2019, "Rethinking the Value of Network
Pruning"): the final sparse architecture of a run, trained again from fresh weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .core import Masks, prunable_names


def load_masks(path: str | Path, model: nn.Module, exclude: Sequence[str] = ()) -> Masks:
    """Bool masks from a safetensors file; names, shapes and values must fit ``model``."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask.file={str(path)!r} does not exist (expected a run's "
                                "mask.safetensors)")
    arrays = load_file(str(path))
    params = dict(model.named_parameters())
    expected = prunable_names(model, exclude)
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"mask.file={str(path)!r}: missing masks for {missing[:3]}, "
                         f"masks for unknown tensors {extra[:3]} (was it saved for this model?)")
    masks = {}
    for name in expected:
        arr = arrays[name]
        if tuple(arr.shape) != tuple(params[name].shape):
            raise ValueError(f"mask.file={str(path)!r}: tensor {name!r} has shape "
                             f"{tuple(arr.shape)}, the model's weight {tuple(params[name].shape)}")
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"mask.file={str(path)!r}: tensor {name!r} is not binary")
        masks[name] = torch.from_numpy(arr.astype(bool))
    return masks
