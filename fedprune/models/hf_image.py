"""A Hugging Face image classifier (ViT, DeiT, ...) wrapped to take fedprune's image
batches: normalised for fedprune's dataset at its own size (CIFAR-10: 32x32), returning
logits in the dataset's class order. So the checkpoints token-pruning papers report on
(DeiT-S; a ViT fine-tuned on CIFAR-10) run through the same accuracy, FLOPs and speed
code as fedprune's own ViT.

The wrapper undoes the dataset's normalisation, resizes to the model's ``image_size``
(bilinear), normalises with the model's image processor's mean and std (0.5 each, the ViT
default, when the checkpoint has no processor file), and reorders the logits by class
name (``config.id2label``): a checkpoint whose labels are not the dataset's classes is
refused with both lists named. Generic labels (``LABEL_0`` ...) are taken in the dataset's
order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.readers import CIFAR10_CLASSES

CLASS_NAMES = {"cifar10": CIFAR10_CLASSES, "mnist": tuple(str(d) for d in range(10))}


class HFImageClassifier(nn.Module):
    def __init__(self, model: nn.Module, dataset: str, image_mean, image_std) -> None:
        super().__init__()
        from ..data.loader import NORMALIZATION

        if dataset not in NORMALIZATION:
            raise ValueError(f"no normalisation known for dataset {dataset!r}; known: "
                             f"{list(NORMALIZATION)}")
        self.hf = model
        self.config = model.config
        mean, std = NORMALIZATION[dataset]
        self.register_buffer("data_mean", torch.tensor(mean).view(1, -1, 1, 1), False)
        self.register_buffer("data_std", torch.tensor(std).view(1, -1, 1, 1), False)
        self.register_buffer("model_mean", torch.tensor(image_mean).view(1, -1, 1, 1), False)
        self.register_buffer("model_std", torch.tensor(image_std).view(1, -1, 1, 1), False)
        self.register_buffer("order", class_order(model.config, dataset), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * self.data_std + self.data_mean  # back to [0, 1]
        if pixels.shape[1] == 1 and self.config.num_channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        size = self.config.image_size
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear",
                                   align_corners=False)
        pixels = (pixels - self.model_mean) / self.model_std
        return self.hf(pixel_values=pixels).logits[:, self.order]


def class_order(config, dataset: str) -> torch.Tensor:
    """Index of each dataset class among the model's logits, matched by name."""
    classes = list(CLASS_NAMES[dataset])
    labels = [str(config.id2label[i]).lower() for i in range(config.num_labels)]
    if labels == [f"label_{i}" for i in range(len(labels))] and len(labels) == len(classes):
        return torch.arange(len(classes))
    missing = [c for c in classes if c not in labels]
    if missing:
        raise ValueError(f"the model's labels {labels} do not name the {dataset} classes "
                         f"{classes} (missing: {missing}): token pruning is measured on "
                         f"{dataset}'s test split, so load a checkpoint fine-tuned on it")
    return torch.tensor([labels.index(c) for c in classes])


def load_image_classifier(name_or_path: str, dataset: str, cache_dir: str = "",
                          attn_implementation: str = "eager") -> HFImageClassifier:
    """A folder or hub id of an ``AutoModelForImageClassification`` checkpoint, wrapped,
    in eval mode. ``eager`` attention by default: token pruning reads the probabilities."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from ..lm.loading import resolve_model

    where, hub = resolve_model(name_or_path, cache_dir)
    try:
        model = AutoModelForImageClassification.from_pretrained(
            where, attn_implementation=attn_implementation)
    except Exception as err:
        if not hub:
            raise
        raise OSError(f"could not load the image classifier {name_or_path!r} from the Hugging "
                      f"Face hub (no local folder has that name): {err}") from err
    try:
        processor = AutoImageProcessor.from_pretrained(where)
        mean, std = list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        mean, std = [0.5] * model.config.num_channels, [0.5] * model.config.num_channels
    return HFImageClassifier(model, dataset, mean, std).eval()
