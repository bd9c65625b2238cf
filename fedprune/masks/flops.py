"""Parameter and FLOP counts that respect masks.

FLOPs are per example, counted on conv and linear layers only (BatchNorm, activations,
pooling and bias adds are a small fraction and left out), with one multiply-add = 2 FLOPs:

    conv:   2 * c_out * (c_in / groups) * kh * kw * h_out * w_out
    linear: 2 * n_in * n_out  (times the number of rows, e.g. tokens)

i.e. ``2 * weight.numel() * output positions``. With masks a layer's FLOPs scale by its
density (only kept multiply-adds are counted). Training FLOPs follow the accounting of RigL
(Evci et al. 2020, "Rigging the Lottery"): forward + backward w.r.t. activations + backward
w.r.t. weights, each about one inference pass, so training = 3 x inference FLOPs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .core import PRUNABLE_MODULES, Masks, check_masks, layer_densities, prunable_names


def count_params(model: nn.Module, masks: Masks | None = None) -> dict[str, float]:
    """Parameter counts: total, prunable (conv/linear weights), prunable kept, effective.

    Buffers are not parameters and are not counted. Prunable tensors without a mask count as
    fully kept.
    """
    masks = masks or {}
    check_masks(model, masks)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    names = prunable_names(model)
    prunable = sum(params[n].numel() for n in names)
    kept = sum(int(masks[n].sum()) if n in masks else params[n].numel() for n in names)
    return {
        "total": total,
        "prunable": prunable,
        "prunable_kept": kept,
        "effective": total - prunable + kept,
        "prunable_density": kept / prunable if prunable else 1.0,
    }


def _hook_dense_flops(model: nn.Module, flops: dict[str, float], batch: int) -> list:
    """Forward hooks adding each conv/linear call's per-example dense FLOPs to ``flops``."""
    handles = []
    for prefix, module in model.named_modules():
        if not isinstance(module, PRUNABLE_MODULES):
            continue
        name = f"{prefix}.weight" if prefix else "weight"

        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            out_units = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            positions = output.numel() // (batch * out_units)  # h_out * w_out, or rows
            flops[name] = flops.get(name, 0.0) + 2.0 * mod.weight.numel() * positions

        handles.append(module.register_forward_hook(hook))
    return handles


def _dense_layer_flops(model: nn.Module, input_shape: tuple[int, ...],
                       input_dtype: torch.dtype | None) -> dict[str, float]:
    """Run one dummy batch in eval mode and return per-example dense FLOPs per layer."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = input_dtype or (param.dtype if param is not None else torch.float32)
    modes = {m: m.training for m in model.modules()}
    flops: dict[str, float] = {}
    handles = _hook_dense_flops(model, flops, input_shape[0])
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return flops


def count_flops(model: nn.Module, input_shape: tuple[int, ...], masks: Masks | None = None,
                input_dtype: torch.dtype | None = None) -> dict:
    """Per-example conv/linear FLOPs for an input of ``input_shape`` (batch dim first).

    Returns ``inference`` (sparse), ``inference_dense``, ``training`` = 3 x inference,
    ``training_dense`` and ``layers``: weight name -> {dense, sparse, density}.
    ``input_dtype`` defaults to the parameters' dtype (pass ``torch.long`` for token ids).
    """
    if len(input_shape) < 2 or math.prod(input_shape) == 0:
        raise ValueError(f"input_shape={input_shape} must be (batch, ...) with no zero dim")
    masks = masks or {}
    check_masks(model, masks)
    dense = _dense_layer_flops(model, tuple(input_shape), input_dtype)
    density = layer_densities(masks)
    layers = {
        n: {"dense": f, "sparse": f * density.get(n, 1.0), "density": density.get(n, 1.0)}
        for n, f in dense.items()
    }
    inference = sum(v["sparse"] for v in layers.values())
    inference_dense = sum(dense.values())
    return {
        "inference": inference,
        "inference_dense": inference_dense,
        "training": 3.0 * inference,
        "training_dense": 3.0 * inference_dense,
        "layers": layers,
    }
