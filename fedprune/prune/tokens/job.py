"""`fedprune prune --method zero-tprune|tome|random|cls-attn`: before and after token
pruning, in one report, for two kinds of model:

- an image transformer, ``--model DATASET:vit[:WIDTH]``: the briefly trained reference
  (cached, as for CNNs: fedprune.prune.cnn.reference_cnn); or ``--model
  DATASET:hf:FOLDER_OR_HUB_ID``, a Hugging Face ViT/DeiT classifier fine-tuned on the
  dataset (``fedprune.models.hf_image``); accuracy on the test split, FLOPs, images/s at
  batch 1 and 64;
- a sentence encoder, ``--model minilm`` (or a BERT-style folder / hub id): embedding
  fidelity on held-out WikiText-2 sentences (``tokens.encoder``), FLOPs, sentences/s.

Token pruning changes no weight, so the dense and pruned rows use the same model, the
pruner attached or not. FLOPs come from the token counts each block saw (through the
adapter); speed is measured (median of timed runs, on whatever else the machine is doing:
record the load).
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
    model: str = "cifar10:vit:16"  # or a sentence encoder: minilm, a folder, a hub id
    method: str = "zero-tprune"
    keep: list[float] = field(default_factory=list)  # per block (zero-tprune, random, cls-attn)
    r: int = 0  # tokens merged per block (tome)
    options: dict[str, Any] = field(default_factory=dict)  # e.g. s_share, seed
    epochs: int = 3  # reference training epochs (cached)
    eval_images: int = 0  # 0 = the whole test split
    eval_sentences: int = 512  # encoders: held-out WikiText-2 sentences
    out: str = "runs/tokens"
    device: str = "auto"
    seed: int = 0
    speed: bool = True


def make_pruner(job: TokenJob):
    if job.method == "tome":
        if job.keep:
            raise ValueError("--keep is a keep-fraction schedule (zero-tprune, random, "
                             "cls-attn); tome takes --merge-r")
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
    adapter = adapter_for(model)
    row["tokens_per_block"] = adapter.token_counts(model)
    row["flops"] = adapter.token_flops(model, row["tokens_per_block"])
    if speed:
        row["images_per_s_batch1"] = images_per_s(model, 1, repeats=20)
        row["images_per_s_batch64"] = images_per_s(model, 64, repeats=5)
    return row


def is_image_model(spec: str) -> bool:
    from ...data.sources import DATASET_NAMES

    return ":" in spec and spec.split(":", 1)[0] in DATASET_NAMES


def _image_rows(job: TokenJob, pruner, device) -> dict[str, Any]:
    from ...config import ModelConfig
    from ..cnn import reference_cnn
    from ..job import _parse_cnn_model

    dataset, rest = job.model.split(":", 1)
    if rest.startswith("hf:"):  # a Hugging Face image classifier: DATASET:hf:FOLDER_OR_ID
        from ...models.hf_image import load_image_classifier

        model = load_image_classifier(rest[3:], dataset).to(device)
    else:
        dataset, arch, width = _parse_cnn_model(job.model)
        model = reference_cnn(ModelConfig(name=arch, width=width), dataset, job.epochs,
                              job.seed, device=device).eval()
    adapter_for(model).token_blocks(model)  # a model without token sites fails here
    report = {"dense": measure(model, dataset, job.eval_images, job.speed, device)}
    pruner.attach(model)
    try:
        report["pruned"] = measure(model, dataset, job.eval_images, job.speed, device)
    finally:
        pruner.detach(model)
    report["accuracy_drop"] = report["dense"]["accuracy"] - report["pruned"]["accuracy"]
    if job.speed:
        for b in ("batch1", "batch64"):
            report[f"speedup_{b}"] = (report["pruned"][f"images_per_s_{b}"]
                                      / report["dense"][f"images_per_s_{b}"])
    return report


def _encoder_rows(job: TokenJob, pruner, device) -> dict[str, Any]:
    from ...lm.loading import load_encoder
    from .encoder import held_out_sentences, length_batches, measure_encoder, sentences_per_s

    model, tokenizer = load_encoder(job.model, attn_implementation="eager")
    model.to(device).eval()
    if tokenizer is None:
        raise FileNotFoundError(f"--model {job.model}: the encoder folder has no tokenizer")
    adapter_for(model).token_blocks(model)  # a model without token sites fails here
    batches = length_batches(held_out_sentences(tokenizer, job.eval_sentences), 64)
    dense, reference = measure_encoder(model, batches, None, job.speed, device)
    if job.speed:  # the fused kernel, for the honest dense baseline (it returns no probs)
        model.config._attn_implementation = "sdpa"
        dense["sentences_per_s_batched_sdpa"] = sentences_per_s(model, batches, device)
        model.config._attn_implementation = "eager"
    report = {"dense": dense, "sentences": len(reference)}
    pruner.attach(model)
    try:
        report["pruned"], _ = measure_encoder(model, batches, reference, job.speed, device)
    finally:
        pruner.detach(model)
    if job.speed:
        for b in ("batch1", "batched"):
            report[f"speedup_{b}"] = (report["pruned"][f"sentences_per_s_{b}"]
                                      / report["dense"][f"sentences_per_s_{b}"])
    return report


def run_token_job(job: TokenJob) -> dict[str, Any]:
    from ...train import select_device

    pruner = make_pruner(job)  # bad schedules fail before any model is built
    device = select_device(job.device)
    rows = _image_rows if is_image_model(job.model) else _encoder_rows
    report: dict[str, Any] = {"job": asdict(job), "machine": platform.platform(),
                              "threads": torch.get_num_threads(), **rows(job, pruner, device)}
    report["flops_reduction"] = 1 - report["pruned"]["flops"] / report["dense"]["flops"]
    text = json.dumps(report, indent=1).encode()
    atomic_write(Path(job.out) / "report.json", lambda f: f.write(text))
    return report
