"""On-disk cache for decoded arrays and partitions.

Many processes (Flower's virtual clients) can ask for the same decoded data set or the same
partition at the same moment. A per-entry file lock lets one of them build the entry while
the others wait, and every file is written under a temporary name and renamed into place,
so a reader never sees half a file even where locks are unavailable.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

try:  # POSIX only; elsewhere the atomic rename alone keeps readers safe
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

CACHE_ENV = "FEDPRUNE_CACHE"


def resolve_cache_dir(cache_dir: str = "") -> Path:
    """Cache folder: the argument, else $FEDPRUNE_CACHE, else ~/.cache/fedprune."""
    chosen = cache_dir or os.environ.get(CACHE_ENV, "")
    if chosen:
        return Path(chosen).expanduser().absolute()
    return Path.home() / ".cache" / "fedprune"


def file_fingerprint(paths: list[Path]) -> str:
    """Short hash of names, sizes and mtimes: a replaced source file gets a new cache key."""
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask (mkstemp would force 0600 on a shared cache).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_once(paths: list[Path], build: Callable[[], None]) -> None:
    """Run ``build`` (which must write all ``paths``) unless they all exist already."""
    if all(p.exists() for p in paths):
        return
    lock = paths[0].with_name(paths[0].name + ".lock")
    with file_lock(lock):
        # Another process may have built the entry while this one waited for the lock.
        if not all(p.exists() for p in paths):
            build()


def cached_arrays(stem: Path, build: Callable[[], dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
    """Images and labels stored as ``<stem>.{images,labels}.npy``, built on a miss, mmapped."""
    names = ("images", "labels")
    paths = {n: stem.with_name(f"{stem.name}.{n}.npy") for n in names}

    def build_and_save() -> None:
        arrays = build()
        for name in names:
            atomic_write(paths[name], lambda h, a=arrays[name]: np.save(h, a))

    build_once(list(paths.values()), build_and_save)
    return {n: np.load(p, mmap_mode="r") for n, p in paths.items()}
