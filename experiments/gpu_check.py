"""Check the Flower-free core on CUDA (when present): masked local training and evaluation.

    python experiments/gpu_check.py            # uses CUDA when present, else CPU

Synthetic CIFAR-shaped data (no data files needed, so it runs on a bare GPU machine):
trains ResNet-8 with an ERK mask at 10% density on the selected device, checks that
pruned weights stay exactly zero and that the loss falls, and prints steps/s per device.
"""

from __future__ import annotations

import json
import time

import torch

from fedprune.config import ModelConfig, TrainConfig
from fedprune.masks import apply_masks_, global_density, init_masks
from fedprune.models import build_model
from fedprune.train import evaluate, select_device, train_local


def batches(n: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n * 64,), generator=g)
    # learnable signal: class-dependent mean image plus noise
    means = torch.randn(10, 3, 32, 32, generator=g)
    x = means[y] + 0.5 * torch.randn(n * 64, 3, 32, 32, generator=g)
    return [(x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64]) for i in range(n)]


def run(device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet8", width=16))
    masks = init_masks(model, 0.1, "erk")
    apply_masks_(model, masks)
    data = batches(40, 0)
    before = evaluate(model, data, device)
    t0 = time.perf_counter()
    stats = train_local(model, data, TrainConfig(local_epochs=3, lr=0.05), masks, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = evaluate(model, data, device)
    params = dict(model.named_parameters())
    leaked = sum(int((params[n].detach().cpu()[~m]).count_nonzero()) for n, m in masks.items())
    assert leaked == 0, f"{leaked} pruned weights became non-zero on {device}"
    assert after["loss"] < before["loss"], (before, after)
    return {"device": str(device), "name": torch.cuda.get_device_name() if device.type == "cuda"
            else "cpu", "density": global_density(masks), "loss_before": before["loss"],
            "loss_after": after["loss"], "steps_per_s": stats["steps"] / seconds,
            "pruned_nonzero": leaked}


if __name__ == "__main__":
    results = [run(select_device("auto"))]
    if results[0]["device"] != "cpu":
        results.append(run(torch.device("cpu")))
    print(json.dumps(results, indent=1))
