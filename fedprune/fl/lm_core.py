"""The server's side of a federated one-shot language-model method, without Flower.

Holds the causal LM being pruned, the text partition (``text`` section; clients'
windows stay on the clients, the server only knows their sizes), and measures what a
report needs: perplexity on every source's held-out test text, sparsity per layer. The
pruned model is saved with ``save_pretrained`` (a plain transformers folder).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import ExperimentConfig
from ..lm.loading import load_causal_lm
from ..prune.adapters import adapter_for
from ..train import select_device


class LMCore:
    """The model a one-shot method prunes, and its measurements."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.run.device)
        self.model, self.tokenizer = load_causal_lm(cfg.method.model, cache_dir=cfg.data.cache_dir)
        if self.tokenizer is None:
            raise ValueError(f"method.model={cfg.method.model!r} has no tokenizer: the text "
                             "clients need one to cut their windows")
        self.model.to(self.device).eval()
        self.adapter = adapter_for(self.model)

    def client_sizes(self) -> list[int]:
        """Windows each client holds (the bound of its example count)."""
        return [self.cfg.text.windows] * self.cfg.data.num_clients

    @torch.no_grad()
    def perplexity(self) -> dict[str, float]:
        """Perplexity of the current model on each source's held-out test windows."""
        from ..lm.perplexity import perplexity

        text = self.cfg.text
        out = {}
        for source in text.sources:
            spec = f"{source}:test:{text.eval_windows}x{text.eval_length}"
            out[source] = float(perplexity(self.model, self.tokenizer, spec, self.device,
                                           progress=False, root=self.cfg.data.root,
                                           cache_dir=self.cfg.data.cache_dir)["ppl"])
        return out

    def sparsity(self) -> dict[str, float]:
        """Fraction of zeros of every prunable layer's weight."""
        out = {}
        for block in self.adapter.blocks(self.model):
            for name, module in self.adapter.prunable(block).items():
                w = module.weight
                out[name] = float((w == 0).sum()) / w.numel()
        return out

    def save(self, folder: Path) -> Path:
        """``save_pretrained`` of the model (and its tokenizer when it can be saved)."""
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(folder)
        self.save_seconds = time.perf_counter() - start
        return folder
