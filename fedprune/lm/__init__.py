"""Language-model data and evaluation: text sources, specs, calibration, perplexity, loading.

- :mod:`~fedprune.lm.text`: WikiText-2, PTB and Shakespeare as one string per split,
- :mod:`~fedprune.lm.spec`: ``SOURCE[:SPLIT]:NxL`` text specs,
- :mod:`~fedprune.lm.tokens`: tokenize a split once and cache the ids,
- :mod:`~fedprune.lm.calib`: N random calibration windows of L tokens (SparseGPT/Wanda),
- :mod:`~fedprune.lm.perplexity`: perplexity over non-overlapping windows (SparseGPT/Wanda),
- :mod:`~fedprune.lm.loading`: causal LMs and tokenizers from an alias, GGUF, folder or hub,
- :mod:`~fedprune.lm.tiny_models`: tiny random models of four families for tests.

Importing this package does not import transformers; loading a model does.
"""

from fedprune.lm.calib import calibration_batches, sample_windows
from fedprune.lm.loading import load_causal_lm, load_encoder
from fedprune.lm.perplexity import eval_windows, perplexity
from fedprune.lm.spec import SpecError, TextSpec, parse_spec
from fedprune.lm.text import SOURCES, load_text
from fedprune.lm.tokens import encode_split

__all__ = [
    "SOURCES",
    "SpecError",
    "TextSpec",
    "calibration_batches",
    "encode_split",
    "eval_windows",
    "load_causal_lm",
    "load_encoder",
    "load_text",
    "parse_spec",
    "perplexity",
    "sample_windows",
]
