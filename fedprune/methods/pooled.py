"""``pooled``: federated one-shot pruning of a language model from exact pooled statistics.

One query round per block (``fedprune.prune.pooled``): the server sends the previous
block's pruned weights (packed mask bits + kept values); each client propagates its
windows through them, collects block b's statistics on its own text (squared input-column
norms; Gram matrices for SparseGPT/ADMM; row counts) and sends only those sums; the server
adds them and prunes block b with the same pruner code as ``fedprune prune``. The result
equals centralized sequential pruning on the union of the clients' windows.

What the server sees in the clear: every client's per-layer sums for every block (a Gram
matrix reveals much about the text behind it; secure aggregation is not wired in yet).
What travels (per client per block): down, the previous block's mask (1 bit per weight)
and, only where the pruner changed them (SparseGPT, ADMM), the kept values (float32); up,
float64 squared norms (in,) per layer, float64 full Gram matrices (in, in) per layer when
the method needs them, an int64 row count per layer.

A client keeps its inputs to the next block in its node's cache folder (``fedprune-pooled``
under the data cache), so a block's message may reach any worker process; the dense model
is loaded once per process. A client that drops out leaves the blocks after it to the others.
"""

from __future__ import annotations

import functools
import io
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, MethodConfig, check_value
from ..fl.replies import Metric, ReplyError, ReplySpec, Tensor, tensors
from ..masks import wire
from ..prune.base import LayerStats, SparsityTarget
from .base import ClientMethod, Method, Query, register_method


@dataclass
class LMMethodConfig(MethodConfig):
    """What every federated one-shot LLM method shares: the model, the pruner, the target."""

    name: str = ""
    model: str = "smollm2-135m"  # alias, .gguf, folder or hub id (fedprune.lm.loading)
    pruner: str = "wanda"  # magnitude | wanda | sparsegpt | admm
    sparsity: float = 0.5
    pattern: str = ""  # N:M, e.g. 2:4 (then sparsity = N/M)
    one_shot = True
    maybe_paths = ("model",)  # a model folder relative to where the command runs, or an alias

    def __post_init__(self) -> None:
        import fedprune.prune.methods  # noqa: F401  (registers the pruners)
        from ..prune.base import pruner_names

        if self.pruner not in pruner_names():
            raise ConfigError(f"method.pruner={self.pruner!r} is not valid; choose one of "
                              f"{pruner_names()}")
        check_value("method.sparsity", 0 <= self.sparsity < 1, "must be in [0, 1)",
                    self.sparsity)
        try:
            self.target()
        except ValueError as err:
            raise ConfigError(f"method.pattern={self.pattern!r} is not valid: {err}") from None

    def target(self, scope: str = "layer") -> SparsityTarget:
        return SparsityTarget.parse(self.sparsity if not self.pattern else 0.0, self.pattern,
                                    scope)


@dataclass
class PooledConfig(LMMethodConfig):
    name: str = "pooled"


def _pruner(options: LMMethodConfig):
    from ..prune.base import get_pruner

    return get_pruner(options.pruner)


# ----------------------------------------------------------------------------- wire


def encode_stats(stats: dict[str, LayerStats]) -> dict[str, np.ndarray]:
    out = {}
    for name, s in stats.items():
        out[f"sq/{name}"] = s.sq_norm.cpu().numpy()
        out[f"rows/{name}"] = np.array(s.rows, dtype=np.int64)
        if s.gram is not None:
            out[f"gram/{name}"] = s.gram.cpu().numpy()
    return out


def _stats_spec(widths: dict[str, int], gram: bool, tokens_per_example: int) -> ReplySpec:
    """A block's statistics: finite non-negative squared norms, finite symmetric Grams,
    row counts equal to the client's windows x tokens per window, for exactly this block."""
    specs = {}
    for name, width in widths.items():
        specs[f"sq/{name}"] = Tensor((width,), "float", low=0.0)
        specs[f"rows/{name}"] = Tensor((), "int", low=1)
        if gram:
            specs[f"gram/{name}"] = Tensor((width, width), "float", symmetric=True)
    check = tensors(specs)

    def decode(arrays, client, record):
        got = check(arrays, client, record)
        return {n: LayerStats(torch.from_numpy(got[f"sq/{n}"]).double(),
                              torch.from_numpy(got[f"gram/{n}"]).double() if gram else None,
                              int(got[f"rows/{n}"])) for n in widths}

    def rows_match(reply) -> None:
        expected = reply.examples * tokens_per_example
        for name, s in reply.records["arrays"].items():
            if s.rows != expected:
                raise ReplyError(reply.client, f"arrays/rows/{name}", f"{s.rows} rows, but "
                                 f"{reply.examples} windows x {tokens_per_example} tokens")
    return ReplySpec(records={"arrays": decode}, checks=[rows_match])


# ----------------------------------------------------------------------------- client


@functools.lru_cache(maxsize=2)
def _dense(model_name: str, cache_dir: str):
    """The dense model and tokenizer, once per worker process (read-only)."""
    from ..lm.loading import load_causal_lm

    return load_causal_lm(model_name, cache_dir=cache_dir)


