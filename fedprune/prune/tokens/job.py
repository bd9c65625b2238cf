"""`fedprune prune --method zero-tprune|tome|random` on an image transformer: accuracy,
FLOPs and measured throughput before and after token pruning, in one report.

The model is the briefly trained reference of ``--model DATASET:vit[:WIDTH]`` (cached,
as for CNNs: fedprune.prune.cnn.reference_cnn). Token pruning changes no weight, so the
dense and pruned rows use the same model, the pruner attached or not. FLOPs come from
the token counts each block saw (``ViT.flops``); images/s are measured (median of timed
runs at batch 1 and 64, on whatever else the machine is doing: record the load).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...data.cache import atomic_write
from ..adapters import adapter_for
from .methods import schedule_pruner


@dataclass
class TokenJob:
    model: str = "cifar10:vit:16"
    method: str = "zero-tprune"
    keep: list[float] = field(default_factory=list)  # per block (zero-tprune, random)
    r: int = 0  # tokens merged per block (tome)
    options: dict[str, Any] = field(default_factory=dict)  # e.g. s_share, seed
    epochs: int = 3  # reference training epochs (cached)
    eval_images: int = 0  # 0 = the whole test split
    out: str = "runs/tokens"
    device: str = "auto"
    seed: int = 0
    speed: bool = True


def make_pruner(job: TokenJob):
    if job.method == "tome":
        if job.keep:
            raise ValueError("--keep is a zero-tprune/random schedule; tome takes --merge-r")
        if job.r < 1:
            raise ValueError(f"--merge-r must be >= 1 for tome, got {job.r}")
        return schedule_pruner("tome", job.r, **job.options)
    if job.r:
        raise ValueError(f"--merge-r is ToMe's schedule; {job.method} takes --keep")
    if not job.keep:
        raise ValueError(f"{job.method} needs --keep: the fraction of tokens each block keeps, "
                         "e.g. --keep 1,0.7,1,0.7,1,0.7")
    return schedule_pruner(job.method, job.keep, **job.options)


def measure(model, dataset: str, eval_images: int = 0, speed: bool = True,
            device="cpu") -> dict[str, Any]:
    """Test accuracy (first ``eval_images``; 0 = all), the token counts and FLOPs of that
    pass, and measured images/s at batch 1 and 64 (``speed``), as the model stands."""
    from ..cnn import accuracy_on_test
    from ..structured.speed import images_per_s

    row = {"accuracy": accuracy_on_test(model, dataset, device=device, subset=eval_images)}
    row["tokens_per_block"] = list(model.last_tokens)
    row["flops"] = model.flops(model.last_tokens)
    if speed:
        row["images_per_s_batch1"] = images_per_s(model, 1, repeats=20)
        row["images_per_s_batch64"] = images_per_s(model, 64, repeats=5)
    return row


def run_token_job(job: TokenJob) -> dict[str, Any]:
    from ...config import ModelConfig
    from ...train import select_device
    from ..cnn import reference_cnn
    from ..job import _parse_cnn_model

    dataset, arch, width = _parse_cnn_model(job.model)
    pruner = make_pruner(job)  # bad schedules fail before any training
    device = select_device(job.device)
    model = reference_cnn(ModelConfig(name=arch, width=width), dataset, job.epochs, job.seed,
                          device=device).eval()
    adapter_for(model).token_blocks(model)  # a model without token sites fails here
    report: dict[str, Any] = {"job": asdict(job), "machine": platform.platform(),
                              "threads": torch.get_num_threads()}
    report["dense"] = measure(model, dataset, job.eval_images, job.speed, device)
    pruner.attach(model)
    try:
        report["pruned"] = measure(model, dataset, job.eval_images, job.speed, device)
    finally:
        pruner.detach(model)
    dense, pruned = report["dense"], report["pruned"]
    report["flops_reduction"] = 1 - pruned["flops"] / dense["flops"]
    report["accuracy_drop"] = dense["accuracy"] - pruned["accuracy"]
    if job.speed:
        for b in ("batch1", "batch64"):
            report[f"speedup_{b}"] = pruned[f"images_per_s_{b}"] / dense[f"images_per_s_{b}"]
    text = json.dumps(report, indent=1).encode()
    atomic_write(Path(job.out) / "report.json", lambda f: f.write(text))
    return report
