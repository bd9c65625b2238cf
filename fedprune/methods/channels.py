"""``channel-prune``: physical channel pruning of a CNN in the middle of sparse FedAvg.

The run trains the dense (or masked) CNN as usual; after aggregating round
``method.prune_round`` the server removes whole channels (``fedprune.prune.structured``:
channel spaces traced from the model, residual-tied channels together) and every later
round trains the smaller model: the payloads shrink, and so do the clients' FLOPs and
memory. The clients learn the new shapes from the payload (``channels/<space>`` entries)
and build their model in them.

Criteria: ``l1``/``l2`` need nothing but the weights (the server decides alone);
``taylor*`` and ``beta-rank`` read the clients' data: in the pruning round each client also
sends, computed on the global model it received (before its local training) over its
first ``method.evidence_batches`` training batches, the plain sums the criterion needs
(gradient sums of the grouped layers' weights with the example count; Beta-Rank's input and
output spread sums of the producing layers). The server adds them up (the evidence of the
union of the clients' batches) and scores the aggregate of the round with it: the evidence
describes the model the clients received at the start of the round, the weights it
multiplies are the round's aggregate (one round of training apart; computing the evidence
on the aggregate itself would cost one more round of messages). Allocation as
``fedprune shrink``: the same ratio per channel space, or adaptive.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, MethodConfig, check_value
from ..fl.replies import ReplyError, Tensor, tensors
from .base import ClientMethod, Method, Outcome, Plan, TrainingHooks, register_method

EVIDENCE = "evidence"


@dataclass
class ChannelPruneConfig(MethodConfig):
    name: str = "channel-prune"
    criterion: str = "l1"  # l1 | l2 | taylor | taylor-vector | taylor-second | taylor-mix | beta-rank
    fraction: float = 0.3  # share of the model's parameters removed
    allocation: str = "uniform"  # uniform | adaptive
    prune_round: int = 1  # channels go after this round's aggregation
    residual: str = "group"  # residual-tied channels pruned together, or "skip"
    evidence_batches: int = 4  # training batches each client computes its evidence on

    def __post_init__(self) -> None:
        self.structured()
        check_value("method.prune_round", self.prune_round >= 1, "must be >= 1",
                    self.prune_round)
        check_value("method.evidence_batches", self.evidence_batches >= 1, "must be >= 1",
                    self.evidence_batches)

    def structured(self):
        from ..prune.structured.importance import get_criterion
        from ..prune.structured.job import StructuredConfig

        try:
            crit = get_criterion(self.criterion)
            cfg = StructuredConfig(self.criterion, self.allocation, self.fraction,
                                   residual=self.residual)
        except ValueError as err:
            raise ConfigError(f"method.{str(err).removeprefix('structured.')}") from None
        if crit.needs:
            raise ConfigError(f"method.criterion={self.criterion!r} reads layer input "
                              "statistics; federated channel pruning supports l1, l2, the "
                              "taylor variants and beta-rank")
        return cfg


def _groups(model):
    from ..prune.adapters import adapter_for

    return adapter_for(model).structure_groups(model, residual="group")


def _evidence_layers(model, cfg: ChannelPruneConfig) -> tuple[list[str], list[str]]:
    """(layers whose weight gradients are sent, layers whose Beta-Rank sums are sent)."""
    from ..prune.structured.importance import get_criterion
    from ..prune.structured.job import candidate_groups

    crit = get_criterion(cfg.criterion)
    groups = candidate_groups(model, cfg.structured())
    grads = sorted({m.module for gs in groups for m in gs.members}) if crit.grads else []
    modules = dict(model.named_modules())
    beta = sorted({m.module for gs in groups for m in gs.members if m.axis == "out"
                   and isinstance(modules[m.module], (torch.nn.Conv2d, torch.nn.Linear))}) \
        if crit.beta else []
    return grads, beta


class _EvidenceHooks(TrainingHooks):
    """Keeps the received global model; after local training, computes the evidence on it."""

    def __init__(self, cfg, model, device) -> None:
        self.cfg, self.device = cfg, device
        self.model = copy.deepcopy(model)  # the global model as received

    def finish(self, batches):
        from ..prune.structured.evidence import (
            classification_loss,
            collect_beta_stats,
            collect_gradients,
        )

        options = self.cfg.method
        grads, beta = _evidence_layers(self.model, options)
        data = []
        for i, (x, y) in enumerate(batches):
            if i == options.evidence_batches:
                break
            data.append((x.to(self.device), y.to(self.device)))
        out: dict[str, np.ndarray] = {"examples": np.array(sum(len(y) for _, y in data),
                                                           np.int64)}
        if grads:
            from ..prune.structured.importance import get_criterion

            second = get_criterion(options.criterion).grads == "second"
            ev = collect_gradients(self.model, data, grads, second, classification_loss,
                                   self.device)
            out.update({f"grad/{n}": g.float().numpy() for n, g in ev.grad_sum.items()})
            out.update({f"gradsq/{n}": g.float().numpy() for n, g in ev.sq_sum.items()})
        for name, b in (collect_beta_stats(self.model, data, beta, self.device).items()
                        if beta else []):
            out.update({f"beta/{name}/in_sum": b.in_sum.numpy(),
                        f"beta/{name}/in_sq": b.in_sq.numpy(),
                        f"beta/{name}/in_count": np.array(b.in_count, np.int64),
                        f"beta/{name}/out_sum": b.out_sum.numpy(),
                        f"beta/{name}/out_sq": b.out_sq.numpy()})
        return None, {EVIDENCE: out}


class ChannelPruneClient(ClientMethod):
    def training(self, plan, extras, model, masks, device):
        if not plan.get(EVIDENCE):
            return None
        return _EvidenceHooks(self.cfg, model, device)


@register_method
class ChannelPrune(Method):
    config_cls = ChannelPruneConfig
    client_cls = ChannelPruneClient

    def plan(self, server_round: int) -> Plan | None:
        if server_round != self.options.prune_round:
            return None
        grads, beta = _evidence_layers(self.core.model, self.options)
        if not (grads or beta):
            return Plan()  # data-free criterion: the server decides alone
        return Plan(config={EVIDENCE: 1}, replies={EVIDENCE: self._decoder(grads, beta)},
                    checks=[self._counts_match(beta)])

    def _counts_match(self, beta: list[str]):
        """A client's evidence covers ``evidence_batches`` of its batches (all its images if
        it has fewer), and each Beta-Rank patch count is those images x the patch size:
        a wrong count would rescale every client's sums."""
        modules = dict(self.core.model.named_modules())
        per_image = {n: modules[n].weight[0].numel() for n in beta}  # in/g * kh * kw, or in
        quota = self.options.evidence_batches * self.cfg.train.batch_size

        def check(reply) -> None:
            arrays = reply.records[EVIDENCE]
            want = min(quota, reply.examples)
            if int(arrays["examples"]) != want:
                raise ReplyError(reply.client, f"{EVIDENCE}/examples", f"{int(arrays['examples'])}"
                                 f" images, expected {want} ({self.options.evidence_batches} "
                                 f"batches of {self.cfg.train.batch_size}, {reply.examples} "
                                 "in the partition)")
            for name in beta:
                got = int(arrays[f"beta/{name}/in_count"])
                if got != want * per_image[name]:
                    raise ReplyError(reply.client, f"{EVIDENCE}/beta/{name}/in_count",
                                     f"{got}, expected {want} images x {per_image[name]}")
        return check

    def _decoder(self, grads: list[str], beta: list[str]):
        """Finite sums of the right shapes; squared sums non-negative; counts bounded."""
        from ..prune.structured.importance import get_criterion

        modules = dict(self.core.model.named_modules())
        second = get_criterion(self.options.criterion).grads == "second"
        specs = {"examples": Tensor((), "int", low=1)}
        for name in grads:
            shape = tuple(modules[name].weight.shape)
            specs[f"grad/{name}"] = Tensor(shape, "float")
            if second:
                specs[f"gradsq/{name}"] = Tensor(shape, "float", low=0.0)
        for name in beta:
            k, positions = self._beta_shape(name)
            specs[f"beta/{name}/in_sum"] = Tensor((positions,), "float")
            specs[f"beta/{name}/in_sq"] = Tensor((positions,), "float", low=0.0)
            specs[f"beta/{name}/in_count"] = Tensor((), "int", low=1)
            specs[f"beta/{name}/out_sum"] = Tensor((k, positions), "float")
            specs[f"beta/{name}/out_sq"] = Tensor((k, positions), "float", low=0.0)
        return tensors(specs)

    def _beta_shape(self, name: str) -> tuple[int, int]:
        """(filters, output positions) of a producer layer, from one probe image."""
        from ..models.registry import input_shape
        from ..prune.structured.evidence import collect_beta_stats

        device = next(self.core.model.parameters()).device
        probe = torch.zeros(1, *input_shape(self.cfg.data.dataset))
        b = collect_beta_stats(self.core.model, [probe], [name], device)[name]
        return tuple(b.out_sum.shape)

    def combine(self, server_round, plan, replies, aggregated):
        from ..fl.server_core import load_state_
        from ..prune.structured.importance import Evidence, get_criterion
        from ..prune.structured.job import candidate_groups, plan_keep

        assert aggregated is not None
        core, scfg = self.core, self.options.structured()
        load_state_(core.model, aggregated)
        evidence = self._evidence([r.records[EVIDENCE] for r in replies]) if plan.replies \
            else None
        groups = candidate_groups(core.model, scfg)
        crit = get_criterion(scfg.criterion)
        modules = dict(core.model.named_modules())
        scores = {gs.name: crit.scores(gs, modules, evidence or Evidence())
                  for gs in groups}
        keep, _ = plan_keep(core.model, groups, scores, scfg)
        before = sum(int(np.asarray(v).size) for v in core.state.values())
        core.restructure_({n: int(k.numel()) for n, k in keep.items()}, keep)
        after = sum(int(np.asarray(v).size) for v in core.state.values())
        return Outcome(core.state, moved="channels", k=before - after)

    @staticmethod
    def _evidence(parts: list[dict[str, np.ndarray]]):
        from ..prune.structured.evidence import BetaStats, GradEvidence
        from ..prune.structured.importance import Evidence

        def total(key: str) -> torch.Tensor:
            return sum(torch.from_numpy(np.asarray(p[key], np.float64)) for p in parts)

        examples = sum(int(p["examples"]) for p in parts)
        names = [k[5:] for k in parts[0] if k.startswith("grad/")]
        grads = GradEvidence({n: total(f"grad/{n}") for n in names},
                             {n: total(f"gradsq/{n}") for n in names
                              if f"gradsq/{n}" in parts[0]}, examples, examples) \
            if names else None
        producers = sorted({k.split("/")[1] for k in parts[0] if k.startswith("beta/")})
        beta = {n: BetaStats(total(f"beta/{n}/in_sum"), total(f"beta/{n}/in_sq"),
                             int(sum(int(p[f"beta/{n}/in_count"]) for p in parts)),
                             total(f"beta/{n}/out_sum"), total(f"beta/{n}/out_sq"), examples)
                for n in producers} or None
        return Evidence(grads=grads, beta=beta)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"channels/{n}": np.array(c, np.int64) for n, c in self.core.channels.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        bad = [k for k in state if not k.startswith("channels/")]
        if bad:
            raise ReplyError("checkpoint", bad[0], "channel-prune keeps only channel counts")
        if state:
            self.core.restructure_({k[len("channels/"):]: int(v) for k, v in state.items()})

