"""``fixed``: the mask is drawn once at round 0 and never moves (sparse FedAvg under it).

``init``: ``dense`` (no pruning; dense FedAvg with ``mask.density=1``), ``uniform``,
``erk``, ``global_magnitude``, ``random`` (``fedprune.masks.init``), or ``file``: the mask
of an earlier run (its ``mask.safetensors``) on freshly initialised weights, the
random-reinit control of Liu et al. 2019 ("Rethinking the Value of Network Pruning").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError, MethodConfig, check_choice
from ..masks import init_masks
from ..masks.files import load_masks
from ..masks.init import MASK_INITS
from .base import Method, register_method


def check_init(key: str, value: str) -> None:
    check_choice(key, value, tuple(MASK_INITS))


def start_masks(model, cfg, init: str, file: str = ""):
    """Round-0 masks by an initialiser name (or from ``file``), honouring mask.exclude."""
    if init == "file":
        return load_masks(file, model, cfg.mask.exclude)
    return init_masks(model, cfg.mask.density, init, seed=cfg.mask.seed,
                      exclude=cfg.mask.exclude)


@dataclass
class FixedConfig(MethodConfig):
    name: str = "fixed"
    init: str = "erk"  # dense | uniform | erk | global_magnitude | random | file
    file: str = ""  # init=file: an earlier run's mask.safetensors
    paths: ClassVar[tuple[str, ...]] = ("file",)
    server_paths: ClassVar[tuple[str, ...]] = ("file",)  # the round-0 mask: server side

    def __post_init__(self) -> None:
        check_choice("method.init", self.init, tuple(MASK_INITS) + ("file",))
        if (self.init == "file") != bool(self.file):
            raise ConfigError(f"method.file={self.file!r} is not valid: set method.file "
                              "exactly when method.init='file'")


@register_method
class Fixed(Method):
    config_cls = FixedConfig

    @classmethod
    def initial_masks(cls, model, cfg):
        return start_masks(model, cfg, cfg.method.init, cfg.method.file)
