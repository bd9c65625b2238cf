"""Pruning methods, one registered module each; importing this package registers them all."""

from . import admm, magnitude, sparsegpt, wanda  # noqa: F401  (register on import)
from .admm import AdmmConfig, admm_prune, admm_update
from .magnitude import MagnitudeConfig
from .sparsegpt import SparseGPTConfig, reconstruction_error, sparsegpt_prune
from .wanda import WandaConfig, wanda_scores

__all__ = [
    "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "AdmmConfig",
    "wanda_scores", "sparsegpt_prune", "reconstruction_error", "admm_prune", "admm_update",
]
