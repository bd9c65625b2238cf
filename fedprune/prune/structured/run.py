"""`fedprune shrink`: structured (width) or depth pruning of a causal LM, evaluated and saved.

load -> (dense perplexity, dense speed) -> calibration windows -> shrink / remove blocks ->
perplexity, speed -> (LoRA recovery, merged; perplexity again) -> ``save_pretrained``. ``report.json`` is rewritten after every phase, so
an interrupted run keeps what it measured. The saved model loads with plain
``AutoModelForCausalLM.from_pretrained`` when its shapes are uniform (the report says
``loads_with_transformers``), else with ``fedprune.prune.structured.load_pruned``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ...config import ConfigError
from ...train import select_device
from ..adapters import adapter_for
from .depth import DEPTH_PRESETS, DepthConfig, prune_depth
from .io import loads_plainly, save_pruned
from .job import StructuredConfig, decoder_params, shrink
from .recovery import LoraRecoveryConfig, lora_recover

MODES = ("width", "depth")


@dataclass
class ShrinkJob:
    model: str = "smollm2-135m"
    mode: str = "width"  # "width": heads/channels; "depth": whole blocks
    criterion: str = "taylor"  # width: structured criteria; depth: DEPTH_PRESETS
    fraction: float = 0.2  # share of the decoder's parameters to remove
    allocation: str = "uniform"
    prune: str = "both"
    heads: str = "kv"
    skip_first: int = 0
    skip_last: int = 0
    bias_compensation: bool = False
    round_to: int = 32  # kept channels per layer a multiple of this (fast GEMM shapes)
    calib: str = "ptb:10x128"  # LLM-Pruner: 10 samples of 64 tokens; Shortened LLaMA 10x128
    eval: str = "wikitext2:64x512,ptb:64x512"  # comma-separated specs; "" to skip
    out: str = "runs/shrink"
    device: str = "auto"
    seed: int = 0
    speed: bool = False  # measure prefill/generation tokens/s before and after
    recover_steps: int = 0  # LoRA recovery steps after pruning (0: none)
    recover_text: str = "ptb:256x128"  # recovery windows (calibration split of the source)
    recover_lr: float = 1e-4
    eval_dense: bool = True
    save_model: bool = True

    def width_config(self) -> StructuredConfig:
        return StructuredConfig(self.criterion, self.allocation, self.fraction, self.prune,
                                self.heads, self.skip_first, self.skip_last,
                                self.bias_compensation, round_to=self.round_to)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}; choose one of {list(MODES)}")
        if self.mode == "width":
            self.width_config()
        else:
            DepthConfig(self.criterion, 1)
        from ...lm import parse_spec

        parse_spec(self.calib)
        for spec in self.eval_specs():
            parse_spec(spec)
        if self.recover_steps:
            parse_spec(self.recover_text)
            self.recovery_config()

    def recovery_config(self) -> LoraRecoveryConfig:
        return LoraRecoveryConfig(steps=self.recover_steps, lr=self.recover_lr)

    def eval_specs(self) -> list[str]:
        return [s.strip() for s in self.eval.split(",") if s.strip()]


def _evaluate(model: torch.nn.Module, tokenizer: Any, job: ShrinkJob,
              device: torch.device) -> dict[str, float]:
    from ...lm import perplexity

    return {spec.split(":")[0]: perplexity(model, tokenizer, spec, device, progress=False)["ppl"]
            for spec in job.eval_specs()}


class _Report:
    def __init__(self, out: Path, job: ShrinkJob) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.data = out / "report.json", {"job": asdict(job), "status": "running",
                                                     "timings": {}}
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def timed(self, phase: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        value = fn()
        self.data["timings"][phase] = round(time.perf_counter() - t0, 3)
        self.flush()
        return value


def run_shrink(job: ShrinkJob) -> dict[str, Any]:
    """Run ``job``; the report (also ``<out>/report.json``)."""
    from ...lm import calibration_batches, load_causal_lm
    from .speed import measure_speed

    job.validate()
    device = select_device(job.device)
    rep = _Report(Path(job.out), job)
    model, tokenizer = rep.timed("load", lambda: load_causal_lm(job.model))
    model.to(device).eval()
    d = rep.data
    d["params_before"], d["decoder_before"] = (sum(p.numel() for p in model.parameters()),
                                               decoder_params(model))
    if job.eval_specs() and job.eval_dense:
        d["dense_ppl"] = rep.timed("eval_dense", lambda: _evaluate(model, tokenizer, job, device))
    if job.speed:
        d["dense_speed"] = rep.timed("speed_dense", lambda: measure_speed(model))
    ids = calibration_batches(tokenizer, job.calib, job.seed)  # (N, L)
    calib = list(ids.split(1))  # one sequence per batch
    if job.mode == "width":
        d["shrink"] = rep.timed("prune", lambda: shrink(model, job.width_config(), calib,
                                                        device=device).as_dict())
    else:
        n = len(adapter_for(model).blocks(model))
        remove = max(1, round(job.fraction * n))
        d["depth"] = rep.timed("prune", lambda: prune_depth(
            model, DepthConfig(job.criterion, remove), calib, device))
    d["params_after"], d["decoder_after"] = (sum(p.numel() for p in model.parameters()),
                                             decoder_params(model))
    d["decoder_removed"] = round(1 - d["decoder_after"] / d["decoder_before"], 6)
    if job.eval_specs():
        d["pruned_ppl"] = rep.timed("eval_pruned", lambda: _evaluate(model, tokenizer, job,
                                                                     device))
    if job.speed:
        d["pruned_speed"] = rep.timed("speed_pruned", lambda: measure_speed(model))
    if job.recover_steps:
        train = calibration_batches(tokenizer, job.recover_text, job.seed + 1)
        model, d["recovery"] = rep.timed("recover", lambda: lora_recover(
            model, train, job.recovery_config()))
        if job.eval_specs():
            d["recovered_ppl"] = rep.timed("eval_recovered",
                                           lambda: _evaluate(model, tokenizer, job, device))
    if job.save_model:
        rep.timed("save", lambda: save_pruned(model, Path(job.out) / "model", tokenizer))
        d["loads_with_transformers"] = loads_plainly(model.config)
    d["status"] = "done"
    rep.flush()
    return d


__all__ = ["DEPTH_PRESETS", "ShrinkJob", "run_shrink"]
