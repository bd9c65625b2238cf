"""``structured``: federated structured (width) pruning of a language model. One query round.

Each client computes, on its own text, the evidence its criterion reads
(``fedprune.prune.structured``): for Wanda-sp and FLAP the input statistics of each head's
and MLP's output projection (squared column sums, column sums, row counts); for the Taylor
criteria the gradient sums ``sum_j n_j g_j`` of every grouped layer's weight (and, for the
second-order ones, ``sum_j g_j^2``) with the token and sample counts; for L1/L2 nothing.
All are plain sums, so the server's total equals the evidence of the union of the clients'
text (statistics exactly: float64 on the wire; gradient sums up to their float32 rounding
on the wire, which the tests bound at 1e-4 relative in the resulting logits). The server runs ``shrink`` on the summed evidence (the same code as ``fedprune
shrink``): one consensus structure, physically removed; the smaller model is saved with
``save_pretrained`` (plain transformers when its shapes are uniform).

What travels up per client: statistics criteria send float64 vectors of the output
projections' input width (squared sums; FLAP and bias compensation also the sums) plus an
int64 count per layer (SmolLM2-135M: ~0.5-1 MB); Taylor
criteria send float32 gradient sums the size of the grouped weights (SmolLM2-135M: ~425 MB,
twice that for second order): the price of exact federated Taylor importance. Nothing goes
down but the query. ``method.pruner``/``sparsity``/``pattern`` are not used here
(``method.fraction`` sets how much is removed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, check_value
from ..fl.replies import ReplyError, ReplySpec, Tensor, tensors
from ..prune.base import LayerStats
from .base import ClientMethod, Query, register_method
from .pooled import LMMethod, LMMethodConfig


@dataclass
class StructuredMethodConfig(LMMethodConfig):
    name: str = "structured"
    criterion: str = "flap"  # l1 | l2 | taylor* | wanda-sp | flap (prune.structured.importance)
    allocation: str = "uniform"  # uniform | adaptive
    fraction: float = 0.2  # share of the decoder's parameters removed
    prune: str = "both"  # both | heads | mlp
    heads: str = "kv"  # kv | query
    skip_first: int = 0
    skip_last: int = 0
    bias_compensation: bool = False
    round_to: int = 32
    # federated LoRA recovery of the smaller model: rounds of local adapter training
    # (recover_steps steps per client per round), adapters averaged by example count
    recover_rounds: int = 0
    recover_steps: int = 10
    recover_lr: float = 3e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_value("method.recover_rounds", self.recover_rounds >= 0, "must be >= 0",
                    self.recover_rounds)
        check_value("method.recover_steps", self.recover_steps >= 1, "must be >= 1",
                    self.recover_steps)
        check_value("method.recover_lr", self.recover_lr > 0, "must be > 0", self.recover_lr)
        if self.model == "cnn":
            raise ConfigError("method.name=structured prunes a language model; CNN channel "
                              "pruning runs centrally (fedprune.prune.structured.shrink)")
        self.structured()  # ConfigError naming the key

    def recovery(self):
        from ..prune.structured.recovery import LoraRecoveryConfig

        return LoraRecoveryConfig(steps=self.recover_steps, lr=self.recover_lr, dropout=0.0)

    def structured(self):
        from ..prune.structured.job import StructuredConfig

        try:
            return StructuredConfig(self.criterion, self.allocation, self.fraction, self.prune,
                                    self.heads, self.skip_first, self.skip_last,
                                    self.bias_compensation, round_to=self.round_to)
        except ValueError as err:
            raise ConfigError(f"method.{str(err).removeprefix('structured.')}") from None


def encode_evidence(ev, stats_layers: list[str]) -> dict[str, np.ndarray]:
    """A client's evidence for the wire (see the module docstring)."""
    out: dict[str, np.ndarray] = {}
    for name in stats_layers:
        s = ev.stats[name]
        out[f"sq/{name}"] = s.sq_norm.cpu().numpy()
        if s.col_sum is not None:
            out[f"sum/{name}"] = s.col_sum.cpu().numpy()
        out[f"rows/{name}"] = np.array(s.rows, dtype=np.int64)
    if ev.grads is not None:
        for name, g in ev.grads.grad_sum.items():
            out[f"grad/{name}"] = g.float().numpy()
        for name, g in ev.grads.sq_sum.items():
            out[f"gradsq/{name}"] = g.float().numpy()
        out["tokens"] = np.array(ev.grads.tokens, dtype=np.int64)
        out["samples"] = np.array(ev.grads.samples, dtype=np.int64)
    return out


