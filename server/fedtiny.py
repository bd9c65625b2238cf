"""Adaptive BN selection as two query rounds on the Grid (FedTiny's coarse pruning).

Thin: candidates, statistics, pooling and selection are fedprune.fedtiny functions; this
module only sends them as Flower messages and rejects malformed replies with a reason.
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.common import log
from flwr.serverapp import Grid

from fedprune.config import ExperimentConfig
from fedprune.fedtiny.bn_selection import pack_candidates, parse_bn_reply, with_pooled_bn
from fedprune.fedtiny.candidates import build_candidates, select_candidate
from fedprune.fl.server_core import SparseServer, load_state_
from fedprune.models import build_model

from .query import ask, wait_for_nodes
from .records import to_numpy


def adaptive_bn_selection(grid: Grid, cfg: ExperimentConfig, core: SparseServer) -> dict:
    """Pick the candidate mask with the lowest weighted loss under pooled BN; install it."""
    dense = build_model(cfg.model, cfg.data.dataset)
    load_state_(dense, core.initial_state)
    candidates = build_candidates(dense, cfg.mask.density, cfg.fedtiny.candidates,
                                  cfg.mask.seed, cfg.fedtiny.spread)
    masks = [{n: m.numpy() for n, m in c.items()} for _, c in candidates]
    states = [{n: (v * m[n] if n in m else v) for n, v in core.initial_state.items()}
              for m in masks]
    expected = {n: int(b.num_features) for n, b in dense.named_modules()
                if hasattr(b, "running_mean") and b.running_mean is not None}
    nodes, meter = wait_for_nodes(grid, cfg.data.num_clients), {"bytes_down": 0, "bytes_up": 0}

    per_candidate: list[list] = [[] for _ in candidates]  # Round A: BN statistics
    for msg in ask(grid, cfg, nodes, "bn_stats", pack_candidates(states, masks), meter):
        try:
            stats = parse_bn_reply(to_numpy(msg.content["arrays"]), expected, len(candidates),
                                   f"node {msg.metadata.src_node_id}")
        except (ValueError, KeyError) as err:
            log(WARNING, "rejected BN statistics: %s", err)
            continue
        for k, s in enumerate(stats):
            per_candidate[k].append(s)
    if not per_candidate[0]:
        raise RuntimeError("adaptive BN selection: no client returned valid BN statistics")
    pooled = [with_pooled_bn(cfg, s, p) for s, p in zip(states, per_candidate)]

    losses, counts = [], []  # Round B: loss of each candidate with pooled BN
    for msg in ask(grid, cfg, nodes, "candidate_loss", pack_candidates(pooled, masks), meter):
        row = [float(v) for v in msg.content["metrics"]["losses"]]
        if len(row) != len(candidates):
            log(WARNING, "rejected losses from node %s: %d values for %d candidates",
                msg.metadata.src_node_id, len(row), len(candidates))
            continue
        losses.append(row)
        counts.append(int(msg.content["metrics"]["num-examples"]))
    best = select_candidate(losses, counts)
    core.set_masks(candidates[best][1], pooled[best])
    total = float(sum(counts))
    weighted = [sum(c * r[k] for r, c in zip(losses, counts)) / total
                for k in range(len(candidates))]
    log(INFO, "adaptive BN selection: chose %s (weighted losses %s)", candidates[best][0],
        [round(w, 4) for w in weighted])
    return {"candidates": [name for name, _ in candidates], "chosen": candidates[best][0],
            "weighted_losses": weighted, "clients_stats": len(per_candidate[0]),
            "clients_losses": len(losses), **meter}
