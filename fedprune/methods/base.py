"""Federated methods: one registered unit each, holding all that makes the method.

A method is one module in ``fedprune/methods/`` with three parts, registered by name:

- its typed config section (a :class:`MethodConfig` dataclass; the ``method:`` section of
  an experiment YAML, ``method.name`` picks the method),
- its server part (a :class:`Method`): the round-0 mask, query rounds before training
  (a generator of :class:`Query`, e.g. SNIP scores or adaptive BN selection), a
  :class:`Plan` per round (what it sends beyond the model, what each reply must carry), and
  how it combines the checked replies into the next global state,
- its client part (a :class:`ClientMethod`): hooks into local training on planned rounds,
  and its answers to its query rounds.

The experiment, the strategy, the query runner and the ClientApp dispatch through
:func:`method_class` and never name a method. Everything here is Flower-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..config import MethodConfig
from ..fl.replies import Checked, Decoder, ReplySpec

if TYPE_CHECKING:  # imported for annotations only: these import this module's users
    from pathlib import Path

    import torch

    from ..config import ExperimentConfig
    from ..fl.secure import SecureSum
    from ..fl.server_core import SparseServer

# Modules that register the built-in methods (imported on first lookup, so that the
# config module can use the registry without importing torch-heavy code at start-up).
BUILTIN = ("fixed", "scored", "fedtiny", "dynamic", "gates", "pooled", "local", "structured",
           "channels", "tokens")


@dataclass
class Plan:
    """One round's plan: config entries and extra arrays sent down, and what each reply
    must carry besides the model (record name -> decoder, checked by the validation layer),
    and ``checks`` across a whole reply (e.g. counts against its example count).
    ``own_masks``: replies carry the client's own mask and values (encode_down) instead of
    values under the global mask."""

    config: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    replies: dict[str, Decoder] = field(default_factory=dict)
    own_masks: bool = False
    checks: list[Callable[[Checked], None]] = field(default_factory=list)


@dataclass
class Outcome:
    """What combining a planned round did: the new global state, what moved and how much
    (``moved``: a tensor name, several joined by commas, "all" or "gates"; ``k``: positions)."""

    state: dict[str, np.ndarray]
    moved: str = ""
    k: int = 0


@dataclass
class Query:
    """A query round before training: ``arrays`` and ``config`` (scalars) go to every
    client as message kind ``kind``; each reply must match ``spec`` (the runner adds the
    example count and the partition). ``secure``: the replies' arrays are summed under
    secure aggregation (``secagg``) with this layout, and the method gets one reply, the
    checked sum; ``counts``: integer arrays equal to a count per example, rebuilt from the
    clients' clear example counts instead of summed."""

    kind: str
    arrays: dict[str, np.ndarray]
    spec: ReplySpec = field(default_factory=ReplySpec)
    config: dict[str, Any] = field(default_factory=dict)
    secure: "SecureSum | None" = None
    counts: dict[str, int] = field(default_factory=dict)


Queries = Generator[Query, list[Checked], "dict | None"]


class ClientMethod:
    """A method's client part. ``training`` returns the hooks for a planned round (or None);
    ``answer`` replies to the method's query rounds."""

    def __init__(self, cfg: "ExperimentConfig") -> None:
        self.cfg = cfg

    def training(self, plan: dict[str, Any], extras: dict[str, dict[str, np.ndarray]],
                 model: "torch.nn.Module", masks: dict, device: "torch.device"
                 ) -> "TrainingHooks | None":
        return None

    def answer(self, kind: str, partition_id: int, payload: dict[str, np.ndarray],
               config: dict[str, Any] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and metrics replying to query ``kind`` (``config``: the query's scalars)."""
        raise ValueError(f"method {self.cfg.method.name!r} has no query {kind!r}")


class TrainingHooks:
    """What a method adds to one round of local training: ``hook`` after each backward,
    ``regularizer`` added to the loss, ``extra_params`` trained alongside; ``finish``
    returns (the client's own new masks or None, extra records to send)."""

    hook: Callable[[], None] | None = None
    regularizer: Callable[[], "torch.Tensor"] | None = None
    extra_params: list[dict] | None = None

    def finish(self, batches) -> tuple[dict | None, dict[str, dict[str, np.ndarray]]]:
        return None, {}


class Method:
    """A method's server part. The base keeps the round-0 mask fixed for the whole run."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    client_cls: ClassVar[type[ClientMethod]] = ClientMethod

    def __init__(self, cfg: "ExperimentConfig", core: "SparseServer") -> None:
        self.cfg, self.core = cfg, core
        self.options = cfg.method
        # one-shot methods: where to keep what each finished query round decided, and
        # whether to continue from what is there (set by the one-shot runner)
        self.checkpoint_dir: "Path | None" = None
        self.resume = False

    @classmethod
    def make_core(cls, cfg: "ExperimentConfig") -> Any:
        """The server-side model this method works on: a masked CNN trained by sparse
        FedAvg (``SparseServer``) unless the method says otherwise."""
        from ..fl.server_core import SparseServer

        return SparseServer(cfg)

    @classmethod
    def initial_masks(cls, model: "torch.nn.Module", cfg: "ExperimentConfig"
                      ) -> dict[str, "torch.Tensor"]:
        """The global mask before any query or training round."""
        from ..masks import init_masks

        return init_masks(model, cfg.mask.density, "dense", exclude=cfg.mask.exclude)

    def warmup_rounds(self) -> int:
        """Training rounds under ``initial_masks`` before the query rounds (0: the query
        rounds come first)."""
        return 0

    def queries(self) -> Queries:
        """Query rounds before training (after ``warmup_rounds``): yield each
        :class:`Query`, receive its checked replies, return a JSON-able record of what was
        decided (or None)."""
        return None
        yield  # pragma: no cover  (makes this a generator)

    def plan(self, server_round: int) -> Plan | None:
        """This round's plan, or None for plain sparse FedAvg under the current mask."""
        return None

    def combine(self, server_round: int, plan: Plan, replies: list[Checked],
                aggregated: dict[str, np.ndarray] | None) -> Outcome:
        """The next global state from a planned round's accepted replies (in partition
        order). ``aggregated``: their example-weighted mean under the global mask (None
        when the plan has ``own_masks``)."""
        assert aggregated is not None
        return Outcome(aggregated)

    def combine_scores(self, arrays: list[np.ndarray], weights: list[int]) -> np.ndarray:
        """Per-weight scores of the clients combined by ``fed.aggregation`` (the
        example-weighted mean, or a robust rule; ``fedprune.fl.aggregate``)."""
        from ..fl.aggregate import combine

        return combine(arrays, weights, self.cfg.fed.aggregation, self.cfg.fed.trim)

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a checkpoint must hold to continue this method (beyond weights and mask)."""
        return {}

    def report(self) -> dict:
        """What the method decided, for the run's summary (``method_report``); JSON-able."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got {sorted(state)[:3]}")


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.config_cls().name``."""
    name = cls.config_cls().name
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    cls.name = name
    _METHODS[name] = cls
    return cls


def _load_builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(f"{__package__}.{module}")


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    _load_builtin()
    if name not in _METHODS:
        from ..config import ConfigError

        raise ConfigError(f"method.name={name!r} is not valid; choose one of {method_names()}")
    return _METHODS[name]
