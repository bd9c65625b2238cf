"""Typed experiment configuration.

Dataclasses validated in ``__post_init__`` and merged with omegaconf from YAML files in
``experiments/configs/`` plus ``key=value`` overrides. Unknown keys and wrong types fail
before any work starts, naming the key; bad values name the key and the valid choices.
One bridge (:func:`from_run_config`) turns Flower's flat ``run_config`` into the same object.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR_ENV = "FEDPRUNE_CONFIG_DIR"


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names the key."""


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def check_value(key: str, ok: bool, what: str, value: Any) -> None:
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
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.partitioner", self.partitioner, PARTITIONERS)
        check_value("data.num_clients", self.num_clients >= 1, "must be >= 1", self.num_clients)
        check_value("data.alpha", self.alpha > 0, "must be > 0", self.alpha)
        check_value("data.classes_per_client", self.classes_per_client >= 1, "must be >= 1",
               self.classes_per_client)
        check_value("data.shards_per_client", self.shards_per_client >= 1, "must be >= 1",
               self.shards_per_client)
        check_value("data.train_subset", self.train_subset >= 0, "must be >= 0", self.train_subset)
        check_value("data.test_subset", self.test_subset >= 0, "must be >= 0", self.test_subset)
        check_value("data.min_partition_size", self.min_partition_size >= 0, "must be >= 0",
               self.min_partition_size)


MODELS = ("resnet8", "resnet20", "resnet18", "vgg11_bn", "convnet", "vit")


@dataclass
class ModelConfig:
    name: str = "resnet8"
    width: int = 16  # CNNs: channels of the first stage (later stages scale); ViT: dim / 4
    num_classes: int = 10
    # safetensors file of the starting global weights (e.g. a trained model to prune or
    # fine-tune federatedly); read by the server only: clients receive the global model
    init_file: str = ""

    def __post_init__(self) -> None:
        check_choice("model.name", self.name, MODELS)
        check_value("model.width", self.width >= 1, "must be >= 1", self.width)
        check_value("model.num_classes", self.num_classes >= 2, "must be >= 2", self.num_classes)


@dataclass
class MaskConfig:
    """What every method shares: the target density, the tensors kept dense, the seed of
    seeded mask choices. How the mask is made and moved is the method's (``method:``)."""

    density: float = 0.1  # fraction of prunable weights kept (1.0 = dense)
    # Names (fnmatch patterns over parameter names) of prunable tensors kept dense.
    exclude: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        check_value("mask.density", 0.0 < self.density <= 1.0, "must be in (0, 1]", self.density)


@dataclass
class TrainConfig:
    local_epochs: int = 1
    max_steps: int = 0  # 0 = no cap; else stop local training after this many batches
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 500
    # "sgd" (momentum) for the CNNs; "adamw" is what vision transformers train with
    optimizer: str = "sgd"
    # "constant", or "cosine" over this call's steps after ``warmup_steps`` linear warm-up
    # (a schedule per call: a federated round's local training restarts it)
    lr_schedule: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_value("train.local_epochs", self.local_epochs >= 1, "must be >= 1", self.local_epochs)
        check_value("train.max_steps", self.max_steps >= 0, "must be >= 0", self.max_steps)
        check_value("train.batch_size", self.batch_size >= 1, "must be >= 1", self.batch_size)
        check_value("train.lr", self.lr > 0, "must be > 0", self.lr)
        check_value("train.momentum", 0 <= self.momentum < 1, "must be in [0, 1)", self.momentum)
        check_value("train.weight_decay", self.weight_decay >= 0, "must be >= 0", self.weight_decay)
        check_value("train.optimizer", self.optimizer in ("sgd", "adamw"),
                    "must be 'sgd' or 'adamw'", self.optimizer)
        check_value("train.lr_schedule", self.lr_schedule in ("constant", "cosine"),
                    "must be 'constant' or 'cosine'", self.lr_schedule)
        check_value("train.warmup_steps", self.warmup_steps >= 0, "must be >= 0",
                    self.warmup_steps)


