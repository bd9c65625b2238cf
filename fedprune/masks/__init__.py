"""Masks over prunable tensors: selection, initialisation, counts and the wire encoding.

Flower-free (numpy + torch). See ``core`` (masks, applying, densities), ``allocate``
(per-layer budgets: uniform, ERK), ``select`` (exact top-k), ``init`` (registered
initialisers), ``flops`` (mask-aware parameter/FLOP counts) and ``wire`` (payloads).
"""

from .allocate import erk_counts, erk_densities, largest_remainder, uniform_counts
from .core import (
    Masks,
    apply_masks_,
    check_masks,
    full_masks,
    global_density,
    kept_counts,
    layer_densities,
    mask_grads_,
    prunable_names,
)
from .flops import count_flops, count_params
from .init import MASK_INITS, get_mask_init, init_masks, mask_init_names, register_mask_init
from .select import select_global, select_per_layer, topk_mask
from .wire import (
    WireError,
    check_binary,
    decode_down,
    decode_sparse,
    decode_up,
    encode_down,
    encode_sparse,
    encode_up,
    pack_mask,
    payload_nbytes,
    template_of,
    unpack_mask,
)

__all__ = [
    "Masks", "prunable_names", "full_masks", "apply_masks_", "mask_grads_", "layer_densities",
    "global_density", "kept_counts", "check_masks",
    "largest_remainder", "uniform_counts", "erk_densities", "erk_counts",
    "topk_mask", "select_per_layer", "select_global",
    "MASK_INITS", "register_mask_init", "get_mask_init", "mask_init_names", "init_masks",
    "count_params", "count_flops",
    "WireError", "pack_mask", "unpack_mask", "check_binary", "encode_down", "decode_down",
    "encode_up", "decode_up", "encode_sparse", "decode_sparse", "payload_nbytes", "template_of",
]
