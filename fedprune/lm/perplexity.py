"""Perplexity of a causal LM over non-overlapping windows of a tokenized text split.

The protocol of the reference pruning code (SparseGPT ``llama_eval``/``opt_eval``, Wanda
``lib/eval.eval_ppl_wikitext``): the split's ids (T,) are cut into K = T // L windows
``ids[i*L:(i+1)*L]`` (the tail shorter than L is dropped), each window is one independent
forward pass without context from the previous window, and window i predicts its tokens
1..L-1 from the preceding ones (L-1 predictions; its first token is never predicted).
The spec's N takes the first N windows (``all``: all K).

With per-token negative log-likelihoods ``nll_it`` (natural log)::

    ppl = exp( sum_{i,t} nll_it / (N * (L - 1)) )

The reference writes ``exp(sum_i(loss_i * L) / (N * L))`` with ``loss_i`` window i's mean
over its L-1 predictions; the L cancels, so both are the same number. The only difference
is rounding: here each token's NLL is computed from float32 (or wider) logits and the sum
is accumulated in float64, where the reference sums float32 window means.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedprune.lm.spec import TextSpec, parse_spec
from fedprune.lm.tokens import encode_split

__all__ = ["encode_split", "eval_windows", "perplexity", "window_nll"]


def eval_windows(ids: torch.Tensor, count: int | None, length: int,
                 name: str = "token ids") -> torch.Tensor:
    """The first ``count`` (None: all) non-overlapping windows of ids (T,), (N, L)."""
    ids = ids.reshape(-1)
    available = ids.numel() // length
    if available == 0:
        raise ValueError(f"{name}: {ids.numel()} tokens, fewer than one window of {length}")
    if count is not None and count > available:
        raise ValueError(f"{name}: {ids.numel()} tokens hold only {available} windows of "
                         f"{length}, but {count} were asked for")
    wanted = available if count is None else count
    return ids[: wanted * length].reshape(wanted, length)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each window's L-1 next-token predictions, (B,) float64."""
    logits = _logits(model, windows)[:, :-1]  # (B, L-1, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = windows[:, 1:]  # (B, L-1)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L-1)
    return nll.double().sum(dim=1)


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def perplexity(model: torch.nn.Module, tokenizer_or_ids: Any, spec: str | TextSpec,
               device: str | torch.device | None = None, batch_size: int = 1,
               progress: bool = True, *, root: str = "", cache_dir: str = "") -> dict:
    """Perplexity over the spec's first N windows of L tokens (default split: test).

    ``tokenizer_or_ids``: a tokenizer (the split is tokenized and cached by
    :func:`encode_split`) or ids (T,) already tokenized, for which the spec's source and
    split are only a label. ``device``: where batches go (None: the model's device); the
    model is not moved. Returns ``ppl``, ``nll`` (summed, nats), ``tokens`` (predictions,
    N*(L-1)), ``windows`` (N), ``seconds`` (wall time of the forward passes) and ``spec``.
    """
    parsed = parse_spec(spec)
    split = parsed.evaluation_split()
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids
    else:
        ids = encode_split(tokenizer_or_ids, parsed.source, split, root, cache_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = eval_windows(ids, parsed.count, parsed.length,
                           f"text spec '{parsed}' ({parsed.source} {split})")  # (N, L)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    start = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(total=len(windows), desc=f"ppl {parsed}",
                                          unit="win", disable=not progress) as bar:
            for first in range(0, len(windows), batch_size):
                batch = windows[first:first + batch_size].to(device)  # (B, L)
                total += window_nll(model, batch).sum().item()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    tokens = len(windows) * (parsed.length - 1)
    mean = total / tokens
    ppl = math.inf if mean > 709.0 else math.exp(mean)  # math.exp overflows past 709
    return {"ppl": ppl, "nll": total, "tokens": tokens,
            "windows": len(windows), "seconds": time.perf_counter() - start,
            "spec": f"{parsed.source}:{split}:{len(windows)}x{parsed.length}"}
