"""End-of-run summary: accuracy, density, FLOPs and bytes against the dense baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ExperimentConfig, to_flat_dict


def summarize(rows: list[dict], cost: dict, dense_model_bytes: int,
              layer_densities: dict[str, float], cfg: ExperimentConfig) -> dict[str, Any]:
    """Summary of a finished (or partial) run from its per-round rows.

    Dense FedAvg would send the whole model down and up to the same clients every round:
    2 * clients * dense_model_bytes per round, which is what ``bytes_vs_dense`` divides by.
    """
    trained = [r for r in rows if r["round"] > 0]
    final = rows[-1] if rows else {}
    sent = sum(r["bytes_total"] for r in trained)
    dense = sum(2 * r["clients"] * dense_model_bytes for r in trained)
    return {
        "rounds": len(trained),
        "final_accuracy": final.get("accuracy"),
        "best_accuracy": max((r["accuracy"] for r in trained), default=None),
        "initial_accuracy": rows[0]["accuracy"] if rows else None,
        "density": cost["density"],
        "params_total": cost["params_total"],
        "params_effective": cost["params_effective"],
        "inference_flops": cost["flops_inference"],
        "inference_flops_dense": cost["flops_inference_dense"],
        "flops_vs_dense": cost["flops_inference"] / cost["flops_inference_dense"],
        "training_flops": cost["flops_training"],
        "bytes_total": sent,
        "bytes_dense_fedavg": dense,
        "bytes_vs_dense": sent / dense if dense else None,
        "wall_seconds": sum(r["wall_seconds"] for r in rows),
        "layer_densities": layer_densities,
        "config": to_flat_dict(cfg),
    }


def print_round(row: dict, rounds: int) -> None:
    """One progress line per round (visible while the run goes on)."""
    print(f"[fedprune] round {row['round']:>3}/{rounds}  acc {100 * row['accuracy']:6.2f}%  "
          f"loss {row['loss']:.4f}  density {row['density']:.4f}  "
          f"sent {row['bytes_total'] / 1e6:8.3f} MB  {row['wall_seconds']:6.1f}s"
          + _failures(row), flush=True)


def _failures(row: dict) -> str:
    """What went wrong this round, if anything (the reasons are in the run's Flower log)."""
    parts = [f"{row[k]} {label}" for k, label in (("rejected", "rejected"),
                                                   ("timed_out", "timed out"),
                                                   ("retries", "retries")) if row.get(k)]
    return f"  ({', '.join(parts)}; reasons in flower.log)" if parts else ""


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedprune run summary ({run_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    ratio = summary["bytes_vs_dense"]
    for name, value in [
        ("rounds", str(summary["rounds"])),
        ("final test accuracy", f"{100 * summary['final_accuracy']:.2f}%"),
        ("best test accuracy", f"{100 * summary['best_accuracy']:.2f}%"
         if summary["best_accuracy"] is not None else "-"),
        ("global density (prunable)", f"{summary['density']:.4f}"),
        ("params kept / total", f"{summary['params_effective']:,} / {summary['params_total']:,}"),
        ("inference FLOPs (vs dense)", f"{summary['inference_flops'] / 1e6:.2f} M "
         f"({100 * summary['flops_vs_dense']:.1f}%)"),
        ("bytes sent (vs dense FedAvg)", f"{summary['bytes_total'] / 1e6:.2f} MB "
         f"({100 * ratio:.1f}% of {summary['bytes_dense_fedavg'] / 1e6:.2f} MB)"
         if ratio is not None else "-"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
    ]:
        table.add_row(name, value)
    Console().print(table)


def print_oneshot_summary(summary: dict, run_dir: Path) -> None:
    """The table of a one-shot run: perplexity per source (or a CNN's test accuracy) before
    and after, sparsity, bytes, time."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedprune {summary['method']} summary ({run_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    metric = summary.get("metric", "perplexity")
    for source, dense in summary[f"{metric}_dense"].items():
        after = summary[f"{metric}_pruned"][source]
        table.add_row(f"{metric} {source} (dense -> pruned)",
                      f"{dense:.2f} -> {after:.2f}" if metric == "perplexity"
                      else f"{100 * dense:.2f}% -> {100 * after:.2f}%")
    table.add_row("sparsity (pruned layers)", f"{summary['sparsity']:.4f}")
    table.add_row("bytes per client (down + up)", f"{summary['bytes_per_client'] / 1e6:.2f} MB")
    if summary.get("client_peak_rss_mb"):
        table.add_row("peak client memory (RSS)", f"{summary['client_peak_rss_mb']:.0f} MB")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
    Console().print(table)
