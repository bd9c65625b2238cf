"""Settings a client node owns: where its data and cache live, which device and how many
threads it gives to fedprune, and which files a server may name to it.

A server decides the experiment (model, pruning method, rounds, learning rate); it does
not decide where a client's files are or what its hardware does. So the ServerApp sends
the experiment config with the node-owned settings reset (``for_clients``), and a client
fills them in from its own node config, falling back to its environment (``localize``):

=====================  =========================  =============================
experiment key         SuperNode ``--node-config``   environment
=====================  =========================  =============================
``data.root``          ``data-root``              ``FEDPRUNE_DATA_ROOT``
``data.cache_dir``     ``cache-dir``              ``FEDPRUNE_CACHE``
``run.device``         ``device``                 ``FEDPRUNE_DEVICE``
``sim.torch_threads``  ``torch-threads``          ``FEDPRUNE_TORCH_THREADS``
(file options)         ``trusted-paths``          ``FEDPRUNE_TRUSTED_PATHS``
=====================  =========================  =============================

A config whose node-owned settings are set (a server that does not reset them, or one
that tries to point a client at its files) is refused with a message naming the key. A
method option that names a file (e.g. ``method.weights``, or ``method.model`` when it
is a folder) is accepted only under the node's trusted paths (``:``-separated folders);
aliases and hub ids pass. ``fedprune run`` (simulation: the virtual nodes are the user's
own processes) exports the config's own settings as that environment.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

from ..config import DEVICES, ConfigError, ExperimentConfig

# experiment key -> (node-config key, environment variable)
NODE_OWNED = {
    "data.root": ("data-root", "FEDPRUNE_DATA_ROOT"),
    "data.cache_dir": ("cache-dir", "FEDPRUNE_CACHE"),
    "run.device": ("device", "FEDPRUNE_DEVICE"),
    "sim.torch_threads": ("torch-threads", "FEDPRUNE_TORCH_THREADS"),
}
TRUSTED = ("trusted-paths", "FEDPRUNE_TRUSTED_PATHS")


def _get(cfg: ExperimentConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: ExperimentConfig, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def _default(key: str):
    section, name = key.split(".")
    return getattr(type(getattr(ExperimentConfig(), section))(), name)


def for_clients(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config a server sends: node-owned settings back at their defaults, server-only
    files cleared."""
    out = copy.deepcopy(cfg)
    for key in NODE_OWNED:
        _set(out, key, _default(key))
    out.model.init_file = ""  # a server file: clients receive the global model instead
    return out


def node_setting(name: str, env: str, node_config: Mapping, environ: Mapping) -> str:
    value = node_config.get(name)
    return str(value) if value not in (None, "") else str(environ.get(env, ""))


def _typed(key: str, value: str, where: str):
    if key == "sim.torch_threads":
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{where} must be a positive integer (torch threads), got "
                              f"{value!r}")
        return int(value)
    if key == "run.device" and value not in DEVICES:
        raise ConfigError(f"{where} must be one of {list(DEVICES)}, got {value!r}")
    return value


def localize(cfg: ExperimentConfig, node_config: Mapping,
             environ: Mapping | None = None) -> ExperimentConfig:
    """``cfg`` as received from a server, checked and completed with this node's own
    settings. Raises ConfigError naming the key when the server set a node-owned setting
    or named a file outside the node's trusted paths."""
    environ = os.environ if environ is None else environ
    out = copy.deepcopy(cfg)
    for key, (name, env) in NODE_OWNED.items():
        if _get(out, key) != _default(key):
            raise ConfigError(
                f"the server set {key}={_get(out, key)!r}: {key} is this node's own setting "
                f"(SuperNode --node-config '{name}=...' or ${env}); a client does not take "
                "it from a server")
        value = node_setting(name, env, node_config, environ)
        if value:
            _set(out, key, _typed(key, value, f"node config {name} / ${env}"))
    check_server_paths(out, trusted_paths(node_config, environ))
    return out


def own_settings(cfg: ExperimentConfig) -> dict[str, str]:
    """``cfg``'s own node settings as node-config keys, with trust in the files its method
    options name: what a user's own nodes (simulation) are given."""
    out = {}
    for key, (name, _) in NODE_OWNED.items():
        if _get(cfg, key) != _default(key):
            out[name] = str(_get(cfg, key))
    files = [getattr(cfg.method, n) for n in client_file_options(cfg)]
    files = [f for f in files if f and Path(f).expanduser().exists()]
    if files:
        out[TRUSTED[0]] = os.pathsep.join(str(Path(f).expanduser().resolve()) for f in files)
    return out


def node_environment(cfg: ExperimentConfig) -> dict[str, str]:
    """:func:`own_settings` as the environment of virtual nodes."""
    env_of = {name: env for name, env in (*NODE_OWNED.values(), TRUSTED)}
    return {env_of[name]: value for name, value in own_settings(cfg).items()}


def trusted_paths(node_config: Mapping, environ: Mapping) -> list[Path]:
    value = node_setting(*TRUSTED, node_config, environ)
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p]


def _is_under(path: Path, folders: list[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def client_file_options(cfg: ExperimentConfig) -> list[str]:
    """The method options that may name a file a client opens (server-only ones left out:
    e.g. ``fixed``'s round-0 mask file, which only the server reads)."""
    method = type(cfg.method)
    return [n for n in (*method.paths, *method.maybe_paths) if n not in method.server_paths]


def check_server_paths(cfg: ExperimentConfig, trusted: list[Path]) -> None:
    """Method options that name files on this node must lie under ``trusted``."""
    method = type(cfg.method)
    for name in client_file_options(cfg):
        value = getattr(cfg.method, name)
        if not value:
            continue
        path = Path(value).expanduser()
        if name in method.maybe_paths and not path.exists():
            continue  # an alias or a hub id, not a file of this node
        if not _is_under(path.resolve(), trusted):
            raise ConfigError(
                f"method.{name}={value!r} names a file on this node outside its trusted "
                f"paths {[str(p) for p in trusted]}: allow the folder with SuperNode "
                f"--node-config '{TRUSTED[0]}=DIR' or ${TRUSTED[1]}")
