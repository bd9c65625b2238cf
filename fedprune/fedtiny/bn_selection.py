"""Adaptive BN selection, both sides, Flower-free (FedTiny, Huang et al. 2023, Sec. IV-A).

Round A: each client runs every candidate in train mode over its local data and returns,
per candidate and BN layer, the exact input statistics with their count (nothing else).
The server pools them (``bn_stats.pool_bn_stats``) into each candidate's BN buffers.
Round B: each client evaluates every candidate, with its pooled BN, on its local data and
returns the mean loss, the error rate and its example count; the server keeps the
candidate with the lowest example-weighted loss, or error with ``method.select_on: error``
(``candidates.select_candidate``).

Payload keys: ``"<k>/<wire key>"`` for candidate k's model (``masks.wire.encode_down``);
statistics ``"<k>/<bn>/mean|var|count"``. The server checks replies against the spec in
``fedprune.methods.fedtiny`` (finite means, non-negative variances, counts equal to the
client's examples times the layer's positions per example).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data import client_split, make_loader
from ..fl.client_core import prepare_model
from ..masks import wire
from ..models import build_model
from ..train import evaluate, select_device
from .bn_stats import BNStats, apply_bn_stats_, collect_bn_stats, pool_bn_stats

STAT_FIELDS = ("mean", "var", "count")


def pack_candidates(states: list[dict[str, np.ndarray]], masks: list[dict[str, np.ndarray]]
                    ) -> dict[str, np.ndarray]:
    """All candidates' down payloads in one flat dict (packed masks + kept values)."""
    out = {}
    for k, (state, mask) in enumerate(zip(states, masks)):
        out.update({f"{k}/{key}": v for key, v in wire.encode_down(state, mask).items()})
    return out


def _unpack_candidates(cfg: ExperimentConfig, payload: dict[str, np.ndarray]
                       ) -> list[torch.nn.Module]:
    groups: dict[int, dict[str, np.ndarray]] = {}
    for key, value in payload.items():
        k, rest = key.split("/", 1)
        groups.setdefault(int(k), {})[rest] = value
    return [prepare_model(cfg, groups[k])[0] for k in sorted(groups)]


def _local_batches(cfg: ExperimentConfig, partition_id: int):
    data = client_split(cfg.data, partition_id)
    return data, make_loader(data, cfg.data.dataset, cfg.train.eval_batch_size, shuffle=False)


def client_bn_stats(cfg: ExperimentConfig, partition_id: int, payload: dict[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray], int]:
    """Round A on a client: exact BN input statistics of every candidate on local data,
    and the example count."""
    data, batches = _local_batches(cfg, partition_id)
    device = select_device(cfg.run.device)
    out = {}
    for k, model in enumerate(_unpack_candidates(cfg, payload)):
        for name, s in collect_bn_stats(model, batches, device, train_mode=True).items():
            out[f"{k}/{name}/mean"] = s.mean
            out[f"{k}/{name}/var"] = s.var
            out[f"{k}/{name}/count"] = np.array(s.count, dtype=np.int64)
    return out, len(data)


def client_candidate_losses(cfg: ExperimentConfig, partition_id: int,
                            payload: dict[str, np.ndarray]
                            ) -> tuple[list[float], list[float], int]:
    """Round B on a client: mean loss and error rate (1 - top-1 accuracy) of every
    candidate (with pooled BN) on local data, and the example count."""
    data, batches = _local_batches(cfg, partition_id)
    device = select_device(cfg.run.device)
    scores = [evaluate(m, batches, device) for m in _unpack_candidates(cfg, payload)]
    return [s["loss"] for s in scores], [1.0 - s["accuracy"] for s in scores], len(data)


def with_pooled_bn(cfg: ExperimentConfig, state: dict[str, np.ndarray],
                   per_client: list[dict[str, BNStats]]) -> dict[str, np.ndarray]:
    """``state`` with its BN running buffers replaced by the clients' pooled statistics."""
    model = build_model(cfg.model, cfg.data.dataset)
    model.load_state_dict({n: torch.from_numpy(np.asarray(v)) for n, v in state.items()})
    apply_bn_stats_(model, pool_bn_stats(per_client))
    return {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
