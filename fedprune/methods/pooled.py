"""``pooled``: federated one-shot pruning from exact pooled statistics (an LLM or a CNN).

One query round per block (``fedprune.prune.pooled``): the server sends the previous
block's pruned weights (packed mask bits + kept values); each client propagates its
calibration inputs (text windows, or images of a CNN client) through them, collects block
b's statistics on its own data (squared input-column norms; Gram matrices for
SparseGPT/ADMM; row counts) and sends only those sums; the server adds them and prunes
block b with the same pruner code as ``fedprune prune``. The result equals centralized
sequential pruning on the union of the clients' data. ``method.one_pass``: every layer's
statistics from the dense model in one round instead (centralized non-sequential).

What the server sees in the clear: every client's per-layer sums for every block (a Gram
matrix reveals much about the text behind it), unless ``secagg.enabled``: then the sums go
through Flower's SecAgg+ (``server/secure.py``) and the server sees only their total over
the clients, plus each client's example count and how many entries it clipped; with
Grams, each block takes two secure rounds (the squared norms, whose sum sets the Grams'
per-entry scales, then the Grams as their upper triangle), in SecAgg+'s int64 fixed point.
What travels (per client per block): down, the previous block's mask (1 bit per weight)
and, only where the pruner changed them (SparseGPT, ADMM), the kept values (float32); up,
float64 squared norms (in,) per layer, an int64 row count per layer and, when the method
needs them, each distinct Gram matrix once as its float64 upper triangle (layers that
read one input, q/k/v and gate/up, refer to the first one's: ``encode_stats``).

A client keeps its inputs to the next block in its node's cache folder (``fedprune-pooled``
under the data cache), so a block's message may reach any worker process; the dense model
is loaded once per process. A client that drops out leaves the blocks after it to the
others. Each finished block's update is kept in the run folder, so an interrupted run
resumes after its last finished block (the clients replay the finished ones).
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, MethodConfig, check_value
from ..fl.oneshot import probe_inputs, rows_per_example
from ..fl.replies import Metric, ReplyError, ReplySpec, Tensor, check_tensor, tensors
from ..masks import wire
from ..prune.base import LayerStats, SparsityTarget
from .base import ClientMethod, Method, Query, register_method


@dataclass
class LMMethodConfig(MethodConfig):
    """What every federated one-shot method shares: the model (a causal LM, or ``cnn``:
    see ``fedprune.fl.oneshot``), the pruner, the target."""

    name: str = ""
    model: str = "smollm2-135m"  # alias, .gguf, folder or hub id (fedprune.lm.loading), or cnn
    pruner: str = "wanda"  # magnitude | wanda | sparsegpt | admm
    sparsity: float = 0.5
    pattern: str = ""  # N:M, e.g. 2:4 (then sparsity = N/M)
    # model=cnn: the trained weights (safetensors; "" = the reference CNN trained for
    # reference_epochs), and the images of its own partition each client calibrates on
    weights: str = ""
    reference_epochs: int = 3
    calib_images: int = 128
    one_shot = True
    paths = ("weights",)
    maybe_paths = ("model",)  # a model folder relative to where the command runs, or an alias

    def __post_init__(self) -> None:
        import fedprune.prune.methods  # noqa: F401  (registers the pruners)
        from ..prune.base import pruner_names

        if self.pruner not in pruner_names():
            raise ConfigError(f"method.pruner={self.pruner!r} is not valid; choose one of "
                              f"{pruner_names()}")
        check_value("method.sparsity", 0 <= self.sparsity < 1, "must be in [0, 1)",
                    self.sparsity)
        check_value("method.calib_images", self.calib_images >= 1, "must be >= 1",
                    self.calib_images)
        check_value("method.reference_epochs", self.reference_epochs >= 1, "must be >= 1",
                    self.reference_epochs)
        if self.weights and self.model != "cnn":
            raise ConfigError(f"method.weights={self.weights!r} is for method.model=cnn; "
                              f"a language model's weights come with method.model")
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


def encode_stats(stats: dict[str, LayerStats], compact: bool = False
                 ) -> dict[str, np.ndarray]:
    """Statistics for the wire. ``compact`` (plain, not secure, replies): a Gram goes as
    its upper triangle (``gram/NAME``), and a layer whose Gram equals an earlier layer's of
    the same reply (q/k/v, gate/up read one input: the engine computed it once) as that
    layer's position in the reply (``gram-as/NAME``). Otherwise full symmetrized Grams,
    which secure sums lay out themselves."""
    out, seen = {}, {}
    for index, (name, s) in enumerate(stats.items()):
        out[f"sq/{name}"] = s.sq_norm.cpu().numpy()
        out[f"rows/{name}"] = np.array(s.rows, dtype=np.int64)
        if s.gram is None:
            continue
        if not compact:  # X^T X by BLAS can differ from its transpose in the last bit
            out[f"gram/{name}"] = ((s.gram + s.gram.T) / 2).cpu().numpy()
            continue
        key = (tuple(s.gram.shape), float(s.gram[0, 0]), float(s.gram.sum()))
        same = next((j for j, g in seen.get(key, []) if torch.equal(g, s.gram)), None)
        if same is not None:
            out[f"gram-as/{name}"] = np.array(same, dtype=np.int64)
            continue
        seen.setdefault(key, []).append((index, s.gram))
        out[f"gram/{name}"] = wire.upper_triangle(s.gram.cpu().numpy())
    return out


def _compact_grams(arrays: dict, widths: dict[str, int], client: str, record: str
                   ) -> dict[str, np.ndarray]:
    """The full Grams of a compact reply (see ``encode_stats``); takes their entries out
    of ``arrays``. Each layer needs exactly one of a triangle of its width or a reference
    to an earlier layer of the same width that sent its own."""
    names, out, own = list(widths), {}, set()
    for index, name in enumerate(names):
        width = widths[name]
        tri, alias = arrays.pop(f"gram/{name}", None), arrays.pop(f"gram-as/{name}", None)
        field = f"{record}/gram/{name}"
        if (tri is None) == (alias is None):
            raise ReplyError(client, field, "needs exactly one of gram/ (its upper triangle) "
                                            "or gram-as/ (an earlier layer's Gram)")
        if tri is not None:
            tri = check_tensor(tri, Tensor((width * (width + 1) // 2,), "float"), client,
                               field)
            out[name] = wire.from_upper_triangle(np.asarray(tri, np.float64), width)
            own.add(name)
            continue
        alias = check_tensor(alias, Tensor((), "int", low=0, high=index - 1), client,
                             f"{record}/gram-as/{name}")
        source = names[int(alias)]
        if source not in own or widths[source] != width:
            raise ReplyError(client, f"{record}/gram-as/{name}", f"refers to {source!r}, "
                             "which sent no Gram of this width")
        out[name] = out[source].copy()
    return out


def _stats_spec(widths: dict[str, int], gram: bool, rows_per_example: dict[str, int],
                phase: str | None = None) -> ReplySpec:
    """A block's statistics: finite non-negative squared norms, finite symmetric Grams
    (compact in a plain reply: see ``encode_stats``) whose diagonals are the squared
    norms, row counts equal to the client's examples x the rows each adds to the layer (a
    window's tokens; an image's output positions), for exactly this block's layers.
    ``phase="gram"``: the Grams alone (their diagonals are the squared norms)."""
    compact = gram and phase is None
    specs = {}
    for name, width in widths.items():
        if phase != "gram":
            specs[f"sq/{name}"] = Tensor((width,), "float", low=0.0)
        specs[f"rows/{name}"] = Tensor((), "int", low=1)
        if gram and not compact:
            specs[f"gram/{name}"] = Tensor((width, width), "float", symmetric=True)
    check = tensors(specs)

    def decode(arrays, client, record):
        arrays = dict(arrays)
        grams = _compact_grams(arrays, widths, client, record) if compact else {}
        got = {**check(arrays, client, record), **{f"gram/{n}": g for n, g in grams.items()}}
        out = {}
        for n in widths:
            g = torch.from_numpy(got[f"gram/{n}"]).double() if gram else None
            sq = torch.diagonal(g).clone() if phase == "gram" else \
                torch.from_numpy(got[f"sq/{n}"]).double()
            if compact:
                _diagonal_matches(g, sq, client, f"{record}/gram/{n}")
            out[n] = LayerStats(sq, g, int(got[f"rows/{n}"]))
        return out

    def rows_match(reply) -> None:
        for name, s in reply.records["arrays"].items():
            if s.rows != reply.examples * rows_per_example[name]:
                raise ReplyError(reply.client, f"arrays/rows/{name}", f"{s.rows} rows, but "
                                 f"{reply.examples} examples x {rows_per_example[name]} rows")
    return ReplySpec(records={"arrays": decode}, checks=[rows_match])


def _diagonal_matches(gram: torch.Tensor, sq: torch.Tensor, client: str, field: str) -> None:
    """A Gram's diagonal is the squared norms, up to the float32 rounding of one batch's
    products (``prune.base.batch_terms``); anything else is not X^T X of the same rows."""
    diag = torch.diagonal(gram)
    if not torch.allclose(diag, sq, rtol=1e-4, atol=1e-6 * float(sq.abs().max().clamp_min(1))):
        worst = int((diag - sq).abs().argmax())
        raise ReplyError(client, field, f"diagonal entry {worst} is {float(diag[worst])!r}, "
                         f"but the squared norm is {float(sq[worst])!r}")


# ----------------------------------------------------------------------------- client


class PooledClient(ClientMethod):
    """A client's side of ``pooled``. Under secure aggregation a method that needs Gram
    matrices answers each block in two phases (``phase``: ``sq``, then ``gram``): the
    squared norms first (they fix the Grams' fixed-point scales), then the Grams of the
    statistics it kept from the first phase."""

    def answer(self, kind, partition_id, payload, config=None):
        config = config or {}
        if kind == "pooled-all":
            return self._all(partition_id, config.get("phase"))
        if kind != "pooled-block":
            return super().answer(kind, partition_id, payload, config)
        from ..fl.oneshot import client_batches, examples, load_dense

        cfg, phase = self.cfg, config.get("phase")
        index, token = int(config["block"]), str(config["run-token"])
        model, tokenizer = load_dense(cfg)
        batches = client_batches(cfg, partition_id, tokenizer)
        state = _state_file(cfg, token, partition_id)
        if phase == "gram":
            saved = torch.load(state, weights_only=False) if state.is_file() else None
            if saved is None or saved["block"] != index or saved.get("stats") is None:
                raise ValueError(f"partition {partition_id} has no statistics of block "
                                 f"{index} from its first phase: it sits this one out")
            stats = saved["stats"]
            self._keep(state, index, saved["inputs"], None, model)
        else:
            inputs, stats = self._step(model, batches, payload, config, index, state,
                                       partition_id)
            self._keep(state, index, inputs, stats if phase == "sq" else None, model)
        return _only(encode_stats(stats, compact=phase is None), phase), {
            "num-examples": examples(batches), "block": index}

    def _step(self, model, batches, payload, config, index, state, partition_id):
        """This client's inputs to block ``index`` and the block's statistics on them."""
        from ..prune.adapters import adapter_for
        from ..prune.pooled import client_step, replay_inputs
        from ..train import select_device

        adapter, device = adapter_for(model), select_device(self.cfg.run.device)
        inputs, update = None, None
        replay = config.get("replay")  # a resumed run: blocks 0..replay-1 to redo
        if index > 0 and replay is not None and int(replay) == index - 1:
            updates = [decode_update(adapter, model, j, _prefixed(payload, f"replay/{j}/"))
                       for j in range(int(replay))]
            inputs = replay_inputs(adapter, model, batches, updates, device)
            update = decode_update(adapter, model, index - 1, _unprefixed(payload))
        elif index > 0:
            saved = torch.load(state, weights_only=False) if state.is_file() else None
            if saved is None or saved["block"] != index - 1:
                raise ValueError(f"partition {partition_id} has no inputs of block "
                                 f"{index - 1} (it missed a block): it sits this one out")
            inputs = saved["inputs"]
            update = decode_update(adapter, model, index - 1, payload)
        return client_step(adapter, model, batches, inputs, index, update,
                           set(_pruner(self.cfg.method).needs), device)

    @staticmethod
    def _keep(state, index: int, inputs, stats, model) -> None:
        """Keep the inputs of the next block (and a first phase's statistics) in the
        node's cache folder; after the last block's last phase, nothing."""
        from ..data.cache import atomic_write
        from ..prune.adapters import adapter_for

        if stats is None and index == len(adapter_for(model).blocks(model)) - 1:
            state.unlink(missing_ok=True)
            return
        buffer = io.BytesIO()
        torch.save({"block": index, "inputs": inputs, "stats": stats}, buffer)
        atomic_write(state, lambda f: f.write(buffer.getvalue()))

    def _all(self, partition_id: int, phase: str | None):
        """One pass: every layer's statistics on the dense model, blocks fed dense outputs
        (recomputed in a second phase: they are the same)."""
        from ..fl.oneshot import client_batches, examples, load_dense
        from ..prune.pipeline import collect_model_stats
        from ..train import select_device

        cfg = self.cfg
        model, tokenizer = load_dense(cfg)
        batches = client_batches(cfg, partition_id, tokenizer)
        stats = collect_model_stats(model, None, batches, set(_pruner(cfg.method).needs),
                                    select_device(cfg.run.device))
        return _only(encode_stats(stats, compact=phase is None), phase), {
            "num-examples": examples(batches)}


def _state_file(cfg, token: str, partition_id: int):
    from ..data.cache import resolve_cache_dir

    return resolve_cache_dir(cfg.data.cache_dir) / "fedprune-pooled" / token / \
        f"client-{partition_id}.pt"


def _only(arrays: dict[str, np.ndarray], phase: str | None) -> dict[str, np.ndarray]:
    """A phase's part of the statistics: all of them, the squared norms and row counts,
    or the Grams and row counts."""
    if phase is None:
        return arrays
    keep = ("sq/", "rows/") if phase == "sq" else ("gram/", "rows/")
    return {k: v for k, v in arrays.items() if k.startswith(keep)}


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
    """A federated one-shot method on a causal LM or a CNN (its server core:
    ``OneShotCore``)."""

    @classmethod
    def make_core(cls, cfg):
        from ..fl.oneshot_core import OneShotCore

        return OneShotCore(cfg)


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
        rows = rows_per_example(self.cfg, core.model)
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
            stats, who = yield from self._gather(
                "pooled-block", payload, widths, rows,
                {"block": index, "run-token": token, **config},
                {"block": Metric("int", low=index, high=index)},
                (lambda i=index, u=update: probe.stats(i, u)) if probe else None)
            config = {}
            contributors.append(who)
            dense = {n: m.weight.detach().cpu().clone() for n, m in modules.items()}
            update = server.prune_block(index, stats)
            payload = encode_update(update, {n: server.masks[n] for n in update}, dense)
            self._save(index, payload, contributors[-1])
        return {"method": self.name, "pruner": options.pruner, "target": options.target().pattern
                or f"{options.sparsity:g}", "blocks": len(server.blocks),
                "contributors": contributors}

    def _gather(self, kind, payload, widths, rows, config, metrics, probe_stats):
        """The statistics of ``widths``' layers from the clients: [per-client dicts] and
        the contributing partitions. Under secure aggregation: one sum, in two phases
        when the pruner needs Grams (squared norms, whose sum then scales the Grams)."""
        gram = "gram" in _pruner(self.options).needs
        secure = self.cfg.secagg.enabled
        phase = "sq" if secure and gram else None
        query = Query(kind, payload, _stats_spec(widths, gram and not secure, rows, phase),
                      {**config, **({"phase": phase} if phase else {})})
        query.spec.metrics.update(metrics)
        if secure:
            query.secure = _sq_layout(probe_stats(), widths, self.cfg.secagg.probe,
                                      self.cfg.secagg.headroom)
            query.counts = {f"rows/{n}": rows[n] for n in widths}
        replies = yield query
        if phase is None:
            return [r.records["arrays"] for r in replies], _partitions(replies)
        first = replies[0]  # the secure sum
        sizes = self.core.client_sizes()
        ratio = first.examples / min(sizes[p] for p in first.metrics["contributors"])
        slack = {n: query.secure.bound(f"sq/{n}", first.examples, self.cfg.secagg.quant_bits)
                 for n in widths}  # how far the first phase's rounding may be below the sum
        config = {k: v for k, v in config.items() if k != "replay"}
        query = Query(kind, {}, _stats_spec(widths, True, rows, "gram"),
                      {**config, "phase": "gram"})
        query.spec.metrics.update(metrics)
        query.secure = _gram_layout(first.records["arrays"], slack, first.examples, ratio)
        query.counts = {f"rows/{n}": rows[n] for n in widths}
        replies = yield query
        return [r.records["arrays"] for r in replies], _partitions(replies)

    def _one_pass(self, pruner):
        """Every layer's statistics from the dense model in one round, then every block
        pruned from the pooled sums (``prune_model`` with ``stats_override``)."""
        from ..prune.pipeline import collect_model_stats, prune_model
        from ..prune.pooled import sum_stats

        core, options, cfg = self.core, self.options, self.cfg
        modules = {n: m for b in core.adapter.blocks(core.model)
                   for n, m in core.adapter.prunable(b).items()}
        widths = {n: core.adapter.get_matrix(m).shape[1] for n, m in modules.items()}

        def probe_stats():
            probe = probe_inputs(cfg, core.model, cfg.secagg.probe)
            return collect_model_stats(core.model, core.adapter, probe, set(pruner.needs))
        stats, who = yield from self._gather("pooled-all", {}, widths,
                                             rows_per_example(cfg, core.model), {}, {},
                                             probe_stats)
        pooled = {n: sum_stats([s[n] for s in stats]) for n in widths}
        prune_model(core.model, pruner, options.target(), device=core.device,
                    sequential=False, progress=False, stats_override=pooled)
        return {"method": self.name, "pruner": options.pruner, "one_pass": True,
                "target": options.target().pattern or f"{options.sparsity:g}",
                "contributors": [who]}


def _partitions(replies) -> list[int]:
    """Who contributed: each reply's partition, or a secure sum's contributors."""
    return [p for r in replies for p in r.metrics.get("contributors", [r.partition])]


def _sq_layout(stats, widths: dict[str, int], windows: int, headroom: float):
    """Squared norms under secure aggregation: one scale per layer, ``headroom`` times the
    largest per-window squared norm of the probe's (a layer's channels differ by orders
    of magnitude, and text moves a channel further from random tokens than a layer)."""
    from ..fl.secure import SecureSum

    shapes, scales = {}, {}
    for name in widths:
        d = stats[name].sq_norm.double().cpu().numpy() / windows
        top = float(d.max()) if d.size and d.max() > 0 else 1.0
        shapes[f"sq/{name}"], scales[f"sq/{name}"] = d.shape, np.full(d.shape, headroom * top)
    return SecureSum(shapes, scales)


def _gram_layout(sums, slack: dict[str, np.ndarray], total: int, ratio: float):
    """Grams under secure aggregation, scaled entry by entry from the summed squared norms
    of the first phase, raised by that phase's rounding bound (``slack``) so that D is at
    least the true sum: ``u_j = sqrt(2 * ratio * D_j / total)``. A client's per-example
    Gram entry is at most ``sqrt(G_jj G_kk) / n <= ratio * sqrt(D_j D_k) / total`` (its
    diagonal is part of the sum; ``ratio`` = total examples / the fewest any contributor
    holds), so nothing is clipped, with a factor 2 to spare."""
    from ..fl.secure import SecureSum

    shapes, scales = {}, {}
    for name, bound in slack.items():
        d = np.maximum(sums[name].sq_norm.double().cpu().numpy(), 0.0) + bound
        key = f"gram/{name}"
        shapes[key], scales[key] = (d.size, d.size), np.sqrt(2 * ratio * d / total)
    return SecureSum(shapes, scales, set(shapes))


class _Probe:
    """The public fixed-point scale of a secure block's squared norms: the server's own
    statistics of ``secagg.probe`` random inputs (tokens or images; no client data),
    propagated through its current model (the blocks pruned so far) by the clients' own
    code. A client counts what it still clips (see the report)."""

    def __init__(self, server, cfg) -> None:
        from ..prune.pooled import PooledClient

        self.client = PooledClient(server.model, probe_inputs(cfg, server.model,
                                                              cfg.secagg.probe),
                                   frozenset(server.pruner.needs), server.device)

    def skip(self, done: list[dict], adapter, model) -> None:
        """Bring the probe past the blocks a resumed run restored."""
        update = None
        for index in range(len(done)):
            self.client.block_stats(index, update)
            update = decode_update(adapter, model, index, done[index])

    def stats(self, index: int, update):
        return self.client.block_stats(index, update)