STRATEGIES = ("sparse_fedavg",)


AGGREGATIONS = ("mean", "median", "trimmed_mean")


@dataclass
class FedConfig:
    strategy: str = "sparse_fedavg"
    rounds: int = 5  # training rounds (0 for a one-shot method: query rounds only)
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # > 0 adds federated evaluation on the clients
    min_train_clients: int = 2
    round_timeout: float = 3600.0  # seconds a round (or query round) waits for replies
    # Sampling waits this long for all data.num_clients nodes to register, then goes on
    # with those present if there are at least min_train_clients, else stops the run.
    node_wait: float = 600.0
    # A round (training, query, adjusting) needs at least this fraction of the clients it
    # sampled to reply acceptably (and at least one); below it the round is sampled and
    # sent again up to ``retries`` times, then the run stops with the reason.
    quorum: float = 0.5
    retries: int = 2
    # Combining kept values and scores: the example-weighted mean, or a robust rule
    # (coordinate-wise median; trimmed mean cutting ``trim`` of the clients at each end).
    aggregation: str = "mean"
    trim: float = 0.1
    # The most examples one client may claim (the partition sizes bound it too).
    max_examples: int = 1_000_000

    def __post_init__(self) -> None:
        check_choice("fed.strategy", self.strategy, STRATEGIES)
        check_value("fed.rounds", self.rounds >= 0, "must be >= 0", self.rounds)
        check_value("fed.fraction_train", 0 < self.fraction_train <= 1, "must be in (0, 1]",
                    self.fraction_train)
        check_value("fed.fraction_evaluate", 0 <= self.fraction_evaluate <= 1,
                    "must be in [0, 1]", self.fraction_evaluate)
        check_value("fed.min_train_clients", self.min_train_clients >= 1, "must be >= 1",
                    self.min_train_clients)
        check_value("fed.round_timeout", self.round_timeout > 0, "must be > 0",
                    self.round_timeout)
        check_value("fed.node_wait", self.node_wait >= 0, "must be >= 0", self.node_wait)
        check_value("fed.quorum", 0 <= self.quorum <= 1, "must be in [0, 1]", self.quorum)
        check_value("fed.retries", self.retries >= 0, "must be >= 0", self.retries)
        check_choice("fed.aggregation", self.aggregation, AGGREGATIONS)
        check_value("fed.trim", 0 <= self.trim < 0.5, "must be in [0, 0.5)", self.trim)
        check_value("fed.max_examples", self.max_examples >= 1, "must be >= 1",
                    self.max_examples)


FAULT_KINDS = ("fail", "timeout", "garbage")


@dataclass
class FaultConfig:
    """Injected faults, for testing robustness in simulation: each round, each client
    independently (seeded by ``seed``, the round and its partition) fails (raises), times
    out (answers after ``fed.round_timeout``) or replies garbage (one of the bad-input
    classes of ``fedprune.fl.faults``, in turn) with these probabilities."""

    fail: float = 0.0
    timeout: float = 0.0
    garbage: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for kind in FAULT_KINDS:
            value = getattr(self, kind)
            check_value(f"faults.{kind}", 0 <= value <= 1, "must be in [0, 1]", value)
        check_value("faults.fail", self.fail + self.timeout + self.garbage <= 1,
                    "faults.fail + faults.timeout + faults.garbage must be <= 1", self.fail)


