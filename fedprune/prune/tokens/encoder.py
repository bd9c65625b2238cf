"""Token pruning on a sentence encoder (BERT-style, e.g. all-MiniLM-L6-v2): how close the
pruned model's sentence embeddings stay to the unpruned ones.

Held-out text: sentences of WikiText-2 *test* (no calibration happens: token pruning has
none), split at `` . `` and tokenized with the encoder's tokenizer ([CLS] ... [SEP]);
those of ``min_tokens`` to ``max_tokens`` tokens, the first ``count`` distinct ones in file
order.
Token pruning needs unpadded batches, so sentences of equal length are batched together
(at most ``batch`` per batch): no padding, no attention mask, exact.

Embedding: all-MiniLM-L6-v2's own pooling (mean over tokens, then unit length), with each
token weighted by the tokens merged into it (ToMe's sizes; 1 for pruning), so merging
keeps the mean it replaces. Fidelity: cosine of each pruned embedding with its unpruned
twin (mean and minimum), and retrieval: the share of pruned embeddings whose nearest
unpruned embedding (cosine) among all of them is their own twin.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..adapters import adapter_for
from ..adapters.hf_tokens import token_state


def held_out_sentences(tokenizer: Any, count: int, min_tokens: int = 16,
                       max_tokens: int = 64, root: str = "") -> list[list[int]]:
    """Token ids ([CLS] ... [SEP]) of the first ``count`` distinct WikiText-2 test sentences
    whose length is in [min_tokens, max_tokens] (a repeated sentence would be its own
    twin's rival in retrieval)."""
    from ...lm.text import load_text

    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for line in load_text("wikitext2", "test", root).splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue  # headings
        for sentence in line.split(" . "):
            ids = tokenizer(sentence.strip() + " .")["input_ids"]
            if min_tokens <= len(ids) <= max_tokens and tuple(ids) not in seen:
                seen.add(tuple(ids))
                out.append(ids)
                if len(out) == count:
                    return out
    if not out:
        raise ValueError(f"no WikiText-2 test sentence has {min_tokens}-{max_tokens} tokens")
    return out


def length_batches(sentences: list[list[int]], batch: int) -> list[tuple[list[int], torch.Tensor]]:
    """(sentence indices, ids (B, L)) batches of equal-length sentences, at most ``batch``."""
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(sentences):
        by_len.setdefault(len(ids), []).append(i)
    out = []
    for length in sorted(by_len):
        idx = by_len[length]
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            out.append((part, torch.tensor([sentences[i] for i in part])))
    return out


@torch.inference_mode()
def embed(model, batches, device="cpu") -> tuple[torch.Tensor, float]:
    """Unit-length sentence embeddings (N, D) in sentence order, and the mean FLOPs per
    sentence of this pass (from each batch's token counts)."""
    adapter = adapter_for(model)
    adapter.token_blocks(model)  # installs the sites: counts and sizes are recorded
    n = sum(len(idx) for idx, _ in batches)
    out, flops = None, 0.0
    for idx, ids in batches:
        hidden = model(input_ids=ids.to(device)).last_hidden_state.float()
        sizes = token_state(model).sizes.float()
        pooled = (hidden * sizes).sum(1) / sizes.sum(1)
        if out is None:
            out = torch.empty(n, pooled.shape[1])
        out[idx] = F.normalize(pooled, dim=-1).cpu()
        flops += len(idx) * adapter.token_flops(model, adapter.token_counts(model))
    return out, flops / n


def fidelity(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Cosine of each pruned embedding with its twin, and twin-retrieval top-1."""
    cos = (dense * pruned).sum(1)
    nearest = (pruned @ dense.T).argmax(1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "retrieval_top1": float((nearest == torch.arange(len(dense))).float().mean())}


@torch.inference_mode()
def sentences_per_s(model, batches, device="cpu", repeats: int = 3) -> float:
    """Sentences/s encoding every batch (median of ``repeats`` timed passes after one)."""
    from ..structured.speed import median_seconds

    def run() -> None:
        for _, ids in batches:
            model(input_ids=ids.to(device))
    seconds = median_seconds(run, repeats, torch.device(device))
    return sum(len(idx) for idx, _ in batches) / seconds


def measure_encoder(model, batches, reference: torch.Tensor | None, speed: bool,
                    device="cpu") -> tuple[dict[str, Any], torch.Tensor]:
    """One row (fidelity to ``reference``, FLOPs, speed) and the embeddings."""
    emb, flops = embed(model, batches, device)
    row: dict[str, Any] = {"flops": flops, **fidelity(emb if reference is None else reference,
                                                      emb)}
    if speed:
        row["sentences_per_s_batched"] = sentences_per_s(model, batches, device)
        singles = [([i], ids[j:j + 1]) for idx, ids in batches for j, i in enumerate(idx)][:64]
        row["sentences_per_s_batch1"] = sentences_per_s(model, singles, device)
    return row, emb
