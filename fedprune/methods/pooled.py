"""``pooled``: federated one-shot pruning of a language model from exact pooled statistics.

One query round per block (``fedprune.prune.pooled``): the server sends the previous
block's pruned weights (packed mask bits + kept values); each client propagates its
windows through them, collects block b's statistics on its own text (squared input-column
norms; Gram matrices for SparseGPT/ADMM; row counts) and sends only those sums; the server
adds them and prunes block b with the same pruner code as ``fedprune prune``. The result
equals centralized sequential pruning on the union of the clients' windows.

What the server sees in the clear: every client's per-layer sums for every block (a Gram
matrix reveals much about the text behind it), unless ``secagg.enabled``: then the sums go
through Flower's SecAgg+ (``server/secure.py``) and the server sees only their total over
the clients, plus each client's window count and how many entries it clipped; Grams then
travel as their upper triangle, in SecAgg+'s int64 fixed point (8 bytes per entry).
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
import json
import uuid
from dataclasses import dataclass

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
    # false: block by block, each block calibrated on the pruned blocks' outputs (one
    # query round per block); true: every layer's statistics from the dense model in one
    # round (equal to centralized non-sequential pruning on the union)
    one_pass: bool = False
    secure_sums = True  # its replies are sums: secagg can hide each client's


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
        if kind == "pooled-all":
            return self._all(partition_id)
        if kind != "pooled-block":
            return super().answer(kind, partition_id, payload, config)
        from ..data.cache import atomic_write, resolve_cache_dir
        from ..lm.clients import partition_text
        from ..prune.adapters import adapter_for
        from ..prune.pooled import client_step, replay_inputs
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
        device = select_device(cfg.run.device)
        replay = config.get("replay")  # a resumed run: blocks 0..replay-1 to redo
        if index > 0 and replay is not None and int(replay) == index - 1:
            updates = [decode_update(adapter, model, j, _prefixed(payload, f"replay/{j}/"))
                       for j in range(int(replay))]
            inputs = replay_inputs(adapter, model, list(windows.split(1)), updates, device)
            update = decode_update(adapter, model, index - 1, _unprefixed(payload))
        elif index > 0:
            saved = torch.load(state, weights_only=False) if state.is_file() else None
            if saved is None or saved["block"] != index - 1:
                raise ValueError(f"partition {partition_id} has no inputs of block "
                                 f"{index - 1} (it missed a block): it sits this one out")
            inputs = saved["inputs"]
            update = decode_update(adapter, model, index - 1, payload)
        inputs, stats = client_step(adapter, model, list(windows.split(1)), inputs, index,
                                    update, set(_pruner(cfg.method).needs), device)
        if index < len(adapter.blocks(model)) - 1:
            buffer = io.BytesIO()
            torch.save({"block": index, "inputs": inputs}, buffer)
            atomic_write(state, lambda f: f.write(buffer.getvalue()))
        else:  # the last block: nothing follows, the cached inputs go
            state.unlink(missing_ok=True)
        return encode_stats(stats), {"num-examples": len(windows), "block": index}


    def _all(self, partition_id: int):
        """One pass: every layer's statistics on the dense model, blocks fed dense outputs."""
        from ..lm.clients import partition_text
        from ..prune.pipeline import collect_model_stats
        from ..train import select_device

        cfg = self.cfg
        model, tokenizer = _dense(cfg.method.model, cfg.data.cache_dir)
        windows = partition_text(cfg.text, cfg.data.num_clients, tokenizer, cfg.data.root,
                                 cfg.data.cache_dir)[partition_id].windows
        stats = collect_model_stats(model, None, list(windows.split(1)),
                                    set(_pruner(cfg.method).needs), select_device(cfg.run.device))
        return encode_stats(stats), {"num-examples": len(windows)}


def _prefixed(payload: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in payload.items() if k.startswith(prefix)}


def _unprefixed(payload: dict) -> dict:
    return {k: v for k, v in payload.items() if not k.startswith("replay/")}


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


