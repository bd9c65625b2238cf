"""Polarization-regularized binary channel gates, Flower-free core (federated "gates" phase).

Zhi et al. 2023, "Learning a Consensus Sub-Network with Polarization Regularization and One
Pass Training" (arXiv 2302.10798): one learnable gate per output channel of each gated
conv/linear layer, applied as a *binary* gate with a straight-through estimator (STE), trained
jointly with the dense weights under the polarization regularizer of Zhuang et al. 2020
("Neuron-level Structured Pruning using Polarization Regularizer", NeurIPS), then frozen into a
static structured sub-network; training continues sparse in the same pass. Here the clients
train gates locally and the server averages them into consensus gates (example-weighted, done
by the caller) before :func:`gate_masks` turns them into masks at ``mask.density``.

Gate. Parameter ``g in [0, 1]^C`` per gated layer, initialised to 1 (every channel open: the
run starts from the dense network). Forward: ``out[:, c] = y[:, c] * b_c`` with the binary
``b_c = 1[g_c >= 0.5]``, so a closed channel is exactly zero. Backward (STE, Bengio et al.
2013): ``dL/dg_c = dL/db_c = sum_{batch, positions} dL/dout[:, c] * y[:, c]``, identity
through the threshold. After each optimizer step ``g`` is projected onto ``[0, 1]`` (done
lazily at the start of the next forward: projected SGD; Zhuang et al. likewise clamp the
scaling factors to ``[0, 1]``).

Where the gate acts. A per-channel factor in front of a BatchNorm is normalised away in train
mode (BN is scale invariant per channel), so its CE gradient vanishes. A layer followed
directly by a BatchNorm (its only consumer) is therefore gated at the BN's *output*; any other
layer at its own output. Layers whose output reaches the model output without passing another
conv/linear (the classifier) are not gated. The conv -> BN graph comes from ``torch.fx``.

Loss. ``CE + lam * R(g)`` with Zhuang et al.'s polarization over all gates of the network
concatenated (one global mean, as in their reference code):

    R(g) = t * ||g||_1 - ||g - mean(g) * 1_n||_1

Target sparsity. ``R`` is concave on ``[0, 1]^n`` (linear minus convex), so its minimum lies
on a vertex; a vertex with ``k`` ones has ``R = t k - 2 k (n - k) / n``, minimised at
``k / n = (2 - t) / 4``. On its own the regularizer thus drives the open fraction of gates to
``keep = (2 - t) / 4``; :func:`polarization_t` inverts this (``t = 2 - 4 keep``, ``keep`` in
(0, 1), ``t`` in (-2, 2)) so a user-defined channel keep fraction sets ``t``. The final
weight density is enforced exactly afterwards by :func:`gate_masks`.

Choices (the method section of Zhi et al. was not available to check against; these follow
Zhuang et al. and the STE literature and should be read as ours): init 1.0 (Zhuang et al.
start BN scales at 0.5, which would sit on a binary gate's threshold), threshold 0.5, plain
identity STE, global (not per-layer) mean, the ``keep -> t`` mapping above instead of a
separate sparsity loss, and the mask rule in :func:`gate_masks`.

Masks vs gates. A mask zeroes the closed channel's weight *rows*; a BatchNorm after it then
outputs its shift ``beta_c`` (and a linear its bias) instead of the gate's exact zero, and the
next layer's input columns for that channel are not masked (densities count rows only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import numpy as np
import torch
import torch.fx
from torch import nn

from ..masks.allocate import check_density
from ..masks.core import Masks, prunable_names

GATE_INIT = 1.0  # every channel open at the start: the dense network
THRESHOLD = 0.5  # open iff g >= THRESHOLD

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (*_CONVS, nn.Linear)
_BNS = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class GateSite:
    """One gated layer: its weight (whose rows the gate switches) and where the gate acts."""

    weight: str  # conv/linear weight name, e.g. "layers.0.0.conv1.weight"
    module: str  # module whose output is gated: the BatchNorm after the layer, or the layer
    channels: int  # output channels = gate length
    axis: int  # channel axis of that output: 1 for conv/BN, -1 for linear


# ----------------------------------------------------------------------------- gate sites


def _reaches_output(node: torch.fx.Node, layers: set[str]) -> bool:
    """True if some path from ``node`` reaches the graph output without another layer."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user.op == "output":
            return True
        if user in seen or (user.op == "call_module" and user.target in layers):
            continue
        seen.add(user)
        stack.extend(user.users)
    return False


