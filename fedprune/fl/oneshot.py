"""What a federated one-shot method needs of its model family, in one place (Flower-free).

``method.model`` names a causal LM (an alias such as ``smollm2-135m``, a folder or a hub
id; clients calibrate on their private text, ``text`` section) or ``cnn``: the CNN of the
``model`` section on ``data.dataset``, with the weights of ``method.weights`` (a
safetensors state dict) or, when that is empty, the briefly trained reference CNN of
``fedprune prune`` (``fedprune.prune.cnn.reference_cnn``: seeded, cached per machine; it
stands in for a pre-trained model, which CIFAR-10 lacks offline). A CNN client calibrates
on ``method.calib_images`` images of its own training partition (``data`` section).

Per family: the dense model (loaded once per process), a client's calibration batches,
how many statistics rows one example adds to each layer, random probe inputs (for the
public fixed-point scales of secure aggregation) and the bound of a client's example
count.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig

CNN = "cnn"


def is_cnn(cfg: ExperimentConfig) -> bool:
    return cfg.method.model == CNN


def load_dense(cfg: ExperimentConfig) -> tuple[torch.nn.Module, Any]:
    """(dense model, tokenizer or None), shared by every call in this process: read-only."""
    if is_cnn(cfg):
        m = cfg.method
        return _cnn(cfg.model.name, cfg.model.width, cfg.data.dataset, m.weights,
                    m.reference_epochs, cfg.run.seed, cfg.data.root, cfg.data.cache_dir), None
    return _lm(cfg.method.model, cfg.data.cache_dir)


def fresh_dense(cfg: ExperimentConfig) -> tuple[torch.nn.Module, Any]:
    """A new copy of the dense model (and the tokenizer), for whoever prunes in place."""
    if is_cnn(cfg):
        import copy

        return copy.deepcopy(load_dense(cfg)[0]), None
    return _lm.__wrapped__(cfg.method.model, cfg.data.cache_dir)


@functools.lru_cache(maxsize=2)
def _lm(name: str, cache_dir: str):
    from ..lm.loading import load_causal_lm

    model, tokenizer = load_causal_lm(name, cache_dir=cache_dir)
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=2)
def _cnn(name: str, width: int, dataset: str, weights: str, epochs: int, seed: int,
         root: str, cache_dir: str) -> torch.nn.Module:
    from ..config import ModelConfig
    from ..models import build_model
    from ..prune.cnn import reference_cnn

    if not weights:
        return reference_cnn(ModelConfig(name=name, width=width), dataset, epochs, seed,
                             root=root, cache_dir=cache_dir).eval()
    from safetensors.torch import load_file

    model = build_model(ModelConfig(name=name, width=width), dataset)
    try:
        model.load_state_dict(load_file(weights))
    except (RuntimeError, OSError) as err:
        raise ValueError(f"method.weights={weights!r} does not hold a {name} (width "
                         f"{width}) for {dataset}: {err}") from None
    return model.eval()


def client_batches(cfg: ExperimentConfig, partition_id: int, tokenizer: Any
                   ) -> list[torch.Tensor]:
    """Client ``partition_id``'s calibration batches: its text windows (one per batch), or
    the first ``method.calib_images`` images of a seeded shuffle of its partition."""
    if is_cnn(cfg):
        from ..data import ArraySplit, client_split, make_loader

        split = client_split(cfg.data, partition_id)
        n = min(cfg.method.calib_images, len(split))
        idx = np.sort(np.random.default_rng(cfg.run.seed + partition_id)
                      .permutation(len(split))[:n])
        sample = ArraySplit(np.asarray(split.images[idx]), np.asarray(split.labels[idx]))
        return [x for x, _ in make_loader(sample, cfg.data.dataset, 64, shuffle=False)]
    from ..lm.clients import partition_text

    windows = partition_text(cfg.text, cfg.data.num_clients, tokenizer, cfg.data.root,
                             cfg.data.cache_dir)[partition_id].windows
    return list(windows.split(1))


def examples(batches: list[torch.Tensor]) -> int:
    """Windows or images in a client's batches (its example count)."""
    return sum(len(b) for b in batches)


def example_bound(cfg: ExperimentConfig) -> int:
    """The most examples one client calibrates on."""
    return cfg.method.calib_images if is_cnn(cfg) else cfg.text.windows


def client_sizes(cfg: ExperimentConfig) -> list[int]:
    """Each client's example count (CNN: its partition may hold fewer than the quota)."""
    if is_cnn(cfg):
        from ..data import partition

        return [min(cfg.method.calib_images, len(p)) for p in partition(cfg.data)]
    return [cfg.text.windows] * cfg.data.num_clients


def rows_per_example(cfg: ExperimentConfig, model: torch.nn.Module) -> dict[str, int]:
    """Statistics rows one example adds to each prunable layer: a window's tokens; an
    image's output positions for a conv, 1 for a linear layer (measured on one image)."""
    from ..prune.adapters import adapter_for
    from ..prune.pipeline import collect_model_stats

    adapter = adapter_for(model)
    names = [n for b in adapter.blocks(model) for n in adapter.prunable(b)]
    if not is_cnn(cfg):
        return dict.fromkeys(names, cfg.text.length)
    stats = collect_model_stats(model, adapter, [probe_inputs(cfg, model, 1)[0]], {"sq_norm"})
    return {n: stats[n].rows for n in names}


def probe_inputs(cfg: ExperimentConfig, model: torch.nn.Module, count: int
                 ) -> list[torch.Tensor]:
    """``count`` random inputs, one per batch, seeded: uniformly random token ids, or
    standard-normal images (the scale of normalized ones); no client data."""
    generator = torch.Generator().manual_seed(cfg.run.seed)
    if is_cnn(cfg):
        from ..models.registry import input_shape

        shape = input_shape(cfg.data.dataset)
        return list(torch.randn((count, *shape), generator=generator).split(1))
    vocab = model.get_input_embeddings().num_embeddings
    return list(torch.randint(vocab, (count, cfg.text.length), generator=generator).split(1))
