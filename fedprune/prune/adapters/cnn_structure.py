"""Channel dependency groups of a CNN, found by tracing the model (``torch.fx``).

A *channel space* is the channel dimension of the feature maps between layers. A conv (or
linear) layer opens a new space with its output channels (its rows: the *producer*);
BatchNorm, activations, pooling, dropout and flatten keep the space (BatchNorm's per-channel
vectors are members); a conv or linear layer that reads the space is a *consumer* (its
input channels, or after a flatten its ``channel * spatial`` input features); an addition
ties the spaces of its operands into one (residual connections: every producer whose output
is added, the shortcut's conv, and every consumer of any of them must lose the same
channels). One channel space is one group set of ``channel`` units.

Never broken: a space that reaches the model's output (the logits), the model's input, or
any operation this tracer does not know (concatenation, reshapes other than flatten,
grouped convolutions, multiplication by another tensor, ...) is frozen and not offered.
``residual="skip"`` also freezes spaces tied by an addition (Torch-Pruning's alternative
to pruning them together, the default here: ``residual="group"``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..structured.groups import GroupSet, Member, contiguous_index

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                 nn.Hardswish, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.MaxPool1d,
                 nn.AvgPool1d, nn.AdaptiveAvgPool1d)
_PASS_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.relu, torch.sigmoid,
                   torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, F.max_pool1d, F.avg_pool1d}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_ADDS = {operator.add, operator.iadd, torch.add}
_FLATTENS = {torch.flatten}
_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class _Space:
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, bool]] = field(default_factory=list)  # (layer, after flatten)
    frozen: bool = False
    tied: bool = False


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[_Space] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        self.data.append(_Space())
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.parent[b] = a
        da, db = self.data[a], self.data[b]
        da.producers += db.producers
        da.norms += db.norms
        da.consumers += db.consumers
        da.frozen |= db.frozen
        da.tied = True
        return a

    def get(self, i: int) -> _Space:
        return self.data[self.find(i)]


def _trace(model: nn.Module):
    from torch.fx import symbolic_trace

    try:
        return symbolic_trace(model)
    except Exception as err:  # noqa: BLE001  (fx raises many kinds)
        raise ValueError(f"{type(model).__name__}: cannot trace the model to find its channel "
                         f"groups ({type(err).__name__}: {err})") from None


def channel_spaces(model: nn.Module) -> tuple[_Spaces, list[int]]:
    """Trace ``model``; the union-find of spaces and every space id created."""
    gm = _trace(model)
    modules = dict(gm.named_modules())
    spaces = _Spaces()
    of: dict = {}  # fx node -> (space id, flattened)
    for node in gm.graph.nodes:
        ins = [of[a] for a in node.all_input_nodes if a in of]  # nested args (cat lists) too
        if node.op == "placeholder":
            sid = spaces.new()
            spaces.get(sid).frozen = True
            of[node] = (sid, False)
        elif node.op == "call_module":
            of[node] = _module_step(modules[node.target], node.target, ins, spaces)
        elif node.op == "call_function" and node.target in _ADDS and len(ins) == 2:
            of[node] = (spaces.union(ins[0][0], ins[1][0]), ins[0][1] or ins[1][1])
        elif node.op == "call_function" and node.target in _PASS_FUNCTIONS and ins:
            of[node] = ins[0]
        elif node.op == "call_function" and node.target in _FLATTENS and ins \
                and _flattens_channels(node):
            of[node] = (ins[0][0], True)
        elif node.op == "call_method" and node.target in _PASS_METHODS and ins:
            of[node] = ins[0]
        elif node.op == "call_method" and node.target == "flatten" and ins \
                and _flattens_channels(node):
            of[node] = (ins[0][0], True)
        elif node.op in ("get_attr",):
            continue
        else:  # output, or an operation whose channel semantics are unknown: freeze
            for sid, _ in ins:
                spaces.get(sid).frozen = True
            if node.op != "output":
                sid = spaces.new()
                spaces.get(sid).frozen = True
                of[node] = (sid, False)
    return spaces, list(range(len(spaces.parent)))


def _flattens_channels(node) -> bool:
    """``flatten(x, 1)`` (channels first, then positions): a following linear layer reads
    channel c at inputs c*S .. c*S+S-1. Any other start or end dimension is not followed."""
    args = list(node.args[1:]) + [None, None]
    start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
    end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
    return start == 1 and end == -1


def _module_step(module: nn.Module, name: str, ins: list, spaces: _Spaces) -> tuple[int, bool]:
    src = ins[0] if ins else (spaces.new(), False)
    flat = src[1]
    if flat and not isinstance(module, (nn.Linear, *_PASS_MODULES)):
        spaces.get(src[0]).frozen = True  # e.g. BatchNorm1d over channel*position features
        sid = spaces.new()
        spaces.get(sid).frozen = True
        return sid, False
    if isinstance(module, (*_CONVS, nn.Linear)):
        grouped = isinstance(module, _CONVS) and module.groups != 1
        space = spaces.get(src[0])
        if grouped:
            space.frozen = True
        else:
            space.consumers.append((name, src[1]))
        sid = spaces.new()
        spaces.get(sid).producers.append(name)
        if grouped:
            spaces.get(sid).frozen = True
        return sid, False
    if isinstance(module, _NORMS):
        spaces.get(src[0]).norms.append(name)
        return src
    if isinstance(module, nn.Flatten):
        if (module.start_dim, module.end_dim) != (1, -1):
            spaces.get(src[0]).frozen = True
        return src[0], True
    if isinstance(module, _PASS_MODULES) or (isinstance(module, nn.Sequential) and
                                             len(module) == 0):
        return src
    spaces.get(src[0]).frozen = True  # unknown module: its channels are not ours to cut
    sid = spaces.new()
    spaces.get(sid).frozen = True
    return sid, False


def _out_channels(module: nn.Module) -> int:
    return module.weight.shape[0]


def _consumers_fit(sp: _Space, modules: dict[str, nn.Module], units: int) -> bool:
    """Every consumer reads exactly ``units`` channels (a linear layer after a flatten: a
    whole number of positions per channel); else the space is not ours to cut."""
    if any(_out_channels(modules[p]) != units for p in sp.producers):
        return False
    for name, flat in sp.consumers:
        layer = modules[name]
        width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if (width % units if flat else width != units):
            return False
    return True


def cnn_groups(model: nn.Module, residual: str = "group") -> list[GroupSet]:
    """The prunable channel spaces of ``model`` as group sets (see the module docstring)."""
    if residual not in ("group", "skip"):
        raise ValueError(f"residual={residual!r}: choose 'group' (tied channels pruned "
                         "together) or 'skip' (left alone)")
    spaces, ids = channel_spaces(model)
    modules = dict(model.named_modules())
    out, seen = [], set()
    for sid in ids:
        root = spaces.find(sid)
        if root in seen:
            continue
        seen.add(root)
        sp = spaces.data[root]
        if sp.frozen or not sp.producers or (sp.tied and residual == "skip"):
            continue
        units = _out_channels(modules[sp.producers[0]])
        if not _consumers_fit(sp, modules, units):
            continue
        members = [Member(p, "out", contiguous_index(units, 1)) for p in sp.producers]
        members += [Member(n, "out", contiguous_index(units, 1)) for n in sp.norms]
        for name, flat in sp.consumers:
            layer = modules[name]
            width = layer.in_features // units if (flat and isinstance(layer, nn.Linear)) else 1
            members.append(Member(name, "in", contiguous_index(units, width), stats=True))
        label = "residual-tied channel" if sp.tied else "channel"
        out.append(GroupSet(f"{sp.producers[0]}:channels", "channels", 0, units,
                            tuple(members), 0, label))
    return out
