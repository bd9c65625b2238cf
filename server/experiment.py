"""One federated run on a Grid: the ServerApp body, shared by simulation and deployment."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedprune.config import CLIENT_SCORED, ExperimentConfig, to_yaml
from fedprune.data import partition_report
from fedprune.fl.recorder import RunRecorder
from fedprune.fl.server_core import SparseServer
from fedprune.fl.summary import print_round, print_summary, summarize

from .adjust import make_adjuster
from .fedtiny import adaptive_bn_selection
from .init_scores import client_scored_masks
from .records import config_record
from .strategy import SparseFedAvg, record_bytes, to_numpy, to_record


def make_strategy(cfg: ExperimentConfig, core: SparseServer) -> SparseFedAvg:
    n = cfg.data.num_clients
    return SparseFedAvg(
        core, make_adjuster(cfg, core),
        fraction_train=cfg.fed.fraction_train,
        fraction_evaluate=cfg.fed.fraction_evaluate,
        min_train_nodes=min(cfg.fed.min_train_clients, n),
        min_evaluate_nodes=min(cfg.fed.min_train_clients, n) if cfg.fed.fraction_evaluate else 0,
        # wait for every node: round 1 can otherwise start before all have registered
        min_available_nodes=n,
    )


def run_server(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Run ``cfg.fed.rounds`` rounds of sparse FedAvg; write everything into ``run_dir``."""
    random.seed(cfg.run.seed)  # Flower samples nodes with the global `random`
    core = SparseServer(cfg)
    recorder = RunRecorder(run_dir, to_yaml(cfg))
    partition_report(cfg.data, recorder.dir)
    selection = {}  # query rounds before training, by their record name
    if cfg.mask.init in CLIENT_SCORED:  # SNIP / SynFlow scored by the clients
        selection["score_init"] = client_scored_masks(grid, cfg, core)
    if cfg.fedtiny.candidates:  # FedTiny coarse pruning: replaces the mask.init mask
        selection["bn_selection"] = adaptive_bn_selection(grid, cfg, core)
    for name, record in selection.items():
        (recorder.dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    strategy = make_strategy(cfg, core)
    cost = core.cost()
    dense_bytes = record_bytes(to_record(core.state))  # one dense model, serialized
    clock = {"t": time.time()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = to_numpy(arrays)
        t_eval = time.time()
        metrics = core.evaluate(state)
        metrics["eval_seconds"] = time.time() - t_eval
        stats = strategy.stats.get(server_round, {})
        if stats.get("adjusted_layer"):  # the mask moved: density and FLOPs with it
            cost.update(core.cost())
        now = time.time()
        row = _round_row(server_round, metrics, cost, stats, now - clock["t"])
        clock["t"] = now
        recorder.log_round(row)
        recorder.save_model(state, core.masks)  # checkpoint every round
        print_round(row, cfg.fed.rounds)
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    result = strategy.start(
        grid=grid, initial_arrays=to_record(core.state), num_rounds=cfg.fed.rounds,
        timeout=cfg.fed.round_timeout,
        train_config=config_record(cfg), evaluate_config=config_record(cfg),
        evaluate_fn=evaluate_fn,
    )
    final = to_numpy(result.arrays) if result.arrays is not None else core.state
    recorder.save_model(final, core.masks)
    recorder.plot_accuracy()
    summary = summarize(recorder.rows, core.cost(), dense_bytes, core.layer_densities(), cfg)
    summary.update(selection)
    recorder.write_summary(summary)
    print_summary(summary, recorder.dir)
    return summary


def _round_row(server_round: int, metrics: dict, cost: dict, stats: dict, wall: float) -> dict:
    clients = stats.get("clients", 0)
    down = stats.get("bytes_down_per_client", 0) * clients
    up = stats.get("bytes_up", 0)
    accepted = max(clients - stats.get("failures", 0), 0)
    return {
        "round": server_round, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
        "density": cost["density"], "inference_flops": cost["flops_inference"],
        "training_flops": cost["flops_training"],
        "bytes_down_per_client": stats.get("bytes_down_per_client", 0),
        "bytes_up_per_client": up / accepted if accepted else 0,
        "bytes_down": down, "bytes_up": up, "bytes_total": down + up,
        "clients": clients, "failures": stats.get("failures", 0),
        "wall_seconds": wall, "eval_seconds": metrics["eval_seconds"],
        "client_seconds": stats.get("client_seconds", 0.0),
        # federated evaluation on the clients' own data (fed.fraction_evaluate > 0)
        "fed_accuracy": stats.get("fed_accuracy"), "fed_loss": stats.get("fed_loss"),
        # FedTiny progressive pruning: the layer whose mask moved this round, and by how much
        "adjusted_layer": stats.get("adjusted_layer", ""), "adjusted_k": stats.get("adjusted_k", 0),
    }
