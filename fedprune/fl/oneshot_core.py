"""The server's side of a federated one-shot method, without Flower.

Holds the model being pruned (a causal LM, or a CNN: ``fedprune.fl.oneshot``; the
clients' data stays on the clients, the server only knows their sizes) and measures what
a report needs: perplexity on every text source's held-out test text, or a CNN's test
accuracy; sparsity per layer. A language model is saved with ``save_pretrained`` (a plain
transformers folder), a CNN as a safetensors state dict.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import ExperimentConfig
from ..prune.adapters import adapter_for
from ..train import select_device
from . import oneshot


class OneShotCore:
    """The model a one-shot method prunes, and its measurements."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.run.device)
        self.model, self.tokenizer = oneshot.fresh_dense(cfg)  # pruned in place: its own copy
        if self.tokenizer is None and not oneshot.is_cnn(cfg):
            raise ValueError(f"method.model={cfg.method.model!r} has no tokenizer: the text "
                             "clients need one to cut their windows")
        self.model.to(self.device).eval()
        self.adapter = adapter_for(self.model)
        self.metric = "accuracy" if oneshot.is_cnn(cfg) else "perplexity"

    def client_sizes(self) -> list[int]:
        """Examples each client calibrates on (the bound of its example count)."""
        return oneshot.client_sizes(self.cfg)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Perplexity on each text source's held-out test windows, or test accuracy."""
        cfg = self.cfg
        if oneshot.is_cnn(cfg):
            from ..prune.cnn import accuracy_on_test

            return {"test": float(accuracy_on_test(self.model, cfg.data.dataset, cfg.data.root,
                                                   cfg.data.cache_dir, self.device,
                                                   cfg.data.test_subset))}
        from ..lm.perplexity import perplexity

        text = cfg.text
        out = {}
        for source in text.sources:
            spec = f"{source}:test:{text.eval_windows}x{text.eval_length}"
            out[source] = float(perplexity(self.model, self.tokenizer, spec, self.device,
                                           progress=False, root=cfg.data.root,
                                           cache_dir=cfg.data.cache_dir)["ppl"])
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
        """``save_pretrained`` of a language model (and its tokenizer when it can be
        saved); a CNN's state dict as ``model.safetensors``."""
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        if oneshot.is_cnn(self.cfg):
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous()
                       for k, v in self.model.state_dict().items()},
                      str(folder / "model.safetensors"))
        else:
            self.model.save_pretrained(folder)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(folder)
        self.save_seconds = time.perf_counter() - start
        return folder
