"""Starting weights from a file (``model.init_file``): a safetensors state dict that must
match the built model tensor for tensor."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import ConfigError


def load_weights_file(model: nn.Module, path: str, setting: str = "model.init_file") -> None:
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{setting}={path!r} does not exist")
    state = load_file(str(file))
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ConfigError(f"{setting}={path!r} does not fit model {type(model).__name__}: "
                          f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in state.items():
        if tensor.numel() == own[name].numel() == 1:  # run files store scalars as (1,)
            state[name] = tensor.reshape(own[name].shape)
        elif tensor.shape != own[name].shape:
            raise ConfigError(f"{setting}={path!r}: tensor {name} has shape "
                              f"{tuple(tensor.shape)}, the model's is {tuple(own[name].shape)}")
    model.load_state_dict(state)
