"""One federated run on a Grid: the ServerApp body, shared by simulation and deployment.

Method-agnostic: the configured method (``fedprune.methods``) makes the round-0 mask, runs
its query rounds, plans rounds and combines replies; this module sequences them, records
every round (metrics, model, mask) and writes a checkpoint after each, from which
``resume=True`` continues the run at the next round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedprune.config import ExperimentConfig, to_flat_dict, to_yaml
from fedprune.data import partition, partition_report
from fedprune.fl.recorder import RunRecorder, load_checkpoint, read_rows
from fedprune.fl.server_core import SparseServer
from fedprune.fl.summary import print_oneshot_summary, print_round, print_summary, summarize
from fedprune.methods import Method, method_class

from .query import base_spec, run_queries
from .records import config_record
from .strategy import SparseFedAvg, record_bytes, to_numpy, to_record


def make_strategy(cfg: ExperimentConfig, core: SparseServer, method: Method,
                  sizes: list[int] | None = None) -> SparseFedAvg:
    n = cfg.data.num_clients
    return SparseFedAvg(
        core, method, sizes,
        fraction_train=cfg.fed.fraction_train,
        fraction_evaluate=cfg.fed.fraction_evaluate,
        min_train_nodes=min(cfg.fed.min_train_clients, n),
        min_evaluate_nodes=min(cfg.fed.min_train_clients, n) if cfg.fed.fraction_evaluate else 0,
        min_available_nodes=n,
    )


def run_server(grid: Grid, cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run ``cfg.fed.rounds`` rounds; write everything into ``run_dir`` as it goes.
    ``resume``: continue from ``run_dir``'s checkpoint instead of starting over."""
    method_cls = method_class(cfg.method.name)
    if cfg.method.one_shot:
        return run_oneshot(grid, cfg, run_dir, method_cls, resume)
    core = method_cls.make_core(cfg)
    method = method_cls(cfg, core)
    strategy = make_strategy(cfg, core, method, [len(p) for p in partition(cfg.data)])
    first, selection, warm = 1, None, method.warmup_rounds()
    if resume:
        done, state, masks, method_state, extra = load_checkpoint(run_dir)
        method.load_state_dict(method_state)  # first: it may change the model's shapes
        core.set_masks({n: torch.from_numpy(m) for n, m in masks.items()}, state)
        rng = extra["rng"]
        strategy.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        selection, first = extra.get("selection"), done + 1
        recorder = RunRecorder(run_dir, to_yaml(cfg), resume_round=done)
    else:
        recorder = RunRecorder(run_dir, to_yaml(cfg))
        partition_report(cfg.data, recorder.dir)
        if not warm:
            selection = run_queries(grid, method, strategy.base_spec())  # e.g. BN selection
            if selection is not None:
                recorder.write_json("selection.json", selection)
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
        recorder.save_model(state, core.masks)
        recorder.save_checkpoint(server_round, state, core.masks, method.state_dict(),
                                 {"rng": list(strategy.rng.getstate()),
                                  "selection": selection})
        print_round(row, cfg.fed.rounds)
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    def train(first_round: int, last_round: int):
        return strategy.start(
            grid=grid, initial_arrays=to_record(core.state), num_rounds=last_round,
            timeout=cfg.fed.round_timeout, train_config=config_record(cfg),
            evaluate_config=config_record(cfg), evaluate_fn=evaluate_fn,
            first_round=first_round)

    if warm and selection is None:  # warm-up rounds, then the query rounds on that model
        if first <= warm:
            train(first, warm)
        selection = run_queries(grid, method, strategy.base_spec()) or {}
        selection["after_round"] = warm
        recorder.write_json("selection.json", selection)
        cost.update(core.cost())  # the selected mask
        recorder.save_model(core.state, core.masks)
        recorder.save_checkpoint(warm, core.state, core.masks, method.state_dict(),
                                 {"rng": list(strategy.rng.getstate()),
                                  "selection": selection})
        first = max(first, warm + 1)
    result = train(first, cfg.fed.rounds)
    final = to_numpy(result.arrays) if result.arrays is not None else core.state
    recorder.save_model(final, core.masks)
    recorder.plot_accuracy()
    summary = summarize(recorder.rows, core.cost(), dense_bytes, core.layer_densities(), cfg)
    if selection is not None:
        summary["selection"] = selection
    if method.report():
        summary["method_report"] = method.report()
    recorder.write_summary(summary)
    print_summary(summary, recorder.dir)
    return summary