@dataclass
class SecAggConfig:
    """Flower's secure aggregation (SecAgg+) for the replies a method sums (``pooled``'s
    statistics): the server learns only the sum of the clients' replies. Each reply is
    divided by a public per-array scale (the server's statistics of ``probe`` windows of
    random tokens, times ``headroom``), clipped to [-1, 1] and quantized to
    ``2**quant_bits`` levels (stochastic rounding); the masks live modulo
    ``2**modulus_bits``. ``shares``/``threshold``: SecAgg+'s neighbours per client and how
    many of them must answer to unmask (fractions of the sampled clients)."""

    enabled: bool = False
    shares: float = 1.0
    threshold: float = 0.7
    quant_bits: int = 30
    modulus_bits: int = 40
    headroom: float = 64.0
    probe: int = 2

    def __post_init__(self) -> None:
        check_value("secagg.shares", 0 < self.shares <= 1, "must be in (0, 1]", self.shares)
        check_value("secagg.threshold", 0 < self.threshold <= 1, "must be in (0, 1]",
                    self.threshold)
        # Flower's stochastic rounding casts to int32; the modulus must hold the sum of
        # every client's quantized value (up to 2**quant_bits each) in int64 arithmetic.
        check_value("secagg.quant_bits", 2 <= self.quant_bits <= 30, "must be in [2, 30]",
                    self.quant_bits)
        check_value("secagg.modulus_bits", self.quant_bits < self.modulus_bits <= 62,
                    "must be in (secagg.quant_bits, 62]", self.modulus_bits)
        check_value("secagg.headroom", self.headroom >= 1, "must be >= 1", self.headroom)
        check_value("secagg.probe", self.probe >= 1, "must be >= 1", self.probe)


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SimConfig:
    # Ray resources per virtual client (2 cores -> 2 clients in parallel). Whole CPUs:
    # Flower's simulation config (`flwr run --federation-config`) takes an integer.
    client_cpus: int = 1
    client_gpus: float = 0.0  # a share of one GPU, e.g. 0.25
    torch_threads: int = 1  # torch threads inside each client (avoid oversubscription)
    # "" = a private Ray instance on this machine; "HOST:PORT" (a head's GCS address) or
    # "auto" = attach to a running Ray cluster, whose nodes then host the virtual clients
    # (they read their node settings, e.g. FEDPRUNE_DATA_ROOT, from their own environment)
    ray_address: str = ""

    def __post_init__(self) -> None:
        check_value("sim.ray_address", self.ray_address in ("", "auto") or
                    bool(re.fullmatch(r"[\w.\-\[\]:]+:\d+", self.ray_address)),
                    "must be '', 'auto' or HOST:PORT", self.ray_address)
        check_value("sim.client_cpus", isinstance(self.client_cpus, int) and self.client_cpus >= 1,
               "must be a whole number >= 1", self.client_cpus)
        check_value("sim.client_gpus", self.client_gpus >= 0, "must be >= 0", self.client_gpus)
        check_value("sim.torch_threads", self.torch_threads >= 1, "must be >= 1",
                    self.torch_threads)


TEXT_SOURCES = ("ptb", "wikitext2", "shakespeare", "kjv")
DEFAULT_TEXT_SOURCES = ("ptb", "wikitext2", "shakespeare")  # kjv: opt in
TEXT_PARTITIONERS = ("domain", "dirichlet", "iid")


@dataclass
class TextConfig:
    """Private text of the clients of a language-model method (``fedprune.lm.clients``):
    ``data.num_clients`` clients, each with ``windows`` non-overlapping windows of
    ``length`` tokens from the sources' calibration splits, mixed over the sources by the
    partitioner; perplexity is measured on the first ``eval_windows`` windows of
    ``eval_length`` tokens of each source's held-out test split."""

    sources: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_SOURCES))
    partitioner: str = "domain"
    alpha: float = 0.5  # dirichlet: concentration over sources
    windows: int = 16
    length: int = 512
    seed: int = 0
    eval_windows: int = 16
    eval_length: int = 512

    def __post_init__(self) -> None:
        for source in self.sources:
            check_choice("text.sources", source, TEXT_SOURCES)
        check_value("text.sources", len(set(self.sources)) == len(self.sources) > 0,
                    "must name distinct sources", self.sources)
        check_choice("text.partitioner", self.partitioner, TEXT_PARTITIONERS)
        check_value("text.alpha", self.alpha > 0, "must be > 0", self.alpha)
        for key, value, low in (("windows", self.windows, 1), ("length", self.length, 2),
                                ("eval_windows", self.eval_windows, 1),
                                ("eval_length", self.eval_length, 2)):
            check_value(f"text.{key}", value >= low, f"must be >= {low}", value)


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = ""  # "" = <config name>-<timestamp>
    device: str = "auto"  # auto = CUDA when present, else CPU
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("run.device", self.device, DEVICES)


