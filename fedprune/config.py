"""Typed experiment configuration.

Dataclasses validated in ``__post_init__`` and merged with omegaconf from YAML files in
``experiments/configs/`` plus ``key=value`` overrides. Unknown keys and wrong types fail
before any work starts, naming the key; bad values name the key and the valid choices.
One bridge (:func:`from_run_config`) turns Flower's flat ``run_config`` into the same object.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR_ENV = "FEDPRUNE_CONFIG_DIR"


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names the key."""


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def _check(key: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: {what}")


DATASETS = ("cifar10", "mnist")
PARTITIONERS = ("iid", "dirichlet", "shards", "pathological")


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    # Local data root; "" means $FEDPRUNE_DATA_ROOT, and without it the public hub.
    root: str = ""
    # Decoded-array and partition cache; "" means $FEDPRUNE_CACHE or ~/.cache/fedprune.
    cache_dir: str = ""
    num_clients: int = 10
    partitioner: str = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration over labels (smaller = more skew)
    classes_per_client: int = 2  # pathological: labels per client
    shards_per_client: int = 2  # shards (McMahan et al. 2017): label-sorted shards per client
    min_partition_size: int = 10
    train_subset: int = 0  # 0 = whole training set; else a seeded random subset of this size
    test_subset: int = 0  # 0 = whole test set (server-side evaluation)
    augment: bool = True  # random crop + flip on CIFAR-10 during local training
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        _choice("data.partitioner", self.partitioner, PARTITIONERS)
        _check("data.num_clients", self.num_clients >= 1, "must be >= 1", self.num_clients)
        _check("data.alpha", self.alpha > 0, "must be > 0", self.alpha)
        _check("data.classes_per_client", self.classes_per_client >= 1, "must be >= 1",
               self.classes_per_client)
        _check("data.shards_per_client", self.shards_per_client >= 1, "must be >= 1",
               self.shards_per_client)
        _check("data.train_subset", self.train_subset >= 0, "must be >= 0", self.train_subset)
        _check("data.test_subset", self.test_subset >= 0, "must be >= 0", self.test_subset)
        _check("data.min_partition_size", self.min_partition_size >= 0, "must be >= 0",
               self.min_partition_size)


MODELS = ("resnet8", "resnet20", "resnet18", "vgg11_bn", "convnet")


@dataclass
class ModelConfig:
    name: str = "resnet8"
    width: int = 16  # channels of the first stage; later stages scale from it
    num_classes: int = 10

    def __post_init__(self) -> None:
        _choice("model.name", self.name, MODELS)
        _check("model.width", self.width >= 1, "must be >= 1", self.width)
        _check("model.num_classes", self.num_classes >= 2, "must be >= 2", self.num_classes)


MASK_INITS = ("dense", "uniform", "erk", "global_magnitude", "random")
# Scored by the clients on their own data and aggregated by the server before round 1.
CLIENT_SCORED = ("snip", "synflow")
CONSENSUS = ("average", "vote")


@dataclass
class MaskConfig:
    density: float = 0.1  # fraction of prunable weights kept (1.0 = dense)
    init: str = "erk"
    # Names (fnmatch patterns over parameter names) of prunable tensors kept dense.
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    # snip / synflow: how the server combines the clients' scores (``average``: example-
    # weighted mean, then global top-k; ``vote``: each client's own top-k mask, majority).
    consensus: str = "average"
    score_batches: int = 4  # snip: local batches each client scores (0 = its whole partition)
    # init=file: masks of an earlier run (its mask.safetensors) on freshly initialised
    # weights -- the random-reinit control of Liu et al. 2019 ("Rethinking ...").
    file: str = ""

    def __post_init__(self) -> None:
        _check("mask.density", 0.0 < self.density <= 1.0, "must be in (0, 1]", self.density)
        _choice("mask.init", self.init, MASK_INITS + CLIENT_SCORED + ("file",))
        _choice("mask.consensus", self.consensus, CONSENSUS)
        _check("mask.score_batches", self.score_batches >= 0, "must be >= 0", self.score_batches)
        _check("mask.file", (self.init == "file") == bool(self.file),
               "set mask.file exactly when mask.init='file'", self.file)


@dataclass
class TrainConfig:
    local_epochs: int = 1
    max_steps: int = 0  # 0 = no cap; else stop local training after this many batches
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        _check("train.local_epochs", self.local_epochs >= 1, "must be >= 1", self.local_epochs)
        _check("train.max_steps", self.max_steps >= 0, "must be >= 0", self.max_steps)
        _check("train.batch_size", self.batch_size >= 1, "must be >= 1", self.batch_size)
        _check("train.lr", self.lr > 0, "must be > 0", self.lr)
        _check("train.momentum", 0 <= self.momentum < 1, "must be in [0, 1)", self.momentum)
        _check("train.weight_decay", self.weight_decay >= 0, "must be >= 0", self.weight_decay)


STRATEGIES = ("sparse_fedavg",)


@dataclass
class FedConfig:
    strategy: str = "sparse_fedavg"
    rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # > 0 adds federated evaluation on the clients
    min_train_clients: int = 2
    round_timeout: float = 3600.0

    def __post_init__(self) -> None:
        _choice("fed.strategy", self.strategy, STRATEGIES)
        _check("fed.rounds", self.rounds >= 1, "must be >= 1", self.rounds)
        _check("fed.fraction_train", 0 < self.fraction_train <= 1, "must be in (0, 1]",
               self.fraction_train)
        _check("fed.fraction_evaluate", 0 <= self.fraction_evaluate <= 1, "must be in [0, 1]",
               self.fraction_evaluate)
        _check("fed.min_train_clients", self.min_train_clients >= 1, "must be >= 1",
               self.min_train_clients)


@dataclass
class FedTinyConfig:
    # Adaptive BN selection among this many candidate masks before training (0 = off:
    # the mask comes from mask.init). FedTiny, Huang et al. 2023, Sec. IV-A.
    candidates: int = 0
    spread: float = 2.0  # perturbed candidates scale ERK layer densities within [1/s, s]
    # Progressive pruning (Sec. IV-B): every delta_r rounds before r_end, one layer moves
    # K = alpha_t * active weights (top-K gradient growth, smallest-magnitude pruning).
    delta_r: int = 0  # 0 = off
    r_end: int = 0  # 0 = three quarters of fed.rounds
    alpha: float = 0.3
    # What one adjustment moves: one masked tensor ("layer") or every masked tensor of one
    # block ("block": residual block / stage unit, by name prefix), visited in ``order``:
    # "forward" (model order), "reverse", or comma-separated tensor names / block prefixes.
    granularity: str = "layer"
    order: str = "forward"

    def __post_init__(self) -> None:
        _check("fedtiny.candidates", self.candidates >= 0, "must be >= 0", self.candidates)
        _check("fedtiny.spread", self.spread >= 1.0, "must be >= 1", self.spread)
        _check("fedtiny.delta_r", self.delta_r >= 0, "must be >= 0 (0 = off)", self.delta_r)
        _check("fedtiny.r_end", self.r_end >= 0, "must be >= 0", self.r_end)
        _check("fedtiny.alpha", 0 < self.alpha <= 1, "must be in (0, 1]", self.alpha)
        _choice("fedtiny.granularity", self.granularity, ("layer", "block"))
        _check("fedtiny.order", bool(self.order.strip()), "must be forward, reverse or names",
               self.order)


DST_METHODS = ("none", "prunefl", "feddst")


@dataclass
class DstConfig:
    """Dynamic sparse training baselines on the same schedule fields as FedTiny.

    ``prunefl``: every delta_r rounds clients accumulate the squared *dense* gradient of
    every masked tensor during local training and upload it; the server re-selects each
    layer's kept positions by that importance (PruneFL, Jiang et al. 2022, with uniform
    per-parameter time cost). ``feddst``: every delta_r rounds each client prunes its K
    smallest weights and grows K by its local dense gradient (RigL) per layer, uploads its
    own mask and values; the server averages where clients keep a position and takes the
    mask by example-weighted vote (FedDST, Bibikar et al. 2022)."""

    method: str = "none"
    delta_r: int = 1
    r_end: int = 0  # 0 = three quarters of fed.rounds
    alpha: float = 0.3  # feddst: K = alpha_t * active per layer, cosine decay

    def __post_init__(self) -> None:
        _choice("dst.method", self.method, DST_METHODS)
        _check("dst.delta_r", self.delta_r >= 1, "must be >= 1", self.delta_r)
        _check("dst.r_end", self.r_end >= 0, "must be >= 0", self.r_end)
        _check("dst.alpha", 0 < self.alpha <= 1, "must be in (0, 1]", self.alpha)


@dataclass
class GatesConfig:
    """Polarization-regularized channel gates trained federatedly (Zhi et al. 2023,
    "Learning a Consensus Sub-Network with Polarization Regularization and One Pass
    Training"). For ``rounds`` rounds clients train dense weights plus one binary
    (straight-through) gate per output channel under the polarization loss; the server
    averages the gates; then it keeps the channels with the highest consensus gates up to
    mask.density and training continues sparse in the same pass."""

    rounds: int = 0  # 0 = off
    lam: float = 1e-3  # weight of the polarization regularizer
    # Polarization strength (Zhuang et al. 2020): the regularizer alone opens a fraction
    # (2 - t) / 4 of the gates. 0 = auto: t = 2 - 4 * mask.density, so the gates it
    # opens match the channel share the final mask keeps (masks prune whole rows).
    t: float = 0.0
    lr: float = 0.05  # gate learning rate (SGD)

    def __post_init__(self) -> None:
        _check("gates.rounds", self.rounds >= 0, "must be >= 0 (0 = off)", self.rounds)
        _check("gates.lam", self.lam >= 0, "must be >= 0", self.lam)
        _check("gates.t", -2 < self.t < 2, "must be in (-2, 2) (0 = auto)", self.t)
        _check("gates.lr", self.lr > 0, "must be > 0", self.lr)


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SimConfig:
    # Ray resources per virtual client (2 cores -> 2 clients in parallel). Whole CPUs:
    # Flower's simulation config (`flwr run --federation-config`) takes an integer.
    client_cpus: int = 1
    client_gpus: float = 0.0  # a share of one GPU, e.g. 0.25
    torch_threads: int = 1  # torch threads inside each client (avoid oversubscription)

    def __post_init__(self) -> None:
        _check("sim.client_cpus", isinstance(self.client_cpus, int) and self.client_cpus >= 1,
               "must be a whole number >= 1", self.client_cpus)
        _check("sim.client_gpus", self.client_gpus >= 0, "must be >= 0", self.client_gpus)
        _check("sim.torch_threads", self.torch_threads >= 1, "must be >= 1", self.torch_threads)


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = ""  # "" = <config name>-<timestamp>
    device: str = "auto"  # auto = CUDA when present, else CPU
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("run.device", self.device, DEVICES)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fedtiny: FedTinyConfig = field(default_factory=FedTinyConfig)
    dst: DstConfig = field(default_factory=DstConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)

    def __post_init__(self) -> None:
        if self.fed.min_train_clients > self.data.num_clients:
            raise ConfigError(
                f"fed.min_train_clients={self.fed.min_train_clients} exceeds "
                f"data.num_clients={self.data.num_clients}"
            )
        for key, r_end in (("fedtiny.r_end", self.fedtiny.r_end), ("dst.r_end", self.dst.r_end)):
            if r_end > self.fed.rounds:
                raise ConfigError(f"{key}={r_end} is beyond fed.rounds={self.fed.rounds}")
        if self.gates.rounds >= self.fed.rounds:
            raise ConfigError(f"gates.rounds={self.gates.rounds} must be < fed.rounds="
                              f"{self.fed.rounds} (gates are trained, then the mask is fixed)")
        if self.gates.rounds and self.mask.density >= 1.0:
            raise ConfigError("gates.rounds > 0 prunes to mask.density, which is 1.0: set "
                              "mask.density < 1")
        dynamic = [k for k, on in (("fedtiny.delta_r", self.fedtiny.delta_r > 0),
                                   ("dst.method", self.dst.method != "none"),
                                   ("gates.rounds", self.gates.rounds > 0)) if on]
        if len(dynamic) > 1:
            raise ConfigError(f"{dynamic} are all set: choose one mask-adjustment method")
        if self.data.dataset == "mnist" and self.model.name != "convnet":
            raise ConfigError(
                f"model.name={self.model.name!r} expects 3-channel 32x32 input; "
                "data.dataset='mnist' needs model.name='convnet'"
            )


# Field type names (annotations are strings under `from __future__ import annotations`)
_NESTED = {"DataConfig": DataConfig, "ModelConfig": ModelConfig, "MaskConfig": MaskConfig,
           "TrainConfig": TrainConfig, "FedConfig": FedConfig, "SimConfig": SimConfig,
           "RunConfig": RunConfig, "FedTinyConfig": FedTinyConfig, "DstConfig": DstConfig,
           "GatesConfig": GatesConfig}

# ----------------------------------------------------------------------------- loading


def config_dir() -> Path:
    """Where named configs live: $FEDPRUNE_CONFIG_DIR or the repo's experiments/configs."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "experiments" / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """Accept a YAML path or a config name from experiments/configs/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = config_dir() / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in config_dir().glob("*.yaml"))
    raise ConfigError(f"config file {name_or_path!r} not found; named configs: {known}")


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated."""
    layers = [OmegaConf.structured(ExperimentConfig)]
    if name_or_path:
        path = resolve_config_path(name_or_path)
        layers.append(OmegaConf.load(path))
    if overrides:
        _check_override_syntax(overrides)
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    except ConfigError:
        raise
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def _check_override_syntax(overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if isinstance(err.__cause__, ConfigError):
        return str(err.__cause__)
    if key:
        return f"config key {key!r}: {msg}"
    return msg


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> ExperimentConfig:
    """Rebuild a config sent over the wire (e.g. server -> client).

    The sender already validated it with omegaconf; here plain YAML parsing plus the
    dataclasses' own ``__post_init__`` checks are enough, and 10x cheaper per message
    (that matters with hundreds of virtual clients per round).
    """
    import yaml

    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("a wire config must be a mapping of sections")
    return _build(ExperimentConfig, data, "")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a nested dict; unknown keys name themselves."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config keys {[prefix + k for k in unknown]}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get(known[name].type)
        kwargs[name] = _build(sub, value or {}, f"{prefix}{name}.") if sub else value
    return cls(**kwargs)


def to_flat_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted keys -> values (lists kept), e.g. for result files and tables."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return out


RUN_CONFIG_KEYS = ("config", "overrides", "run_dir")


def from_run_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """Bridge from Flower's flat ``run_config``: ``config`` names the YAML, ``overrides``
    holds space-separated ``key=value`` pairs (pyproject's [tool.flwr.app.config]);
    ``run_dir`` (read by the ServerApp, not part of the experiment) names the run folder."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown run_config keys {unknown}; valid keys: {list(RUN_CONFIG_KEYS)}")
    name = str(run_config.get("config", "") or "") or None
    overrides = str(run_config.get("overrides", "") or "").split()
    return load_config(name, overrides)


# Settings that name files or folders: relative to the directory of the command that
# read them, so they are made absolute before a config goes to a process running elsewhere.
PATH_KEYS = ("data.root", "data.cache_dir", "mask.file", "run.out_dir")


def with_absolute_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """A copy of ``cfg`` whose non-empty path settings are absolute (against ``base`` or cwd)."""
    base = Path.cwd() if base is None else base
    out = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(out, section), name)
        if value:
            setattr(getattr(out, section), name, str((base / Path(value).expanduser()).resolve()))
    return out
