"""A client's side of sparse federated training, without Flower.

The client rebuilds the model, decodes the global weights and mask, trains on its own
partition only with the mask enforced, and returns only the kept values (plus what the
round's mask-adjustment method asks for: ``client_adjust.py``). Before training it can
also score the dense initial model for SNIP / SynFlow masks (``client_scores``).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data import client_split, make_loader
from ..masks import wire
from ..models import build_model, input_shape
from ..train import evaluate, select_device, train_local
from .client_adjust import make_client_adjust
from .server_core import load_state_, model_state


def prepare_model(cfg: ExperimentConfig, payload: dict[str, np.ndarray]):
    """The model with the decoded global weights loaded, and the masks (strict decode)."""
    model = build_model(cfg.model, cfg.data.dataset)
    template = wire.template_of(model_state(model))
    state, masks = wire.decode_down(payload, template, client="server")
    load_state_(model, state)
    return model, masks


def check_partition(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> None:
    """The node's partition settings must agree with the experiment's data config."""
    if num_partitions != cfg.data.num_clients:
        raise ValueError(
            f"node_config num-partitions={num_partitions} but data.num_clients="
            f"{cfg.data.num_clients}: start as many SuperNodes / virtual nodes as clients")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node_config partition-id={partition_id} is outside "
                         f"[0, {num_partitions})")


def client_train(cfg: ExperimentConfig, partition_id: int, payload: dict[str, np.ndarray],
                 server_round: int = 0, plan: dict | None = None,
                 extras: dict[str, dict[str, np.ndarray]] | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, dict]]:
    """Train on this client's partition; return (payload up, metrics, extra records).

    ``plan``: the server's mask-adjustment plan for this round (``adjust-method`` and its
    entries; ``fedprune.fl.client_adjust``), ``extras``: the extra records sent with it.
    The payload up carries the kept values under the global mask, or, when the method
    changed this client's mask (FedDST), the client's own mask bits and kept values."""
    t0 = time.perf_counter()
    model, masks = prepare_model(cfg, payload)
    data = client_split(cfg.data, partition_id)
    loader = make_loader(data, cfg.data.dataset, cfg.train.batch_size, shuffle=True,
                         augment=cfg.data.augment,
                         seed=cfg.run.seed * 100_003 + server_round * 1_009 + partition_id)
    masks_t = {k: torch.from_numpy(v) for k, v in masks.items()}
    device = select_device(cfg.run.device)
    model.to(device)
    method = make_client_adjust(plan, cfg, model, masks_t, extras or {}, device)
    stats = train_local(model, loader, cfg.train, masks_t, device,
                        on_backward=method and method.hook,
                        regularizer=method and method.regularizer,
                        extra_params=method and method.extra_params)
    own_masks, records = method.finish(loader) if method else (None, {})
    state = model_state(model.cpu())
    if own_masks is None:
        reply = wire.encode_up(state, masks)
    else:
        reply = wire.encode_down(state, {n: m.cpu().numpy() for n, m in own_masks.items()})
    # compute_seconds: the client's own work (decode, data, train, encode); the
    # scale benchmark subtracts it from round wall time to get framework overhead.
    return reply, {"num-examples": len(data), **stats,
                   "compute_seconds": time.perf_counter() - t0}, records


def client_scores(cfg: ExperimentConfig, partition_id: int, payload: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], int]:
    """SNIP / SynFlow scores of the dense initial model on this client's data: either the
    scores (``score/<name>``) or, for ``mask.consensus=vote``, this client's own top-k
    mask (``mask/<name>``, packed bits). Returns (arrays, example count)."""
    from ..masks.saliency import masks_from_scores, snip_scores, synflow_scores

    model, masks = prepare_model(cfg, payload)
    data = client_split(cfg.data, partition_id)
    device = select_device(cfg.run.device)
    names = list(masks)
    if cfg.mask.init == "snip":
        loader = make_loader(data, cfg.data.dataset, cfg.train.batch_size, shuffle=True,
                             augment=False, seed=cfg.run.seed * 100_003 + partition_id)
        batches = list(itertools.islice(loader, cfg.mask.score_batches or None))
        scores = snip_scores(model, batches, names, device)
    elif cfg.mask.init == "synflow":
        scores = synflow_scores(model, input_shape(cfg.data.dataset), names,
                                cfg.mask.density, device=device)
    else:
        raise ValueError(f"mask.init={cfg.mask.init!r} is not scored by clients")
    if cfg.mask.consensus == "vote":
        own = masks_from_scores(scores, cfg.mask.density)
        return {f"mask/{n}": wire.pack_mask(m.cpu().numpy()) for n, m in own.items()}, len(data)
    return {f"score/{n}": s.cpu().numpy().astype(np.float32) for n, s in scores.items()}, len(data)


def client_evaluate(cfg: ExperimentConfig, partition_id: int, payload: dict[str, np.ndarray]
                    ) -> dict[str, float]:
    """Evaluate the global model on this client's partition (federated evaluation)."""
    model, _ = prepare_model(cfg, payload)
    data = client_split(cfg.data, partition_id)
    loader = make_loader(data, cfg.data.dataset, cfg.train.eval_batch_size, shuffle=False)
    metrics = evaluate(model, loader, select_device(cfg.run.device))
    return {"num-examples": len(data), "loss": metrics["loss"], "accuracy": metrics["accuracy"]}
