"""A client's side of sparse federated training, without Flower.

The client rebuilds the model, decodes the global weights and mask, trains on its own
partition only with the mask enforced, and returns only the kept values.
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
                 server_round: int = 0, adjust: tuple[str, int] | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train on this client's partition; return (kept-values payload, metrics).

    ``adjust = (layer, K)``: also keep the top-K gradients at that layer's pruned positions
    (FedTiny); they come back as ``index/<layer>``, ``value/<layer>`` entries in
    ``metrics["topk"]`` (a wire.encode_sparse payload)."""
    t0 = time.perf_counter()
    model, masks = prepare_model(cfg, payload)
    data = client_split(cfg.data, partition_id)
    loader = make_loader(data, cfg.data.dataset, cfg.train.batch_size, shuffle=True,
                         augment=cfg.data.augment,
                         seed=cfg.run.seed * 100_003 + server_round * 1_009 + partition_id)
    masks_t = {k: torch.from_numpy(v) for k, v in masks.items()}
    device = select_device(cfg.run.device)
    buffer, hook = _topk_hook(model, masks_t, adjust, device)
    stats = train_local(model, loader, cfg.train, masks_t, device, on_backward=hook)
    reply = wire.encode_up(model_state(model.cpu()), masks)
    if buffer is not None:
        stats["topk"] = wire.encode_sparse(
            {adjust[0]: (buffer.index.numpy(), buffer.value.numpy().astype(np.float32))})
    # compute_seconds: the client's own work (decode, data, train, encode); the
    # scale benchmark subtracts it from round wall time to get framework overhead.
    return reply, {"num-examples": len(data), **stats,
                   "compute_seconds": time.perf_counter() - t0}


def client_evaluate(cfg: ExperimentConfig, partition_id: int, payload: dict[str, np.ndarray]
                    ) -> dict[str, float]:
    """Evaluate the global model on this client's partition (federated evaluation)."""
    model, _ = prepare_model(cfg, payload)
    data = client_split(cfg.data, partition_id)
    loader = make_loader(data, cfg.data.dataset, cfg.train.eval_batch_size, shuffle=False)
    metrics = evaluate(model, loader, select_device(cfg.run.device))
    return {"num-examples": len(data), "loss": metrics["loss"], "accuracy": metrics["accuracy"]}


def _topk_hook(model: torch.nn.Module, masks: dict[str, torch.Tensor],
               adjust: tuple[str, int] | None, device: torch.device):
    """(buffer, hook) collecting the scheduled layer's pruned-position gradients, or Nones."""
    if not adjust:
        return None, None
    from ..fedtiny.progressive import TopKBuffer

    layer, k = adjust
    if layer not in masks:
        raise ValueError(f"fedtiny layer {layer!r} is not a masked tensor of the model")
    param = dict(model.named_parameters())[layer]
    buffer = TopKBuffer(k, masks[layer].to(device))

    def hook() -> None:
        if param.grad is not None:
            buffer.add_(param.grad)

    return buffer, hook