def _block_file(folder, index: int):
    return folder / "blocks" / f"block-{index:04d}.safetensors"


class _Checkpoints:
    """A pooled run's finished blocks: each block's update (what went down to the
    clients: mask bits, kept values where they changed) and who contributed, one
    safetensors file per block, written atomically as the block ends."""

    def _save(self, index: int, payload: dict, contributors: list[int]) -> None:
        if self.checkpoint_dir is None:
            return
        from safetensors.numpy import save

        from ..data.cache import atomic_write

        data = save({k: np.ascontiguousarray(v) for k, v in payload.items()},
                    metadata={"contributors": json.dumps(contributors)})
        atomic_write(_block_file(self.checkpoint_dir, index), lambda f: f.write(data))

    def _restore(self, server, contributors: list) -> list[dict]:
        """Apply the saved blocks 0..k-1 to the server's model; their payloads."""
        from safetensors import safe_open

        core, done = self.core, []
        while (path := _block_file(self.checkpoint_dir, len(done))).is_file():
            with safe_open(path, framework="numpy") as f:
                payload = {k: f.get_tensor(k) for k in f.keys()}
                contributors.append(json.loads(f.metadata()["contributors"]))
            index = len(done)
            update = decode_update(core.adapter, core.model, index, payload)
            block = server.blocks[index]
            modules = core.adapter.prunable(block)
            for name, weight in update.items():
                modules[name].weight.data.copy_(weight.to(modules[name].weight))
                server.masks[name] = torch.from_numpy(wire.unpack_mask(
                    payload[f"mask/{name}"], tuple(weight.shape), name, str(path)))
            done.append(payload)
        return done


@register_method
class Pooled(_Checkpoints, LMMethod):
    config_cls = PooledConfig
    client_cls = PooledClient

    def queries(self):
        from ..prune.pooled import PooledServer

        core, options = self.core, self.options
        pruner = _pruner(options)
        if options.one_pass:
            return (yield from self._one_pass(pruner))
        server = PooledServer(core.model, pruner, options.target(), core.device)
        token = uuid.uuid4().hex[:16]  # names this run's client caches
        payload: dict[str, np.ndarray] = {}
        contributors = []
        probe = _Probe(server, self.cfg) if self.cfg.secagg.enabled else None
        update, config = None, {}
        done = self._restore(server, contributors) if self.resume else []
        if done:  # the clients redo the finished blocks from the saved updates
            payload = dict(done[-1])
            payload.update({f"replay/{j}/{k}": v for j, part in enumerate(done[:-1])
                            for k, v in part.items()})
            config = {"replay": len(done) - 1}
            update = decode_update(core.adapter, core.model, len(done) - 1, done[-1])
            if probe is not None:
                probe.skip(done, core.adapter, core.model)
        for index, block in enumerate(server.blocks):
            if index < len(done):
                continue
            modules = core.adapter.prunable(block)
            widths = {n: core.adapter.get_matrix(m).shape[1] for n, m in modules.items()}
            gram = "gram" in pruner.needs
            spec = _stats_spec(widths, gram, self.cfg.text.length)
            spec.metrics["block"] = Metric("int", low=index, high=index)
            query = Query("pooled-block", payload, spec,
                          {"block": index, "run-token": token, **config})
            config = {}
            if probe is not None:
                query.secure = probe.layout(index, update, widths, gram)
                query.counts = {f"rows/{n}": self.cfg.text.length for n in widths}
            replies = yield query
            contributors.append([p for r in replies
                                 for p in r.metrics.get("contributors", [r.partition])])
            dense = {n: m.weight.detach().cpu().clone() for n, m in modules.items()}
            update = server.prune_block(index, [r.records["arrays"] for r in replies])
            payload = encode_update(update, {n: server.masks[n] for n in update}, dense)
            self._save(index, payload, contributors[-1])
        return {"method": self.name, "pruner": options.pruner, "target": options.target().pattern
                or f"{options.sparsity:g}", "blocks": len(server.blocks),
                "contributors": contributors}

    def _one_pass(self, pruner):
        """Every layer's statistics from the dense model in one round, then every block
        pruned from the pooled sums (``prune_model`` with ``stats_override``)."""
        from ..prune.pipeline import collect_model_stats, prune_model
        from ..prune.pooled import sum_stats

        core, options = self.core, self.options
        modules = {n: m for b in core.adapter.blocks(core.model)
                   for n, m in core.adapter.prunable(b).items()}
        widths = {n: core.adapter.get_matrix(m).shape[1] for n, m in modules.items()}
        gram = "gram" in pruner.needs
        query = Query("pooled-all", {}, _stats_spec(widths, gram, self.cfg.text.length))
        if self.cfg.secagg.enabled:
            windows = _Probe.windows_of(core.model, self.cfg)
            stats = collect_model_stats(core.model, core.adapter, windows, set(pruner.needs))
            query.secure = _Probe.scales(stats, widths, gram, len(windows),
                                         self.cfg.secagg.headroom)
            query.counts = {f"rows/{n}": self.cfg.text.length for n in widths}
        replies = yield query
        pooled = {n: sum_stats([r.records["arrays"][n] for r in replies]) for n in widths}
        prune_model(core.model, pruner, options.target(), device=core.device,
                    sequential=False, progress=False, stats_override=pooled)
        contributors = [p for r in replies for p in r.metrics.get("contributors", [r.partition])]
        return {"method": self.name, "pruner": options.pruner, "one_pass": True,
                "target": options.target().pattern or f"{options.sparsity:g}",
                "contributors": [contributors]}