def run_oneshot(grid: Grid, cfg: ExperimentConfig, run_dir: Path, method_cls,
                resume: bool = False) -> dict:
    """A one-shot method (federated pruning of an LLM or a trained CNN): perplexity (or
    accuracy) before, the method's query rounds (a row per round as it ends), after, the
    pruned model saved.
    ``resume``: continue an interrupted run from what its method saved (``pooled``: every
    finished block; the others start their single round again)."""
    from fedprune.lm.clients import text_partition_report

    t0 = time.time()
    core = method_cls.make_core(cfg)
    method = method_cls(cfg, core)
    method.checkpoint_dir, method.resume = Path(run_dir), resume
    metric = core.metric  # perplexity per text source, or a CNN's test accuracy
    dense_file = Path(run_dir) / f"{metric}_dense.json"
    if resume:
        if not dense_file.is_file():
            raise ValueError(f"{run_dir}: nothing to resume (no {dense_file.name}: the "
                             "run stopped before its first query round)")
        before = json.loads(dense_file.read_text())
        saved = len(list((Path(run_dir) / "blocks").glob("block-*.safetensors")))
        rows = read_rows(Path(run_dir) / "metrics.jsonl")  # a block may take two rounds
        done = max((r["round"] for r in rows if r.get("block", saved) < saved), default=0)
        recorder = RunRecorder(run_dir, to_yaml(cfg), resume_round=done)
    else:
        recorder = RunRecorder(run_dir, to_yaml(cfg))
    text_partition_report(cfg.text, cfg.data.num_clients, recorder.dir)
    phases = {"load": time.time() - t0}
    t = time.time()
    if not resume:
        before = core.evaluate()
        recorder.write_json(dense_file.name, before)
    phases["eval_dense"] = time.time() - t
    total = {"n": len(recorder.rows)}

    def on_query(query, replies, meter) -> None:
        total["n"] += 1
        # a secure sum is one reply naming its contributors
        parts = [p for r in replies for p in r.metrics.get("contributors", [r.partition])]
        clipped = sum(int(r.metrics.get("clipped", 0)) for r in replies)
        peak = max((float(r.metrics.get("peak-rss-mb", 0.0)) for r in replies), default=0.0)
        row = {"round": total["n"], "query": query.kind, **query.config,
               "clients": len(parts), "rejected": meter["rejected"], "partitions": parts,
               "secure": query.secure is not None, "clipped": clipped,
               "bytes_down": meter["bytes_down"], "bytes_up": meter["bytes_up"],
               "bytes_total": meter["bytes_down"] + meter["bytes_up"],
               "wall_seconds": meter["seconds"], "client_peak_rss_mb": peak}
        row.pop("run-token", None)
        phase = f" ({query.config['phase']})" if "phase" in query.config else ""
        row["line"] = (f"[fedprune] {query.kind} {row.get('block', total['n'] - 1)}{phase}  "
                       f"clients {len(parts)}/{cfg.data.num_clients}"
                       f"{' (secure sum)' if query.secure is not None else ''}  "
                       f"down {meter['bytes_down'] / 1e6:7.3f} MB  "
                       f"up {meter['bytes_up'] / 1e6:8.3f} MB  {meter['seconds']:6.1f}s"
                       + (f"  ({meter['rejected']} rejected)" if meter["rejected"] else "")
                       + (f"  ({clipped} entries clipped)" if clipped else ""))
        recorder.log_round(row)
        print(row["line"], flush=True)

    t = time.time()
    record = run_queries(grid, method, base_spec(cfg, core.client_sizes()), on_query)
    phases["prune"] = time.time() - t
    t = time.time()
    after = core.evaluate()
    phases["eval_pruned"] = time.time() - t
    core.save(recorder.dir / "model")
    phases["save"] = core.save_seconds
    sparsity = core.sparsity()
    rows = recorder.rows
    summary = {
        "method": cfg.method.name, "model": cfg.method.model, "record": record,
        "metric": metric, f"{metric}_dense": before, f"{metric}_pruned": after,
        f"{metric}_dense_mean": sum(before.values()) / len(before),
        f"{metric}_pruned_mean": sum(after.values()) / len(after),
        "sparsity": sum(sparsity.values()) / len(sparsity), "layer_sparsity": sparsity,
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_per_client": sum(r["bytes_total"] for r in rows) / cfg.data.num_clients,
        # the largest peak resident memory any answering client process reported
        "client_peak_rss_mb": max((r.get("client_peak_rss_mb", 0.0) for r in rows),
                                  default=0.0),
        "phases": phases, "wall_seconds": time.time() - t0,
        "config": to_flat_dict(cfg),
    }
    recorder.write_summary(summary)
    print_oneshot_summary(summary, recorder.dir)
    return summary


def _round_row(server_round: int, metrics: dict, cost: dict, stats: dict, wall: float) -> dict:
    clients = stats.get("clients", 0)
    accepted = stats.get("accepted", 0)
    up = stats.get("bytes_up", 0)
    down = stats.get("bytes_down", 0)
    return {
        "round": server_round, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
        "density": cost["density"], "inference_flops": cost["flops_inference"],
        "training_flops": cost["flops_training"],
        "bytes_down_per_client": stats.get("bytes_down_per_client", 0),
        "bytes_up_per_client": up / accepted if accepted else 0,
        "bytes_down": down, "bytes_up": up, "bytes_total": down + up,
        "clients": clients, "failures": stats.get("failures", 0),
        "rejected": stats.get("rejected", 0), "timed_out": stats.get("timed_out", 0),
        "retries": stats.get("retries", 0),
        "wall_seconds": wall, "eval_seconds": metrics["eval_seconds"],
        "client_seconds": stats.get("client_seconds", 0.0),
        # federated evaluation on the clients' own data (fed.fraction_evaluate > 0)
        "fed_accuracy": stats.get("fed_accuracy"), "fed_loss": stats.get("fed_loss"),
        # what the method moved this round (a layer, a block, "all", "gates") and how much
        "adjusted_layer": stats.get("adjusted_layer", ""), "adjusted_k": stats.get("adjusted_k", 0),
    }