def _site(model_modules: dict[str, nn.Module], node: torch.fx.Node, name: str) -> GateSite:
    layer = model_modules[name]
    channels = layer.weight.shape[0]
    bns = [u for u in node.users
           if u.op == "call_module" and isinstance(model_modules[u.target], _BNS)]
    if bns and len(node.users) > 1:
        raise ValueError(f"tensor {name + '.weight'!r}: its output feeds a BatchNorm and other "
                         "layers; a channel gate cannot be placed for both")
    if bns:
        bn = model_modules[bns[0].target]
        if bn.num_features != channels:
            raise ValueError(f"tensor {name + '.weight'!r}: BatchNorm {bns[0].target!r} has "
                             f"{bn.num_features} features, the layer {channels} outputs")
        return GateSite(f"{name}.weight", bns[0].target, channels, 1)
    return GateSite(f"{name}.weight", name, channels, 1 if isinstance(layer, _CONVS) else -1)


def gate_sites(model: nn.Module, exclude: Sequence[str] = ()) -> list[GateSite]:
    """The gated layers of ``model`` in module order (prunable minus the classifier head)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types; all mean "no static graph"
        raise ValueError(f"gates: torch.fx cannot trace {type(model).__name__} ({err}); the "
                         "gates need the layer graph to find each layer's BatchNorm") from err
    modules = dict(model.named_modules())
    layers = {n[: -len(".weight")] for n in prunable_names(model, exclude)}
    calls: dict[str, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layers:
            if node.target in calls:
                raise ValueError(f"tensor {node.target + '.weight'!r}: layer is called more "
                                 "than once per forward; one gate per channel is ambiguous")
            calls[node.target] = node
    sites = []
    for name in (n[: -len(".weight")] for n in prunable_names(model, exclude)):
        node = calls.get(name)
        if node is None or _reaches_output(node, layers):
            continue  # unused layer, or the classifier head: stays ungated (dense)
        sites.append(_site(modules, node, name))
    return sites


def gate_shapes(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, tuple[int]]:
    """Gated weight name -> gate shape ``(out_channels,)`` (the server's template)."""
    return {s.weight: (s.channels,) for s in gate_sites(model, exclude)}


# ----------------------------------------------------------------------------- gate + loss


class _BinarySTE(torch.autograd.Function):
    """``1[g >= THRESHOLD]`` forward; identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:  # (C,) -> (C,)
        return (g >= THRESHOLD).to(g.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def binary_gate(g: torch.Tensor) -> torch.Tensor:
    """Binary gate values of ``g`` with a straight-through gradient."""
    return _BinarySTE.apply(g)


def polarization(gates: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """Zhuang et al.'s ``R(g) = t ||g||_1 - ||g - mean(g)||_1`` over all gates concatenated."""
    g = torch.cat([x.reshape(-1) for x in gates])  # (n,)
    return t * g.abs().sum() - (g - g.mean()).abs().sum()


def polarization_t(keep: float) -> float:
    """``t`` at which the polarizer alone keeps a ``keep`` fraction of gates open (2 - 4 keep)."""
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep={keep!r} must be in (0, 1)")
    return 2.0 - 4.0 * keep


# ----------------------------------------------------------------------------- the module


def _as_array(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def check_gate_values(shapes: Mapping[str, tuple[int, ...]], values: Mapping[str, object]
                      ) -> dict[str, np.ndarray]:
    """Strictly validate gate values against ``shapes``; float32 arrays in ``shapes`` order."""
    missing, unknown = sorted(set(shapes) - set(values)), sorted(set(values) - set(shapes))
    if missing:
        raise ValueError(f"gate values: tensor {missing[0]!r} is missing "
                         f"({len(missing)} missing in all)")
    if unknown:
        raise ValueError(f"gate values: tensor {unknown[0]!r} is not a gated layer "
                         f"({len(unknown)} unknown in all)")
    out = {}
    for name, shape in shapes.items():
        arr = _as_array(values[name])
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"gate values: tensor {name!r} has shape {tuple(arr.shape)}, "
                             f"expected {tuple(shape)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"gate values: tensor {name!r} is not finite")
        out[name] = arr.astype(np.float32)
    return out


class ChannelGates(nn.Module):
    """One gate per output channel of each gated layer, applied by forward hooks.

    The gates live here, not in the model, so the model's ``state_dict`` keys are unchanged.
    They do not follow ``model.to``: call ``gates.to(device)`` with the model.
    """

    def __init__(self, model: nn.Module, sites: list[GateSite]) -> None:
        super().__init__()
        self.sites = sites
        self.names = [s.weight for s in sites]
        device = next(model.parameters()).device
        self.gates = nn.ParameterList(
            [nn.Parameter(torch.full((s.channels,), GATE_INIT, device=device)) for s in sites])
        modules = dict(model.named_modules())
        self._handles = [model.register_forward_pre_hook(lambda _m, _a: self.project_())]
        for i, s in enumerate(sites):
            hook = partial(self._gate_output, i, s.axis)
            self._handles.append(modules[s.module].register_forward_hook(hook))

    def _gate_output(self, index: int, axis: int, _module: nn.Module, _inputs: tuple,
                     output: torch.Tensor) -> torch.Tensor:
        b = binary_gate(self.gates[index]).to(device=output.device, dtype=output.dtype)  # (C,)
        shape = [1] * output.dim()
        shape[axis] = -1
        return output * b.view(shape)  # (B, C, ...) or (..., C)

    def remove(self) -> None:
        """Remove every hook: the model computes its ungated function again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the gates onto [0, 1] (only tensors that left it, to keep autograd versions)."""
        for g in self.gates:
            if bool((g < 0).any() or (g > 1).any()):
                g.clamp_(0.0, 1.0)

    def regularizer(self, lam: float, t: float) -> torch.Tensor:
        """``lam * R(g)``, Zhuang et al.'s polarization over all gates."""
        return lam * polarization(list(self.gates), t)

    def values(self) -> dict[str, np.ndarray]:
        """Gate values in [0, 1] (float32) keyed by the gated weight's parameter name."""
        return {n: g.detach().clamp(0.0, 1.0).cpu().numpy().astype(np.float32)
                for n, g in zip(self.names, self.gates)}

    @torch.no_grad()
    def load_(self, values: Mapping[str, object]) -> None:
        """Set the gates from ``values`` (e.g. the server's consensus); names/shapes strict."""
        arrays = check_gate_values({s.weight: (s.channels,) for s in self.sites}, values)
        for name, g in zip(self.names, self.gates):
            g.copy_(torch.from_numpy(arrays[name]).to(g.device))


def attach_gates(model: nn.Module, exclude: Sequence[str] = ()) -> ChannelGates:
    """Attach binary STE channel gates (all open) to ``model``'s gated layers."""
    return ChannelGates(model, gate_sites(model, exclude))


# ----------------------------------------------------------------------------- gates -> masks


def _keep_channels(values: dict[str, np.ndarray], row: dict[str, int], budget: int
                   ) -> dict[str, np.ndarray]:
    """First fit in gate order: each layer's best channel, then every channel that still fits."""
    names = list(values)
    gate = np.concatenate([values[n] for n in names])  # (n,)
    layer = np.concatenate([np.full(len(values[n]), i) for i, n in enumerate(names)])
    chan = np.concatenate([np.arange(len(values[n])) for n in names])
    rel = np.concatenate([np.arange(len(values[n])) / len(values[n]) for n in names])
    cost = np.array([row[names[i]] for i in layer])
    order = np.lexsort((chan, layer, rel, -gate.astype(np.float64)))  # gate desc, then ties
    keep = np.zeros(len(gate), dtype=bool)
    _, first = np.unique(layer[order], return_index=True)
    keep[order[first]] = True  # each layer's best channel
    left = budget - int(cost[keep].sum())
    if left < 0:
        raise ValueError(f"remaining budget {budget} is below the {int(cost[keep].sum())} "
                         "weights of one channel per gated layer")
    for i in order:
        if not keep[i] and cost[i] <= left:
            keep[i] = True
            left -= int(cost[i])
    return {n: keep[layer == i] for i, n in enumerate(names)}


def gate_masks(model: nn.Module, gate_values: Mapping[str, object], density: float,
               exclude: Sequence[str] = ()) -> Masks:
    """Structured masks for all prunable tensors from consensus gate values at ``density``.

    The budget is ``floor(density * N)`` over the ``N`` prunable weights; ungated tensors (the
    classifier) stay dense and count in it. Channels are taken by gate value, highest first
    across all layers, each layer keeping at least its best channel; a channel whose rows no
    longer fit is skipped and later (lower-gate, smaller) ones may still fill the budget. Ties
    go to the lowest channel position relative to layer width, then the earlier layer, so a
    block of equal gates is shared evenly across layers. Channel granularity cannot hit the
    density exactly: the achieved density, ``fedprune.masks.global_density(masks)``, is at
    most ``density`` and short of it by less than the smallest skipped row.
    """
    check_density(density)
    sites = gate_sites(model, exclude)
    values = check_gate_values({s.weight: (s.channels,) for s in sites}, gate_values)
    params = dict(model.named_parameters())
    names = prunable_names(model, exclude)
    total = sum(params[n].numel() for n in names)
    dense = total - sum(params[s.weight].numel() for s in sites)
    budget = int(Fraction(repr(float(density))) * total)  # floor of the decimal density
    if budget < dense:
        raise ValueError(f"mask.density={density!r} keeps {budget} of {total} prunable weights, "
                         f"below the {dense} ungated weights that stay dense")
    try:
        keep = _keep_channels(values, {s.weight: params[s.weight][0].numel() for s in sites},
                              budget - dense) if sites else {}
    except ValueError as err:
        raise ValueError(f"mask.density={density!r} keeps {budget} of {total} prunable "
                         f"weights; {dense} ungated weights stay dense and the {err}") from err
    masks = {}
    for name in names:
        p = params[name]
        if name in keep:
            rows = torch.from_numpy(keep[name]).to(p.device)  # (out,)
            masks[name] = rows.view(-1, *[1] * (p.dim() - 1)).expand(p.shape).clone()
        else:
            masks[name] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
    return masks