class _Probe:
    """The public fixed-point scales of a secure block: the server's own statistics of
    ``secagg.probe`` windows of uniformly random tokens (no client text), propagated
    through its current model (the blocks pruned so far) by the clients' own code, per
    window, times ``secagg.headroom``. Text moves activations less than that headroom in
    the layers measured so far; a client counts what it still clips (see the report)."""

    def __init__(self, server, cfg) -> None:
        from ..prune.pooled import PooledClient

        self.client = PooledClient(server.model, self.windows_of(server.model, cfg),
                                   frozenset(server.pruner.needs), server.device)
        self.windows, self.headroom = cfg.secagg.probe, cfg.secagg.headroom

    @staticmethod
    def windows_of(model, cfg) -> list[torch.Tensor]:
        """``secagg.probe`` windows of uniformly random token ids (seeded), one per batch."""
        vocab = model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(cfg.run.seed)
        windows = torch.randint(vocab, (cfg.secagg.probe, cfg.text.length),
                                generator=generator)
        return list(windows.split(1))

    def skip(self, done: list[dict], adapter, model) -> None:
        """Bring the probe past the blocks a resumed run restored."""
        for index, payload in enumerate(done):
            self.client.block_stats(index, decode_update(adapter, model, index - 1, done[
                index - 1]) if index else None)

    def layout(self, index: int, update, widths: dict[str, int], gram: bool):
        return self.scales(self.client.block_stats(index, update), widths, gram,
                           self.windows, self.headroom)

    @staticmethod
    def scales(stats, widths: dict[str, int], gram: bool, windows: int, headroom: float):
        """The layout of ``widths``' statistics, each scaled by ``headroom`` times the
        largest per-window entry of the probe's ``stats``."""
        from ..fl.secure import SecureSum

        shapes, scales, triangular = {}, {}, set()
        for name in widths:
            s = stats[name]
            parts = [(f"sq/{name}", s.sq_norm)] + ([(f"gram/{name}", s.gram)] if gram else [])
            for key, value in parts:
                top = float(value.abs().max()) / windows
                shapes[key] = tuple(value.shape)
                scales[key] = headroom * top if top > 0 else 1.0
            if gram:
                triangular.add(f"gram/{name}")
        return SecureSum(shapes, scales, triangular)
