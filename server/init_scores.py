"""Client-scored masks at initialisation (SNIP, SynFlow) as one query round.

The server sends the dense initial model; each client scores it on its own data and
returns either its scores (``mask.consensus=average``: the server takes the example-
weighted mean and a global top-k) or its own top-k mask (``vote``: the server ranks
positions by example-weighted vote share, then takes the global top-k, so the density
is exact). Malformed replies are rejected with the reason logged.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
import torch
from flwr.common import log
from flwr.serverapp import Grid

from fedprune.config import ExperimentConfig
from fedprune.fl.consensus import average_scores
from fedprune.fl.server_core import SparseServer
from fedprune.masks import wire
from fedprune.masks.saliency import masks_from_scores

from .query import ask, wait_for_nodes
from .records import to_numpy


def client_scored_masks(grid: Grid, cfg: ExperimentConfig, core: SparseServer) -> dict:
    """Install the consensus mask of the clients' SNIP/SynFlow scores; return a record."""
    nodes = wait_for_nodes(grid, cfg.data.num_clients)
    meter = {"bytes_down": 0, "bytes_up": 0}
    payload = core.encode_down(core.state)  # dense at this point: masks are all ones
    shapes = {n: m.shape for n, m in core.masks.items()}
    parts, counts = [], []
    for msg in ask(grid, cfg, nodes, "scores", payload, meter):
        client = f"node {msg.metadata.src_node_id}"
        try:
            parts.append(_parse(to_numpy(msg.content["arrays"]), shapes, cfg.mask.consensus,
                                client))
            counts.append(int(msg.content["metrics"]["num-examples"]))
        except (KeyError, ValueError) as err:
            log(WARNING, "rejected %s scores: %s", cfg.mask.init, err)
    if not parts:
        raise RuntimeError(f"mask.init={cfg.mask.init}: no client returned valid scores")
    merged = {n: torch.from_numpy(average_scores([p[n] for p in parts], counts)).float()
              for n in shapes}
    masks = masks_from_scores(merged, cfg.mask.density)
    core.set_masks(masks, core.state)
    log(INFO, "%s masks from %d clients (%s consensus)", cfg.mask.init, len(parts),
        cfg.mask.consensus)
    return {"method": cfg.mask.init, "consensus": cfg.mask.consensus,
            "clients": len(parts), **meter}


def _parse(arrays: dict, shapes: dict, consensus: str, client: str) -> dict[str, np.ndarray]:
    """Scores (float, finite, >= 0) or a packed own mask per masked tensor, strictly."""
    prefix = "mask/" if consensus == "vote" else "score/"
    if sorted(arrays) != sorted(prefix + n for n in shapes):
        raise ValueError(f"{client}: reply tensors {sorted(arrays)[:3]}..., expected "
                         f"{prefix}<name> for each of {len(shapes)} masked tensors")
    if consensus == "vote":
        return {n: wire.unpack_mask(arrays[f"mask/{n}"], s, n, client).astype(np.float64)
                for n, s in shapes.items()}
    out = {}
    for name, shape in shapes.items():
        arr = np.asarray(arrays[f"score/{name}"])
        if arr.shape != tuple(shape) or not np.isfinite(arr).all() or (arr < 0).any():
            raise ValueError(f"{client}: score tensor {name!r} must be finite, >= 0, shape "
                             f"{tuple(shape)}; got shape {arr.shape}")
        out[name] = arr
    return out