class PooledClient(ClientMethod):
    def answer(self, kind, partition_id, payload, config=None):
        if kind != "pooled-block":
            return super().answer(kind, partition_id, payload, config)
        from ..data.cache import atomic_write, resolve_cache_dir
        from ..lm.clients import partition_text
        from ..prune.adapters import adapter_for
        from ..prune.pooled import client_step
        from ..train import select_device

        cfg, config = self.cfg, config or {}
        index, token = int(config["block"]), str(config["run-token"])
        model, tokenizer = _dense(cfg.method.model, cfg.data.cache_dir)
        adapter = adapter_for(model)
        windows = partition_text(cfg.text, cfg.data.num_clients, tokenizer, cfg.data.root,
                                 cfg.data.cache_dir)[partition_id].windows
        state = resolve_cache_dir(cfg.data.cache_dir) / "fedprune-pooled" / token / \
            f"client-{partition_id}.pt"
        inputs, update = None, None
        if index > 0:
            saved = torch.load(state, weights_only=False) if state.is_file() else None
            if saved is None or saved["block"] != index - 1:
                raise ValueError(f"partition {partition_id} has no inputs of block "
                                 f"{index - 1} (it missed a block): it sits this one out")
            inputs = saved["inputs"]
            update = decode_update(adapter, model, index - 1, payload)
        device = select_device(cfg.run.device)
        inputs, stats = client_step(adapter, model, list(windows.split(1)), inputs, index,
                                    update, set(_pruner(cfg.method).needs), device)
        if index < len(adapter.blocks(model)) - 1:
            buffer = io.BytesIO()
            torch.save({"block": index, "inputs": inputs}, buffer)
            atomic_write(state, lambda f: f.write(buffer.getvalue()))
        else:  # the last block: nothing follows, the cached inputs go
            state.unlink(missing_ok=True)
        return encode_stats(stats), {"num-examples": len(windows), "block": index}


def encode_update(update: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                  dense: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A pruned block for the clients: packed mask bits, plus the kept values only where
    the pruner changed them (SparseGPT, ADMM); Wanda and magnitude keep the dense values,
    which the clients hold, so their update is 1 bit per weight."""
    payload: dict[str, np.ndarray] = {}
    for name, weight in update.items():
        mask = masks[name].numpy()
        if torch.equal(weight[masks[name]], dense[name][masks[name]]):
            payload[f"mask/{name}"] = wire.pack_mask(mask)
        else:
            payload.update(wire.encode_down({name: weight.float().numpy()}, {name: mask}))
    return payload


def decode_update(adapter, model, index: int, payload: dict) -> dict[str, torch.Tensor]:
    """Block ``index``'s pruned weights from the server's update (masks, kept values where
    they changed, the dense values of ``model`` elsewhere)."""
    block = adapter.blocks(model)[index]
    modules = adapter.prunable(block)
    masks_only = {k.split("/", 1)[1] for k in payload if k.startswith("mask/")} - \
        {k.split("/", 1)[1] for k in payload if k.startswith("value/")}
    out = {}
    for name in masks_only:
        weight = modules[name].weight.detach()
        mask = wire.unpack_mask(payload[f"mask/{name}"], tuple(weight.shape), name, "server")
        out[name] = weight.masked_fill(~torch.from_numpy(mask), 0)
    rest = {k: v for k, v in payload.items() if k.split("/", 1)[1] not in masks_only}
    template = {n: (tuple(modules[n].weight.shape), np.dtype("float32"))
                for n in modules if n not in masks_only}
    if template:
        state, _ = wire.decode_down(rest, template, client="server")
        out.update({n: torch.from_numpy(v) for n, v in state.items()})
    return out


# ----------------------------------------------------------------------------- server


class LMMethod(Method):
    """A federated one-shot method on a causal LM (the server core is ``LMCore``)."""

    @classmethod
    def make_core(cls, cfg):
        from ..fl.lm_core import LMCore

        return LMCore(cfg)


@register_method
class Pooled(LMMethod):
    config_cls = PooledConfig
    client_cls = PooledClient

    def queries(self):
        from ..prune.pooled import PooledServer

        core, options = self.core, self.options
        pruner = _pruner(options)
        server = PooledServer(core.model, pruner, options.target(), core.device)
        token = uuid.uuid4().hex[:16]  # names this run's client caches
        payload: dict[str, np.ndarray] = {}
        contributors = []
        for index, block in enumerate(server.blocks):
            modules = core.adapter.prunable(block)
            widths = {n: core.adapter.get_matrix(m).shape[1] for n, m in modules.items()}
            spec = _stats_spec(widths, "gram" in pruner.needs, self.cfg.text.length)
            spec.metrics["block"] = Metric("int", low=index, high=index)
            replies = yield Query("pooled-block", payload, spec,
                                  {"block": index, "run-token": token})
            contributors.append([r.partition for r in replies])
            dense = {n: m.weight.detach().cpu().clone() for n, m in modules.items()}
            update = server.prune_block(index, [r.records["arrays"] for r in replies])
            payload = encode_update(update, {n: server.masks[n] for n in update}, dense)
        return {"method": self.name, "pruner": options.pruner, "target": options.target().pattern
                or f"{options.sparsity:g}", "blocks": len(server.blocks),
                "contributors": contributors}
