"""Text specs: which text, which split, how many windows of how many tokens.

Grammar (whitespace is ignored, case too)::

    SOURCE[:SPLIT]:NxL      e.g.  ptb:64x512   wikitext2:test:all x 512   shakespeare:train:16x256

- ``SOURCE``: one of :data:`fedprune.lm.text.SOURCES`;
- ``SPLIT``: optional; left out, it is the purpose's default: calibration reads ``train``
  (``wikitext2``: ``valid``, because the shared data folder has no WikiText-2 train split;
  the default is the same online so results do not depend on the machine), evaluation
  reads ``test``;
- ``N``: number of windows (a positive integer) or ``all``; for evaluation, the first N
  non-overlapping windows, for calibration N windows at random offsets (see
  :mod:`fedprune.lm.calib`);
- ``L``: tokens per window, at least 2 (a window predicts its last L-1 tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedprune.lm.text import SOURCE_SPLITS, SOURCES

GRAMMAR = "SOURCE[:SPLIT]:NxL (N a count or 'all'), e.g. 'wikitext2:test:64x512'"
CALIBRATION_SPLITS = {"wikitext2": "valid", "ptb": "train", "shakespeare": "train",
                      "kjv": "train"}
EVALUATION_SPLIT = "test"
_WINDOWS = re.compile(r"(all|\d+)x(\d+)")


class SpecError(ValueError):
    """A text spec is malformed or names an unknown source or split; the message names it."""


def _problem(source: str, split: str | None, count: int | None, length: int) -> str:
    """What is wrong with these fields, or "" when nothing is."""
    if source not in SOURCE_SPLITS:
        return f"unknown source {source!r}; valid sources: {list(SOURCES)}"
    if split is not None and split not in SOURCE_SPLITS[source]:
        return f"{source} has no split {split!r}; valid splits: {list(SOURCE_SPLITS[source])}"
    if count is not None and count < 1:
        return f"the number of windows must be >= 1 or 'all', got {count}"
    if length < 2:
        return f"windows need at least 2 tokens, got {length}"
    return ""


@dataclass(frozen=True)
class TextSpec:
    """A parsed text spec; ``split`` None means the purpose's default, ``count`` None all."""

    source: str
    split: str | None = None
    count: int | None = None
    length: int = 512

    def __post_init__(self) -> None:
        problem = _problem(self.source, self.split, self.count, self.length)
        if problem:
            raise SpecError(f"text spec {str(self)!r} is not valid: {problem}")

    def __str__(self) -> str:
        split = f":{self.split}" if self.split else ""
        count = "all" if self.count is None else str(self.count)
        return f"{self.source}{split}:{count}x{self.length}"

    def calibration_split(self) -> str:
        """The split calibration reads: the given one, else the source's default."""
        return self.split or CALIBRATION_SPLITS[self.source]

    def evaluation_split(self) -> str:
        """The split evaluation reads: the given one, else ``test``."""
        return self.split or EVALUATION_SPLIT


def parse_spec(spec: str | TextSpec) -> TextSpec:
    """Parse ``SOURCE[:SPLIT]:NxL`` into a :class:`TextSpec` (a TextSpec passes through)."""
    if isinstance(spec, TextSpec):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"a text spec must be a string like {GRAMMAR}; got {spec!r}")
    parts = re.sub(r"\s+", "", spec).lower().split(":")
    windows = _WINDOWS.fullmatch(parts[-1]) if len(parts) in (2, 3) else None
    if windows is None:
        raise SpecError(f"text spec {spec!r} is not valid; expected {GRAMMAR}; "
                        f"valid sources: {list(SOURCES)}")
    count = None if windows[1] == "all" else int(windows[1])
    split = parts[1] if len(parts) == 3 else None
    problem = _problem(parts[0], split, count, int(windows[2]))
    if problem:
        raise SpecError(f"text spec {spec!r} is not valid: {problem}")
    return TextSpec(parts[0], split, count, int(windows[2]))
