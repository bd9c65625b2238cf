"""Save and load structurally pruned Hugging Face models.

``save_pruned`` is ``save_pretrained`` (safetensors). When every layer has the same shapes
and the family's config can state them (Llama-like: heads, key/value heads, intermediate
size; others: intermediate size), the result loads with plain
``AutoModelForCausalLM.from_pretrained(path)``: no fedprune import, and that is checked by
``loads_plainly``. Otherwise the config carries ``fedprune_layers`` (heads, key/value heads,
intermediate size per layer) and the model loads with the one documented call::

    from fedprune.prune.structured import load_pruned
    model = load_pruned(path)  # any AutoModel class via auto_class=

which builds the model from its config, shrinks each layer to its recorded shape (the same
surgery that pruned it, keeping the first units) and loads the saved tensors strictly
(every tensor present, every shape equal; tied embeddings re-tied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for
from .select import first_keep
from .surgery import remove_units_

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def loads_plainly(config: Any) -> bool:
    """Whether stock transformers builds this config's shapes and biases (no
    ``fedprune_layers``, no ``fedprune_biases``)."""
    return (getattr(config, "fedprune_layers", None) is None
            and not getattr(config, "fedprune_biases", False))


def save_pruned(model: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """``save_pretrained`` into ``path`` (and the tokenizer, when given); returns ``path``."""
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
    return path


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / SAFETENSORS).exists():
        return load_file(path / SAFETENSORS)
    index = path / SAFETENSORS_INDEX
    if not index.exists():
        raise FileNotFoundError(f"{path}: neither {SAFETENSORS} nor {SAFETENSORS_INDEX}")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def shrink_to_shapes_(model: nn.Module, shapes: list[dict[str, int]]) -> None:
    """Shrink each block to ``shapes[i]`` by keeping its first units (key/value heads first,
    then query heads per key/value head, then intermediate channels)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if len(shapes) != len(blocks):
        raise ValueError(f"fedprune_layers lists {len(shapes)} layers; the model has "
                         f"{len(blocks)}")
    for mode, key in (("kv", "kv_heads"), ("query", "heads")):
        groups = adapter.structure_groups(model, mode)
        keep = {}
        for gs in groups:
            want = shapes[gs.block][key] if gs.kind == "attn" else shapes[gs.block]["intermediate"]
            if want > gs.units:
                raise ValueError(f"{gs.name}: fedprune_layers asks for {want} units, the "
                                 f"config builds only {gs.units}")
            per_set = want // (gs.units // gs.bucket) if gs.bucket else want
            keep[gs.name] = first_keep(gs, (gs.bucket or gs.units) - per_set)
        remove_units_(model, groups, keep)


def _add_saved_biases_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Zero biases where the saved tensors have one and the stock class builds none
    (FLAP's bias compensation on a family that hard-codes ``bias=False``)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf == "bias" and module is not None and getattr(module, "bias", None) is None \
                and hasattr(module, "weight"):
            module.bias = nn.Parameter(torch.zeros_like(value, dtype=module.weight.dtype))


def load_pruned(path: str | Path, auto_class: Any = None, **config_overrides: Any) -> nn.Module:
    """Load a model saved by :func:`save_pruned`, whatever its per-layer shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    auto_class = auto_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path, **config_overrides)
    if loads_plainly(config):
        return auto_class.from_pretrained(path, config=config)
    model = auto_class.from_config(config)
    if getattr(config, "fedprune_layers", None) is not None:
        shrink_to_shapes_(model, config.fedprune_layers)
    state = _state_dict(path)
    _add_saved_biases_(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied = tied if isinstance(tied, set) else set(tied)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}: saved tensors do not match the recorded shapes; missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


CNN_META = "fedprune_cnn.json"


def save_cnn(model: nn.Module, path: str | Path, arch: dict[str, Any]) -> Path:
    """Save a channel-pruned CNN: its (smaller) tensors as safetensors, and how to rebuild
    it: ``arch`` (``name``, ``width``, ``dataset``, ``num_classes`` for the model registry)
    and the channels every channel space kept."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "channels": adapter_for(model).layer_shapes(model)[0]}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / SAFETENSORS))
    (path / CNN_META).write_text(json.dumps(meta, indent=2))
    return path


def load_cnn(path: str | Path) -> nn.Module:
    """Rebuild a CNN saved by :func:`save_cnn`: the registry model, shrunk to the saved
    channel counts, then the saved tensors loaded strictly (no masks anywhere)."""
    from safetensors.torch import load_file

    from ...config import ModelConfig
    from ...models import build_model

    path = Path(path)
    meta = json.loads((path / CNN_META).read_text())
    arch = meta["arch"]
    model = build_model(ModelConfig(name=arch["name"], width=arch["width"],
                                    num_classes=arch.get("num_classes", 10)), arch["dataset"])
    shrink_cnn_(model, meta["channels"], str(path))
    model.load_state_dict(load_file(str(path / SAFETENSORS)), strict=True)
    return model.eval()


def shrink_cnn_(model: nn.Module, channels: dict[str, int], source: str = "channels",
                residual: str = "group") -> None:
    """Give a freshly built CNN the shapes of a channel-pruned one: every channel space
    named in ``channels`` keeps its first that many channels (the tensors loaded next
    decide their values)."""
    groups = adapter_for(model).structure_groups(model, residual=residual)
    known = {gs.name: gs for gs in groups}
    unknown = sorted(set(channels) - set(known))
    if unknown:
        raise ValueError(f"{source}: channel spaces {unknown} do not exist in "
                         f"{type(model).__name__}")
    for name, n in channels.items():
        if not 1 <= int(n) <= known[name].units:
            raise ValueError(f"{source}: {name} keeps {n} channels; the model has "
                             f"{known[name].units}")
    remove_units_(model, groups, {name: torch.arange(int(n)) for name, n in channels.items()})