class StructuredClient(ClientMethod):
    """Compute this client's evidence on its own windows and send it."""

    def answer(self, kind, partition_id, payload, config=None):
        if kind == "structured-recover":
            return self._recover(partition_id, payload)
        if kind != "structured-evidence":
            return super().answer(kind, partition_id, payload, config)
        from ..fl.oneshot import client_batches, examples, load_dense
        from ..prune.structured.job import candidate_groups, gather_evidence
        from ..train import select_device

        cfg = self.cfg
        scfg = cfg.method.structured()
        model, tokenizer = load_dense(cfg)
        batches = client_batches(cfg, partition_id, tokenizer)
        groups = candidate_groups(model, scfg)
        ev = gather_evidence(model, groups, scfg, batches, select_device(cfg.run.device))
        model.zero_grad(set_to_none=True)
        return encode_evidence(ev, _stats_layers(groups, scfg)), {
            "num-examples": examples(batches)}


    def _recover(self, partition_id, payload):
        """One round of local adapter training on the server's smaller model (rebuilt here
        from the dense model with the kept units and biases the payload carries)."""
        from ..fl.oneshot import client_batches, examples, load_dense
        from ..prune.structured.recovery import (
            adapter_state,
            load_adapter_state_,
            train_lora_,
            wrap_lora,
        )

        cfg = self.cfg
        dense, tokenizer = load_dense(cfg)
        model = pruned_copy(dense, cfg.method.structured(), payload)
        rcfg = cfg.method.recovery()
        peft_model = wrap_lora(model, rcfg, cfg.run.seed)
        load_adapter_state_(peft_model, {k[5:]: torch.from_numpy(np.asarray(v))
                                         for k, v in payload.items() if k.startswith("lora/")})
        batches = client_batches(cfg, partition_id, tokenizer)
        train_lora_(peft_model, torch.cat(batches), rcfg)
        return ({f"lora/{k}": v.float().numpy() for k, v in adapter_state(peft_model).items()},
                {"num-examples": examples(batches)})


def pruned_copy(dense, scfg, payload: dict[str, np.ndarray]):
    """The server's pruned model rebuilt from the dense one: ``keep/<group set>`` unit
    indices (the same surgery) and ``bias/<layer>`` biases (FLAP's compensation)."""
    import copy

    from ..prune.adapters import adapter_for
    from ..prune.structured.job import candidate_groups
    from ..prune.structured.surgery import remove_units_

    model = copy.deepcopy(dense)
    groups = candidate_groups(model, scfg)
    keep = {k[5:]: torch.from_numpy(np.asarray(v, np.int64)) for k, v in payload.items()
            if k.startswith("keep/")}
    biases = {k[5:]: v for k, v in payload.items() if k.startswith("bias/")}
    if biases:
        adapter_for(model).enable_biases_(model)
    remove_units_(model, groups, keep)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, value in biases.items():
            modules[name].bias.copy_(torch.from_numpy(np.asarray(value)))
    return model


def _stats_layers(groups, scfg) -> list[str]:
    """Layers whose input statistics the server needs (stats members), in order."""
    from ..prune.structured.importance import get_criterion

    if not (get_criterion(scfg.criterion).needs or scfg.bias_compensation):
        return []
    return list(dict.fromkeys(m.module for gs in groups for m in gs.stats_members))


