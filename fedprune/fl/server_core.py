"""The server's side of sparse federated training, without Flower.

Holds the global weights and mask, encodes what goes down, strictly decodes what comes
up (a bad reply is rejected with its reason, never averaged), aggregates, evaluates.
The Flower strategy in ``server/`` only moves these payloads in messages.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data import make_loader, test_split
from ..masks import apply_masks_, count_flops, count_params, global_density, layer_densities
from ..masks import wire
from ..models import build_model, input_shape
from ..train import evaluate, select_device
from .aggregate import weighted_average


CHANNELS = "channels/"  # payload entries: a pruned channel space's kept count


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_state_(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})


class SparseServer:
    """Global model + mask of one run, and the operations a round needs."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        seed_everything(cfg.run.seed)
        self.device = select_device(cfg.run.device)
        self.model = build_model(cfg.model, cfg.data.dataset)
        if cfg.model.init_file:
            from ..models.weights import load_weights_file

            load_weights_file(self.model, cfg.model.init_file)
        self.initial_state = model_state(self.model)  # dense: candidates start from it
        from ..methods import method_class

        masks = method_class(cfg.method.name).initial_masks(self.model, cfg)
        apply_masks_(self.model, masks)
        self.masks_t = masks
        self.masks = {k: v.cpu().numpy().astype(bool) for k, v in masks.items()}
        self.state = model_state(self.model)
        self.template = wire.template_of(self.state)
        self.channels: dict[str, int] = {}  # channel spaces physically pruned, kept counts
        self._test = None

    def set_masks(self, masks: dict[str, torch.Tensor], state: dict[str, np.ndarray]) -> None:
        """Replace the global mask and weights (e.g. after adaptive BN selection)."""
        self.masks_t = {k: v.cpu().bool() for k, v in masks.items()}
        self.masks = {k: v.numpy() for k, v in self.masks_t.items()}
        load_state_(self.model, state)
        apply_masks_(self.model, self.masks_t)
        self.state = model_state(self.model)

    def restructure_(self, channels: dict[str, int], keep: dict[str, torch.Tensor] | None = None
                     ) -> None:
        """Remove channels physically (``fedprune.prune.structured``): the model, its masks,
        the global state and the wire template all take the smaller shapes. ``keep``: which
        channels of each space stay (default: the first ``channels[name]``, the layout of a
        checkpoint that already holds the smaller tensors)."""
        import copy

        from ..prune.adapters import adapter_for
        from ..prune.structured.surgery import remove_units_

        groups = adapter_for(self.model).structure_groups(self.model)
        keep = keep or {n: torch.arange(int(c)) for n, c in channels.items()}
        holder = copy.deepcopy(self.model)  # the masks ride through the same surgery
        params = dict(holder.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks_t.items():
                params[name].copy_(mask.float())
        remove_units_(holder, groups, keep)
        remove_units_(self.model, groups, keep)
        shrunk = dict(holder.named_parameters())
        self.masks_t = {n: shrunk[n].detach().cpu() != 0 for n in self.masks_t}
        self.masks = {k: v.numpy() for k, v in self.masks_t.items()}
        apply_masks_(self.model, self.masks_t)
        self.state = model_state(self.model)
        self.template = wire.template_of(self.state)
        self.channels = {**self.channels, **{n: int(k.numel()) for n, k in keep.items()}}

    # ------------------------------------------------------------------ wire
    def encode_down(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global state under the mask, plus the kept channel counts once channels
        were removed (the client builds its model in those shapes)."""
        payload = wire.encode_down(state, self.masks)
        payload.update({f"{CHANNELS}{n}": np.array(c, np.int64)
                        for n, c in self.channels.items()})
        return payload

    def decode_reply(self, payload: dict[str, np.ndarray], client: str) -> dict[str, np.ndarray]:
        """Dense state from a client's kept values; raises ``wire.WireError``."""
        return wire.decode_up(payload, self.template, self.masks, client)

    def aggregate(self, states: list[dict[str, np.ndarray]], weights: list[float]
                  ) -> dict[str, np.ndarray]:
        self.state = weighted_average(states, weights, self.cfg.fed.aggregation,
                                      self.cfg.fed.trim)
        return self.state

    # ------------------------------------------------------------------ metrics
    def evaluate(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """Centralized test accuracy and loss of ``state``."""
        if self._test is None:
            self._test = test_split(self.cfg.data)
        load_state_(self.model, state)
        loader = make_loader(self._test, self.cfg.data.dataset, self.cfg.train.eval_batch_size,
                             shuffle=False)
        return evaluate(self.model, loader, self.device)

    def cost(self) -> dict[str, float]:
        """Density, params and FLOPs of the current mask vs the dense model."""
        shape = (1, *input_shape(self.cfg.data.dataset))
        flops = count_flops(self.model, shape, self.masks_t)
        params = count_params(self.model, self.masks_t)
        return {"density": global_density(self.masks_t), **_prefixed(flops, "flops"),
                **_prefixed(params, "params")}

    def layer_densities(self) -> dict[str, float]:
        return layer_densities(self.masks_t)


def _prefixed(d: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in d.items() if isinstance(v, (int, float))}
