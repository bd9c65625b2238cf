"""CNNs with BatchNorm and a small ViT, registered by name (see registry.py)."""

from . import convnet, resnet, vgg, vit  # noqa: F401  (registration)
from .registry import build_model, input_shape, register_model, registered_models

__all__ = ["build_model", "input_shape", "register_model", "registered_models"]
