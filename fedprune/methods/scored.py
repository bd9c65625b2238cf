"""``snip`` and ``synflow``: masks at initialisation scored by the clients on their own data.

One query round before training: the server sends the dense initial model; each client
scores it (SNIP, Lee et al. 2019: |g ⊙ w| averaged over ``score_batches`` local batches;
SynFlow, Tanaka et al. 2020: data-free, so every client returns the same scores, through
the same path so bytes and code match) and returns either its scores
(``consensus=average``: the server takes the example-weighted mean and an exact global
top-k) or its own top-k mask (``vote``: the server ranks positions by example-weighted
vote share, then takes the global top-k, so the density is exact). The mask then stays
fixed. Scores must be finite and >= 0; masks are packed bits (strict wire decoding).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..config import MethodConfig, check_choice, check_value
from ..fl.replies import ReplySpec, Tensor, tensors
from ..masks import wire
from ..masks.saliency import masks_from_scores, snip_scores, synflow_scores
from .base import ClientMethod, Method, Query, register_method

CONSENSUS = ("average", "vote")


@dataclass
class SnipConfig(MethodConfig):
    name: str = "snip"
    # average: example-weighted mean of the scores, then global top-k; vote: each
    # client's own top-k mask, ranked by example-weighted vote share
    consensus: str = "average"
    score_batches: int = 4  # local batches each client scores (0 = its whole partition)

    def __post_init__(self) -> None:
        check_choice("method.consensus", self.consensus, CONSENSUS)
        check_value("method.score_batches", self.score_batches >= 0, "must be >= 0",
                    self.score_batches)


@dataclass
class SynFlowConfig(MethodConfig):
    name: str = "synflow"
    consensus: str = "average"

    def __post_init__(self) -> None:
        check_choice("method.consensus", self.consensus, CONSENSUS)


class ScoredClient(ClientMethod):
    def answer(self, kind, partition_id, payload, config=None):
        if kind != "scores":
            return super().answer(kind, partition_id, payload, config)
        from ..data import client_split, make_loader
        from ..fl.client_core import prepare_model
        from ..models import input_shape
        from ..train import select_device

        cfg = self.cfg
        model, masks = prepare_model(cfg, payload)
        data = client_split(cfg.data, partition_id)
        device = select_device(cfg.run.device)
        names = list(masks)
        if cfg.method.name == "snip":
            loader = make_loader(data, cfg.data.dataset, cfg.train.batch_size, shuffle=True,
                                 augment=False, seed=cfg.run.seed * 100_003 + partition_id)
            batches = list(itertools.islice(loader, cfg.method.score_batches or None))
            scores = snip_scores(model, batches, names, device)
        else:
            scores = synflow_scores(model, input_shape(cfg.data.dataset), names,
                                    cfg.mask.density, device=device)
        if cfg.method.consensus == "vote":
            own = masks_from_scores(scores, cfg.mask.density)
            arrays = {f"mask/{n}": wire.pack_mask(m.cpu().numpy()) for n, m in own.items()}
        else:
            arrays = {f"score/{n}": s.cpu().numpy().astype(np.float32) for n, s in scores.items()}
        return arrays, {"num-examples": len(data)}


class _Scored(Method):
    client_cls = ScoredClient

    def queries(self):
        core, opts = self.core, self.options
        shapes = {n: m.shape for n, m in core.masks.items()}
        replies = yield Query("scores", core.encode_down(core.state),
                              ReplySpec(records={"arrays": self._decoder(shapes)}))
        parts = [r.records["arrays"] for r in replies]
        counts = [r.examples for r in replies]
        merged = {n: torch.from_numpy(self.combine_scores([p[n] for p in parts], counts)).float()
                  for n in shapes}
        core.set_masks(masks_from_scores(merged, self.cfg.mask.density), core.state)
        return {"method": self.name, "consensus": opts.consensus, "clients": len(parts)}

    def _decoder(self, shapes: dict[str, tuple]):
        """Scores (finite, >= 0) or packed own masks, one per masked tensor, strictly."""
        if self.options.consensus == "average":
            scores = tensors({f"score/{n}": Tensor(tuple(s), "float", low=0.0)
                              for n, s in shapes.items()})

            def decode_scores(arrays, client, record):
                checked = scores(arrays, client, record)
                return {n: checked[f"score/{n}"] for n in shapes}
            return decode_scores
        packed = tensors({f"mask/{n}": Tensor((-(-int(np.prod(s)) // 8),), "uint8")
                          for n, s in shapes.items()})

        def decode(arrays, client, record):
            packed(arrays, client, record)
            return {n: wire.unpack_mask(arrays[f"mask/{n}"], s, n, client).astype(np.float64)
                    for n, s in shapes.items()}
        return decode


@register_method
class Snip(_Scored):
    config_cls = SnipConfig


@register_method
class SynFlow(_Scored):
    config_cls = SynFlowConfig
