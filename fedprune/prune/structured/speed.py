"""Measured speed: a causal LM's prefill tokens/s and generation tokens/s; an image
model's images/s.

Wall-clock, inference mode, on whatever device the model is on; each figure is the median
of ``repeats`` timed runs after one untimed warm-up. Prefill: one forward pass over a
``(batch, length)`` prompt of random token ids. Generation: greedy decoding of ``new_tokens``
tokens after a short prompt with the KV cache (``generate`` with ``min_new_tokens`` so an
end-of-sequence token cannot stop it early), reported as new tokens per second including
the prompt's own pass. Times depend on the machine and its load: benchmarks record both.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Any, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def prefill_tokens_per_s(model: nn.Module, length: int = 512, batch: int = 1,
                         repeats: int = 5, seed: int = 0) -> float:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    seconds = median_seconds(lambda: model(input_ids=ids, use_cache=False), repeats, device)
    return batch * length / seconds


@torch.inference_mode()
def generation_tokens_per_s(model: nn.Module, new_tokens: int = 64, prompt: int = 16,
                            repeats: int = 3, seed: int = 0) -> float:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)
    eos = getattr(model.config, "eos_token_id", None)
    pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    def run() -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    return new_tokens / median_seconds(run, repeats, device)


def measure_speed(model: nn.Module, length: int = 512, new_tokens: int = 64,
                  repeats: int = 5) -> dict[str, float]:
    """Prefill (batch 1, ``length`` tokens) and generation tokens per second."""
    return {"prefill_tokens_per_s": prefill_tokens_per_s(model, length, repeats=repeats),
            "prefill_length": length,
            "generate_tokens_per_s": generation_tokens_per_s(model, new_tokens,
                                                             repeats=max(1, repeats // 2)),
            "generate_new_tokens": new_tokens, "threads": torch.get_num_threads()}


@torch.inference_mode()
def images_per_s(model: nn.Module, batch: int, shape: tuple[int, int, int] = (3, 32, 32),
                 repeats: int = 5, seed: int = 0) -> float:
    """Images per second of ``model`` on random ``(batch, *shape)`` input."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn((batch, *shape), generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        return batch / median_seconds(lambda: model(images), repeats, device)
    finally:
        model.train(was_training)