@register_method
class Structured(LMMethod):
    config_cls = StructuredMethodConfig
    client_cls = StructuredClient

    def queries(self):
        from ..prune.structured.importance import get_criterion
        from ..prune.structured.job import candidate_groups, shrink

        core, scfg = self.core, self.options.structured()
        groups = candidate_groups(core.model, scfg)
        crit = get_criterion(scfg.criterion)
        if crit.beta:
            raise ConfigError("method.criterion=beta-rank ranks CNN filters; choose a "
                              "transformer criterion")
        stats_layers = _stats_layers(groups, scfg)
        grad_layers = sorted({m.module for gs in groups for m in gs.members}) \
            if crit.grads else []
        sums = "col_sum" in crit.needs or scfg.bias_compensation
        replies = yield Query("structured-evidence", {}, self._spec(
            stats_layers, sums, grad_layers, crit.grads == "second"))
        evidence = self._sum([r.records["arrays"] for r in replies], stats_layers)
        report = shrink(core.model, scfg, evidence=evidence, device=core.device)
        record = {"method": self.name, "criterion": scfg.criterion, **report.as_dict(),
                  "contributors": [r.partition for r in replies]}
        if self.options.recover_rounds:
            record["recovery"] = yield from self._recover(report.keep, stats_layers)
        return record

    def _recover(self, keep: dict[str, torch.Tensor], stats_layers: list[str]):
        """Federated LoRA recovery: each round the clients train the adapters a few steps on
        their own windows and the server averages them by example count (FedAvg of LoRA A
        and B, as FedIT does); at the end the adapters are merged into the smaller model."""
        from ..prune.structured.recovery import (
            adapter_state,
            load_adapter_state_,
            merge_lora,
            wrap_lora,
        )

        core, options = self.core, self.options
        modules = dict(core.model.named_modules())
        fixed = {f"keep/{n}": k.numpy().astype(np.int64) for n, k in keep.items()}
        if options.bias_compensation:
            fixed.update({f"bias/{n}": modules[n].bias.detach().cpu().numpy()
                          for n in stats_layers})
        peft_model = wrap_lora(core.model, options.recovery(), self.cfg.run.seed)
        state = adapter_state(peft_model)
        rounds = []
        for _ in range(options.recover_rounds):
            spec = ReplySpec(records={"arrays": tensors({f"lora/{k}": Tensor(tuple(v.shape),
                                                                             "float")
                                                         for k, v in state.items()})})
            replies = yield Query("structured-recover", {
                **fixed, **{f"lora/{k}": v.numpy() for k, v in state.items()}}, spec)
            total = sum(r.examples for r in replies)
            state = {k: sum(torch.from_numpy(np.asarray(r.records["arrays"][f"lora/{k}"],
                                                        np.float64)) * r.examples
                            for r in replies).float() / total for k in state}
            rounds.append([r.partition for r in replies])
        load_adapter_state_(peft_model, state)
        core.model = merge_lora(peft_model).eval()
        return {"rounds": options.recover_rounds, "steps": options.recover_steps,
                "lr": options.recover_lr, "contributors": rounds}

    def _spec(self, stats_layers: list[str], sums: bool, grad_layers: list[str],
              second: bool) -> ReplySpec:
        """Finite non-negative squared sums, finite column sums and gradients of exactly the
        model's shapes, counts equal to the client's examples times its window length."""
        modules = dict(self.core.model.named_modules())
        length = self.cfg.text.length
        specs = {}
        for name in stats_layers:
            width = self.core.adapter.get_matrix(modules[name]).shape[1]
            specs[f"sq/{name}"] = Tensor((width,), "float", low=0.0)
            if sums:
                specs[f"sum/{name}"] = Tensor((width,), "float")
            specs[f"rows/{name}"] = Tensor((), "int", low=1)
        for name in grad_layers:
            shape = tuple(modules[name].weight.shape)
            specs[f"grad/{name}"] = Tensor(shape, "float")
            if second:
                specs[f"gradsq/{name}"] = Tensor(shape, "float", low=0.0)
        if grad_layers:
            specs["tokens"] = Tensor((), "int", low=1)
            specs["samples"] = Tensor((), "int", low=1)
        check = tensors(specs)

        def counts_match(reply) -> None:
            arrays = reply.records["arrays"]
            for name in stats_layers:
                if int(arrays[f"rows/{name}"]) != reply.examples * length:
                    raise ReplyError(reply.client, f"arrays/rows/{name}", f"{int(arrays[f'rows/{name}'])} "
                                     f"rows, but {reply.examples} windows x {length} tokens")
            if grad_layers and (int(arrays["tokens"]) != reply.examples * (length - 1)
                                or int(arrays["samples"]) != reply.examples):
                raise ReplyError(reply.client, "arrays/tokens", f"{int(arrays['tokens'])} "
                                 f"tokens / {int(arrays['samples'])} samples for "
                                 f"{reply.examples} windows of {length}")
        return ReplySpec(records={"arrays": lambda a, c, r: check(a, c, r)},
                         checks=[counts_match])

    @staticmethod
    def _sum(parts: list[dict[str, np.ndarray]], stats_layers: list[str]):
        """The clients' evidence added up (the union's evidence)."""
        from ..prune.structured.evidence import GradEvidence
        from ..prune.structured.importance import Evidence

        def total(key: str) -> torch.Tensor:
            return sum(torch.from_numpy(np.asarray(p[key], np.float64)) for p in parts)

        stats = {n: LayerStats(total(f"sq/{n}"), None,
                               sum(int(p[f"rows/{n}"]) for p in parts),
                               total(f"sum/{n}") if f"sum/{n}" in parts[0] else None)
                 for n in stats_layers}
        grads = None
        if parts and "tokens" in parts[0]:
            names = [k[5:] for k in parts[0] if k.startswith("grad/")]
            grads = GradEvidence({n: total(f"grad/{n}") for n in names},
                                 {n: total(f"gradsq/{n}") for n in names
                                  if f"gradsq/{n}" in parts[0]},
                                 sum(int(p["tokens"]) for p in parts),
                                 sum(int(p["samples"]) for p in parts))
        return Evidence(stats=stats or None, grads=grads)
