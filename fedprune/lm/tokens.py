"""Tokenize one split of a text source once and cache the ids on disk.

The whole split is tokenized in one call, ``tokenizer(text)["input_ids"]`` with the
tokenizer's default special tokens, like the reference's ``tokenizer(text,
return_tensors='pt')`` (a LLaMA tokenizer adds one BOS at the very start; SmolLM2's adds
nothing). Tokenizing WikiText-2 test takes seconds, so the ids are stored as
``<cache>/tokens/<source>-<split>-<tokenizer>-<hash>.npy``: the hash covers the tokenizer
(its full serialized definition when it has one, else its vocabulary) and the text itself,
so a different tokenizer or a changed data file never reuses an entry. Writes are atomic
and locked (:mod:`fedprune.data.cache`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np
import torch

from fedprune.data.cache import atomic_write, build_once, resolve_cache_dir
from fedprune.lm.text import load_text

TOKENS_FORMAT = 1  # bump when the stored layout changes


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash that changes whenever the tokenizer would tokenize differently."""
    digest = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # Hugging Face fast tokenizer: vocab, merges, pre/post-processing
        digest.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        raise TypeError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it has "
                        "neither backend_tokenizer nor get_vocab()")
    special = getattr(tokenizer, "special_tokens_map", {})
    digest.update(json.dumps(special, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _tokenizer_label(tokenizer: Any) -> str:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    name = name.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "tokenizer"


def encode_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` in one call, (T,) int64."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def encode_split(tokenizer: Any, source: str, split: str, root: str = "",
                 cache_dir: str = "") -> torch.Tensor:
    """Token ids of one split, (T,) int64, tokenized on the first call and cached."""
    text = load_text(source, split, root)
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|".encode() + text.encode())
    name = (f"v{TOKENS_FORMAT}-{source}-{split}-{_tokenizer_label(tokenizer)}-"
            f"{key.hexdigest()[:16]}.npy")
    path = resolve_cache_dir(cache_dir) / "tokens" / name

    def build() -> None:
        ids = encode_text(tokenizer, text).numpy()
        dtype = np.int32 if ids.size == 0 or ids.max() < 2**31 else np.int64
        atomic_write(path, lambda handle: np.save(handle, ids.astype(dtype)))

    build_once([path], build)
    return torch.from_numpy(np.load(path).astype(np.int64))
