"""``mask-vote`` and ``l0-average``: each client prunes the whole model on its own text,
the server combines the clients' layers (``fedprune.prune.consensus``). One query round.

- ``mask-vote`` (FedPrLLM, Guo et al. 2025): clients send only their masks (packed bits,
  1 bit per weight); the server keeps, per comparison group (``method.compare``: the layer,
  as the paper recommends, or the output row; N:M groups with a pattern), the positions
  most clients kept, ties to the larger dense |weight|, and applies the mask to its dense
  weights (``method.scale``: times the fraction of clients that kept each weight, the
  paper's weight scaling, off by default).
- ``l0-average`` (FedSpaLLM, Bai et al. 2025): clients send their masks and kept weights;
  the server averages each position over the clients that kept it and cuts the mask back
  to the exact target per group. Per-client layer sampling is not implemented yet.

Clients prune sequentially (each block calibrated on the outputs of the client's own
pruned blocks), as FedPrLLM's clients do. Each client mask must keep exactly what its
pruner keeps at the target in every layer; a reply that does not is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import check_choice
from ..fl.replies import ReplyError, ReplySpec
from ..masks import wire
from ..masks.select import select_target
from ..prune.base import SparsityTarget
from ..prune.consensus import l0_average, mask_vote
from .base import ClientMethod, Query, register_method
from .pooled import LMMethod, LMMethodConfig, _dense, _pruner


@dataclass
class MaskVoteConfig(LMMethodConfig):
    name: str = "mask-vote"
    compare: str = "layer"  # the server's comparison group: layer | row
    scale: bool = False  # FedPrLLM's weight scaling

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.compare", self.compare, ("layer", "row"))


@dataclass
class L0AverageConfig(LMMethodConfig):
    name: str = "l0-average"
    compare: str = "layer"  # the group the averaged mask is cut back to: layer | row

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.compare", self.compare, ("layer", "row"))


class LocalPruneClient(ClientMethod):
    """Prune a copy of the dense model on this client's windows; send masks (and values)."""

    def answer(self, kind, partition_id, payload, config=None):
        if kind != "local-prune":
            return super().answer(kind, partition_id, payload, config)
        import copy

        from ..lm.clients import partition_text
        from ..prune.pipeline import prune_model
        from ..train import select_device

        cfg = self.cfg
        dense, tokenizer = _dense(cfg.method.model, cfg.data.cache_dir)
        windows = partition_text(cfg.text, cfg.data.num_clients, tokenizer, cfg.data.root,
                                 cfg.data.cache_dir)[partition_id].windows
        model = copy.deepcopy(dense)
        report = prune_model(model, _pruner(cfg.method), cfg.method.target(),
                             list(windows.split(1)), select_device(cfg.run.device),
                             sequential=True, progress=False)
        modules = dict(model.named_modules())
        masks = {n: m.numpy() for n, m in report.masks.items()}
        if cfg.method.name == "mask-vote":
            arrays = {f"mask/{n}": wire.pack_mask(m) for n, m in masks.items()}
        else:
            weights = {n: modules[n].weight.detach().float().cpu().numpy() for n in masks}
            arrays = wire.encode_down(weights, masks)
        return arrays, {"num-examples": len(windows)}


class _Local(LMMethod):
    client_cls = LocalPruneClient

    def queries(self):
        core, options = self.core, self.options
        modules = {n: m for b in core.adapter.blocks(core.model)
                   for n, m in core.adapter.prunable(b).items()}
        template = {n: (tuple(m.weight.shape), np.dtype("float32")) for n, m in modules.items()}
        replies = yield Query("local-prune", {}, ReplySpec(
            records={"arrays": self._decoder(template)},
            checks=[self._counts_match(modules)]))
        parts = [r.records["arrays"] for r in replies]
        target = options.target(options.compare)
        with torch.no_grad():
            for name, module in modules.items():
                adapter = core.adapter
                masks = [adapter.from_native(module, torch.from_numpy(p[1][name])) for p in parts]
                weight, _ = self._combine(adapter, module, name, parts, masks, target)
                adapter.set_matrix_(module, weight)
        return {"method": self.name, "pruner": options.pruner, "clients": len(parts),
                "contributors": [r.partition for r in replies]}

    def _decoder(self, template):
        raise NotImplementedError

    def _combine(self, adapter, module, name, parts, masks, target):
        raise NotImplementedError

    def _counts_match(self, modules):
        """Each client mask keeps, per layer, what its pruner keeps at the target."""
        pruner, target = _pruner(self.options), self.options.target()
        scope = target.scope if target.m else getattr(pruner.cfg, "scope", target.scope)
        own = SparsityTarget(target.sparsity, target.n, target.m, scope)
        expected = {n: int(select_target(torch.zeros(self.core.adapter.get_matrix(m).shape),
                                         own).sum()) for n, m in modules.items()}

        def check(reply) -> None:
            for name, mask in reply.records["arrays"][1].items():
                if int(mask.sum()) != expected[name]:
                    raise ReplyError(reply.client, f"arrays/mask/{name}", f"keeps "
                                     f"{int(mask.sum())} weights, the target keeps "
                                     f"{expected[name]}")
        return check


@register_method
class MaskVote(_Local):
    config_cls = MaskVoteConfig

    def _decoder(self, template):
        def decode(arrays, client, record):
            names = {k.split("/", 1)[1] for k in arrays}
            if names != set(template) or any(not k.startswith("mask/") for k in arrays):
                missing, extra = sorted(set(template) - names), sorted(names - set(template))
                raise ReplyError(client, record, f"masks missing {missing[:3]}, unexpected "
                                 f"{extra[:3]} (only mask/<layer> entries)")
            masks = {n: wire.unpack_mask(arrays[f"mask/{n}"], s, n, client)
                     for n, (s, _) in template.items()}
            return None, masks
        return decode

    def _combine(self, adapter, module, name, parts, masks, target):
        return mask_vote(masks, adapter.get_matrix(module).detach().float(), target,
                         self.options.scale)


@register_method
class L0Average(_Local):
    config_cls = L0AverageConfig

    def _decoder(self, template):
        return lambda arrays, client, record: wire.decode_down(arrays, template, client)

    def _combine(self, adapter, module, name, parts, masks, target):
        weights = [adapter.from_native(module, torch.from_numpy(p[0][name])) for p in parts]
        return l0_average(weights, masks, target)
