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
  to the exact target per group. ``method.sample_blocks`` < 1: FedSpaLLM's layer sampling,
  each client prunes only its share of the decoder blocks (:func:`sample_blocks`), leaves
  the others dense (its calibration inputs still pass through them) and sends only its
  pruned layers; each layer is averaged over the clients that pruned it.

Clients prune sequentially (each block calibrated on the outputs of the client's own
pruned blocks), as FedPrLLM's clients do. Each client mask must keep exactly what its
pruner keeps at the target in every layer; a reply that does not is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import check_choice, check_value
from ..fl.replies import ReplyError, ReplySpec
from ..masks import wire
from ..masks.select import select_target
from ..prune.base import SparsityTarget
from ..prune.consensus import l0_average, mask_vote
from .base import ClientMethod, Query, register_method
from .pooled import LMMethod, LMMethodConfig, _pruner


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
    sample_blocks: float = 1.0  # the share of the blocks each client prunes (1 = all)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.compare", self.compare, ("layer", "row"))
        check_value("method.sample_blocks", 0 < self.sample_blocks <= 1, "must be in (0, 1]",
                    self.sample_blocks)


def sample_blocks(num_blocks: int, num_clients: int, share: float, seed: int
                  ) -> list[list[int]]:
    """Each client's blocks under layer sampling: ``ceil(share * num_blocks)`` distinct
    blocks drawn uniformly (seeded), after a random permutation of all blocks has been
    dealt round-robin so that every block is pruned by at least one client. (FedSpaLLM's
    public reproduction does not ensure coverage: a block no client drew stayed dense and
    the model missed its sparsity. A client whose round-robin share exceeds the quota
    prunes that share.)"""
    rng = np.random.default_rng(seed)
    quota = max(1, math.ceil(share * num_blocks - 1e-9))
    plans = [set() for _ in range(num_clients)]
    for i, block in enumerate(rng.permutation(num_blocks)):
        plans[i % num_clients].add(int(block))
    for plan in plans:
        rest = [b for b in rng.permutation(num_blocks) if int(b) not in plan]
        plan.update(int(b) for b in rest[:max(0, quota - len(plan))])
    return [sorted(plan) for plan in plans]


def client_blocks(cfg, num_blocks: int, partition_id: int) -> list[int]:
    """The blocks client ``partition_id`` prunes (all of them without layer sampling)."""
    share = getattr(cfg.method, "sample_blocks", 1.0)
    if share >= 1:
        return list(range(num_blocks))
    return sample_blocks(num_blocks, cfg.data.num_clients, share, cfg.run.seed)[partition_id]


class LocalPruneClient(ClientMethod):
    """Prune a copy of the dense model on this client's windows; send masks (and values)."""

    def answer(self, kind, partition_id, payload, config=None):
        if kind != "local-prune":
            return super().answer(kind, partition_id, payload, config)
        import copy

        from ..fl.oneshot import client_batches, examples, load_dense
        from ..prune.adapters import adapter_for
        from ..prune.pipeline import prune_model
        from ..train import select_device

        cfg = self.cfg
        dense, tokenizer = load_dense(cfg)
        batches = client_batches(cfg, partition_id, tokenizer)
        model = copy.deepcopy(dense)
        blocks = client_blocks(cfg, len(adapter_for(model).blocks(model)), partition_id)
        report = prune_model(model, _pruner(cfg.method), cfg.method.target(),
                             batches, select_device(cfg.run.device),
                             sequential=True, progress=False, only=set(blocks))
        modules = dict(model.named_modules())
        masks = {n: m.numpy() for n, m in report.masks.items()}
        if cfg.method.name == "mask-vote":
            arrays = {f"mask/{n}": wire.pack_mask(m) for n, m in masks.items()}
        else:
            weights = {n: modules[n].weight.detach().float().cpu().numpy() for n in masks}
            arrays = wire.encode_down(weights, masks)
        return arrays, {"num-examples": examples(batches), "blocks": len(blocks)}


class _Local(LMMethod):
    client_cls = LocalPruneClient

    def queries(self):
        core, options = self.core, self.options
        blocks = core.adapter.blocks(core.model)
        modules = {n: m for b in blocks for n, m in core.adapter.prunable(b).items()}
        owner = {n: b.index for b in blocks for n in core.adapter.prunable(b)}
        template = {n: (tuple(m.weight.shape), np.dtype("float32")) for n, m in modules.items()}
        replies = yield Query("local-prune", {}, ReplySpec(
            records={"arrays": self._decoder(template)},
            checks=[self._counts_match(modules), self._blocks_match(owner, len(blocks))]))
        parts = [r.records["arrays"] for r in replies]
        target = options.target(options.compare)
        pruned_by = {}
        with torch.no_grad():
            for name, module in modules.items():
                adapter = core.adapter
                have = [p for p in parts if name in p[1]]  # the clients that pruned it
                if not have:
                    raise ValueError(f"layer {name}: no accepted client pruned block "
                                     f"{owner[name]}; it cannot be combined")
                masks = [adapter.from_native(module, torch.from_numpy(p[1][name])) for p in have]
                weight, _ = self._combine(adapter, module, name, have, masks, target)
                adapter.set_matrix_(module, weight)
                pruned_by[owner[name]] = len(have)
        return {"method": self.name, "pruner": options.pruner, "clients": len(parts),
                "contributors": [r.partition for r in replies],
                "clients_per_block": [pruned_by[b.index] for b in blocks]}

    def _decoder(self, template):
        raise NotImplementedError

    def _blocks_match(self, owner: dict[str, int], num_blocks: int):
        """A reply holds whole blocks: exactly those its client was to prune."""
        def check(reply) -> None:
            want = client_blocks(self.cfg, num_blocks, reply.partition)
            layers = {n for n, b in owner.items() if b in set(want)}
            got = set(reply.records["arrays"][1])
            if got != layers:
                raise ReplyError(reply.client, "arrays", f"layers of blocks "
                                 f"{sorted({owner[n] for n in got})[:5]}..., the client was "
                                 f"to prune blocks {want[:5]}... (missing "
                                 f"{sorted(layers - got)[:2]}, extra {sorted(got - layers)[:2]})")
        return check

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
            if not names <= set(template) or any(not k.startswith("mask/") for k in arrays):
                extra = sorted(names - set(template))
                raise ReplyError(client, record, f"unexpected entries {extra[:3]} (only "
                                 f"mask/<layer> entries of the model's prunable layers)")
            masks = {n: wire.unpack_mask(arrays[f"mask/{n}"], template[n][0], n, client)
                     for n in names}
            return None, masks
        return decode

    def _combine(self, adapter, module, name, parts, masks, target):
        return mask_vote(masks, adapter.get_matrix(module).detach().float(), target,
                         self.options.scale)


@register_method
class L0Average(_Local):
    config_cls = L0AverageConfig

    def _decoder(self, template):
        def decode(arrays, client, record):  # the layers it sent; _blocks_match checks which
            names = {k.split("/", 1)[1] for k in arrays}
            extra = sorted(names - set(template))
            if extra:
                raise ReplyError(client, record, f"unknown layers {extra[:3]}")
            return wire.decode_down(arrays, {n: template[n] for n in names}, client)
        return decode

    def _combine(self, adapter, module, name, parts, masks, target):
        weights = [adapter.from_native(module, torch.from_numpy(p[0][name])) for p in parts]
        return l0_average(weights, masks, target)