@dataclass
class MethodConfig:
    """Base of every method's config section (fedprune/methods/); ``name`` is the
    registered method. Subclasses add their options and validate them in __post_init__."""

    name: str = "fixed"
    # option names holding file or folder paths (made absolute by with_absolute_paths),
    # and names that are paths only when such a path exists (else e.g. a model alias)
    paths: ClassVar[tuple[str, ...]] = ()
    maybe_paths: ClassVar[tuple[str, ...]] = ()
    # of those, the ones only the server reads (a client never opens them)
    server_paths: ClassVar[tuple[str, ...]] = ()
    # a one-shot method prunes in query rounds only (fed.rounds must be 0); the others
    # train for fed.rounds >= 1 rounds
    one_shot: ClassVar[bool] = False
    # a method whose replies are sums can run them through secure aggregation (secagg)
    secure_sums: ClassVar[bool] = False

    def check(self, cfg: "ExperimentConfig") -> None:
        """Checks that need other sections (e.g. a round bound against ``fed.rounds``);
        raise ConfigError naming the key."""


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    # The federated method and its options, typed by the method's own dataclass
    # (fedprune/methods/; ``method.name`` picks it). The base here is replaced by the
    # method's class as the config is built.
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    text: TextConfig = field(default_factory=TextConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        if type(self.method) is MethodConfig:  # built directly: the method's own defaults
            self.method = method_config_class(self.method.name)()
        if self.fed.min_train_clients > self.data.num_clients:
            raise ConfigError(
                f"fed.min_train_clients={self.fed.min_train_clients} exceeds "
                f"data.num_clients={self.data.num_clients}"
            )
        if self.data.dataset == "mnist" and self.model.name != "convnet":
            raise ConfigError(
                f"model.name={self.model.name!r} expects 3-channel 32x32 input; "
                "data.dataset='mnist' needs model.name='convnet'"
            )
        if self.method.one_shot != (self.fed.rounds == 0):
            raise ConfigError(
                f"fed.rounds={self.fed.rounds} does not fit method {self.method.name!r}: "
                + ("it is one-shot (query rounds only): set fed.rounds=0" if self.method.one_shot
                   else "it trains: set fed.rounds >= 1"))
        if self.secagg.enabled and not self.method.secure_sums:
            raise ConfigError(f"secagg.enabled=true needs a method whose replies are sums "
                              f"(pooled); method {self.method.name!r} sends no sums")
        if self.secagg.enabled and self.data.num_clients < 2:
            raise ConfigError(f"secagg.enabled=true needs data.num_clients >= 2 (SecAgg+ "
                              f"masks each reply with its neighbours'), got "
                              f"{self.data.num_clients}")
        if self.secagg.enabled and self.data.num_clients >= 2 ** (
                self.secagg.modulus_bits - self.secagg.quant_bits):
            raise ConfigError(f"data.num_clients={self.data.num_clients}: the sum of that "
                              f"many replies overflows secagg.modulus_bits="
                              f"{self.secagg.modulus_bits} at secagg.quant_bits="
                              f"{self.secagg.quant_bits}")
        self.method.check(self)


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the method registered as ``name``."""
    from .methods.base import method_class

    return method_class(name).config_cls


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
    layers = []
    if name_or_path:
        layers.append(OmegaConf.load(resolve_config_path(name_or_path)))
    if overrides:
        _check_override_syntax(overrides)
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    return _merge(layers)


def _merge(layers: list) -> ExperimentConfig:
    """The one way a config is built: the schema, typed by the chosen method's dataclass
    (the last layer that sets ``method.name`` wins), merged with ``layers``, validated."""
    try:
        layers, name = _for_final_method(layers)
        # the schema typed by the chosen method's dataclass; built field by field, since an
        # ExperimentConfig instance would run its cross-section checks on defaults
        schema = OmegaConf.structured(ExperimentConfig)
        schema.method = OmegaConf.structured(method_config_class(name))
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, *layers))
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def _for_final_method(layers: list) -> tuple[list, str]:
    """The method is the last ``method.name`` set; of the options a layer gave while
    another method was named, those the final method does not have are dropped, so
    ``method.name=gates`` over a YAML whose method section belongs to ``fixed`` switches
    the method instead of failing on ``fixed``'s keys, and ``method.name=mask-vote`` over
    a ``pooled`` YAML keeps the model, pruner and target both declare."""
    import dataclasses

    running, owners = MethodConfig.name, []
    for layer in layers:
        running = str(OmegaConf.select(layer, "method.name") or running)
        owners.append(running)
    shared = {f.name for f in dataclasses.fields(method_config_class(running))} - {"name"}
    kept = []
    for layer, owner in zip(layers, owners):
        if owner != running and "method" in layer:
            layer = layer.copy()
            options = {k: v for k, v in layer["method"].items() if k in shared}
            del layer["method"]
            if options:
                layer["method"] = options
        kept.append(layer)
    return kept, running


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
    """Rebuild a config sent over the wire (server -> client) through the same loader and
    checks as :func:`load_config`. Memoized per process on the text: every message of a run
    carries the same config, so each worker parses it once (omegaconf costs ~14 ms a call,
    which hundreds of virtual clients per round would pay every message)."""
    return copy.deepcopy(_from_yaml(text))


@functools.lru_cache(maxsize=8)
def _from_yaml(text: str) -> ExperimentConfig:
    try:
        layer = OmegaConf.create(text)
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"a config sent over the wire is not YAML: {err}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError("a config sent over the wire must be a mapping of sections")
    return _merge([layer])


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


RUN_CONFIG_KEYS = ("config", "overrides", "run_dir", "resume")


def from_run_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """Bridge from Flower's flat ``run_config``: ``config`` names the YAML, ``overrides``
    holds space-separated ``key=value`` pairs (pyproject's [tool.flwr.app.config]);
    ``run_dir`` and ``resume`` (read by the ServerApp, not part of the experiment) name the
    run folder and whether to continue it from its checkpoint."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown run_config keys {unknown}; valid keys: {list(RUN_CONFIG_KEYS)}")
    name = str(run_config.get("config", "") or "") or None
    overrides = str(run_config.get("overrides", "") or "").split()
    return load_config(name, overrides)


# Settings that name files or folders: relative to the directory of the command that
# read them, so they are made absolute before a config goes to a process running elsewhere.
PATH_KEYS = ("data.root", "data.cache_dir", "run.out_dir", "model.init_file")


def with_absolute_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """A copy of ``cfg`` whose non-empty path settings (those above and the method's
    ``paths``) are absolute (against ``base`` or cwd)."""
    base = Path.cwd() if base is None else base
    out = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(out, section), name)
        if value:
            setattr(getattr(out, section), name, str((base / Path(value).expanduser()).resolve()))
    for name in type(cfg.method).paths:
        value = getattr(out.method, name)
        if value:
            setattr(out.method, name, str((base / Path(value).expanduser()).resolve()))
    for name in type(cfg.method).maybe_paths:  # a path only when one exists (else a name)
        value = getattr(out.method, name)
        if value and (base / Path(value).expanduser()).exists():
            setattr(out.method, name, str((base / Path(value).expanduser()).resolve()))
    return out
