"""A client's side of sparse federated training, without Flower.

The client rebuilds the model, decodes the global weights and mask, trains on its own
partition only with the mask enforced, and returns only the kept values, plus what the
method's plan for the round asks for (its client part, ``fedprune.methods``). Query rounds
before training go to the method's client part too (``client_query``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data import client_split, make_loader
from ..masks import wire
from ..models import build_model
from ..train import evaluate, select_device, train_local
from .server_core import CHANNELS, load_state_, model_state


def client_method(cfg: ExperimentConfig):
    """The configured method's client part."""
    from ..methods import method_class

    return method_class(cfg.method.name).client_cls(cfg)


def prepare_model(cfg: ExperimentConfig, payload: dict[str, np.ndarray]):
    """The model with the decoded global weights loaded, and the masks (strict decode).
    ``channels/`` entries: the server removed channels; the model is built in its shapes."""
    model = build_model(cfg.model, cfg.data.dataset)
    channels = {k[len(CHANNELS):]: int(v) for k, v in payload.items() if k.startswith(CHANNELS)}
    if channels:
        from ..prune.structured.io import shrink_cnn_

        shrink_cnn_(model, channels, "server payload")
        payload = {k: v for k, v in payload.items() if not k.startswith(CHANNELS)}
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

    ``plan``: the method's plan entries for this round (None: no plan, plain training),
    ``extras``: the extra records sent with it. The payload up carries the kept values
    under the global mask, or, when the method changed this client's mask (FedDST), the
    client's own mask bits and kept values."""
    t0 = time.perf_counter()
    model, masks = prepare_model(cfg, payload)
    data = client_split(cfg.data, partition_id)
    loader = make_loader(data, cfg.data.dataset, cfg.train.batch_size, shuffle=True,
                         augment=cfg.data.augment,
                         seed=cfg.run.seed * 100_003 + server_round * 1_009 + partition_id)
    masks_t = {k: torch.from_numpy(v) for k, v in masks.items()}
    device = select_device(cfg.run.device)
    model.to(device)
    method = (client_method(cfg).training(plan, extras or {}, model, masks_t, device)
              if plan is not None else None)
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


def client_query(cfg: ExperimentConfig, partition_id: int, kind: str,
                 payload: dict[str, np.ndarray], config: dict | None = None
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """A query round, answered by the method's client part (``config``: its scalars),
    with the answering process's peak resident memory so far (``peak-rss-mb``)."""
    arrays, metrics = client_method(cfg).answer(kind, partition_id, payload, config or {})
    return arrays, {**metrics, "peak-rss-mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (``prune.job.peak_memory``)."""
    from ..prune.job import peak_memory

    return peak_memory()["peak_rss_gb"] * 1024


def client_evaluate(cfg: ExperimentConfig, partition_id: int, payload: dict[str, np.ndarray]
                    ) -> dict[str, float]:
    """Evaluate the global model on this client's partition (federated evaluation)."""
    model, _ = prepare_model(cfg, payload)
    data = client_split(cfg.data, partition_id)
    loader = make_loader(data, cfg.data.dataset, cfg.train.eval_batch_size, shuffle=False)
    metrics = evaluate(model, loader, select_device(cfg.run.device))
    return {"num-examples": len(data), "loss": metrics["loss"], "accuracy": metrics["accuracy"]}
