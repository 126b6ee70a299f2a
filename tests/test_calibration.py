from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from cps.config import CalibrationConfig
from cps.data import get_corpus
from cps.data.calibration import DOCUMENT_SEPARATOR, build_calibration, sample_starts, window_counts
from cps.errors import CpsError
from cps.languages import get_language, parse_mixture, script_share


def _build(tokenizer, lang, nsamples=8, seqlen=64, seed=0, corpus="ntrex"):
    config = CalibrationConfig("tiny-llama", lang, corpus, nsamples, seqlen, seed)
    return build_calibration(config, tokenizer)


def test_window_counts_by_largest_remainder():
    assert window_counts({"en": 0.5, "sw": 0.5}, 5) == {"en": 3, "sw": 2}
    assert window_counts({"a": 0.2, "b": 0.3, "c": 0.5}, 7) == {"a": 1, "b": 2, "c": 4}
    assert window_counts({"sw": 1.0}, 128) == {"sw": 128}


def test_parse_mixture():
    assert parse_mixture("sw") == {"sw": 1.0}
    assert parse_mixture("en:0.25, zh:0.75") == {"en": 0.25, "zh": 0.75}
    for bad, message in [
        ("en:0.5,sw:0.4", "sum to 1"),
        ("en:0,sw:1", "positive"),
        ("en:x", "bad proportion"),
        ("en:0.5,en:0.5", "twice"),
        ("xx", "unknown language"),
        ("", "no calibration language"),
    ]:
        with pytest.raises(CpsError, match=message):
            parse_mixture(bad)


def test_config_validation():
    for field, value in [("nsamples", 0), ("seqlen", 1), ("seed", -1)]:
        args = {"model": "tiny-llama", "lang": "sw", field: value}
        with pytest.raises(CpsError, match=field):
            CalibrationConfig(**args)


@pytest.mark.parametrize("seed", range(20))
def test_disjoint_windows_when_the_stream_is_long_enough(seed):
    generator = torch.Generator().manual_seed(seed)
    starts, overlapping = sample_starts(1000, 10, 73, generator)
    assert not overlapping
    ordered = sorted(starts.tolist())
    assert ordered[0] >= 0 and ordered[-1] + 73 <= 1000
    assert all(b - a >= 73 for a, b in pairwise(ordered))


def test_overlapping_windows_when_the_stream_is_short():
    starts, overlapping = sample_starts(100, 10, 50, torch.Generator().manual_seed(0))
    assert overlapping
    assert starts.min() >= 0 and starts.max() <= 50
    with pytest.raises(CpsError, match="fewer than one window"):
        sample_starts(40, 1, 50, torch.Generator())


def test_windows_are_deterministic_and_cached(tiny_tokenizer, monkeypatch, tmp_path):
    first = _build(tiny_tokenizer, "sw", seed=3)
    assert not first.cache_hit and first.cache_path.is_file()
    again = _build(tiny_tokenizer, "sw", seed=3)
    assert again.cache_hit and again.calib_hash == first.calib_hash
    assert torch.equal(again.input_ids, first.input_ids)
    # rebuilt from scratch in an empty cache: bit-identical
    monkeypatch.setenv("CPS_CACHE_DIR", str(tmp_path))
    rebuilt = _build(tiny_tokenizer, "sw", seed=3)
    assert not rebuilt.cache_hit and torch.equal(rebuilt.input_ids, first.input_ids)
    other = _build(tiny_tokenizer, "sw", seed=4)
    assert other.calib_hash != first.calib_hash
    assert not torch.equal(other.input_ids, first.input_ids)


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("lang", ["zh", "ru", "ar", "hi"])
def test_windows_are_text_of_the_language(tiny_tokenizer, lang):
    calib = _build(tiny_tokenizer, lang, nsamples=6, seqlen=48)
    assert calib.input_ids.shape == (6, 48) and calib.input_ids.dtype == torch.int64
    corpus_text = DOCUMENT_SEPARATOR.join(d.text for d in get_corpus("ntrex").documents(lang))
    script = get_language(lang).script
    texts = [_decode(tiny_tokenizer, window.tolist()) for window in calib.input_ids]
    # news text quotes Latin names: each window mostly, and all together overwhelmingly, in script
    assert all(script_share(text, script) > 0.5 for text in texts), texts
    assert script_share("".join(texts), script) > 0.85
    for text in texts:  # a contiguous piece of the corpus (edges may split a multi-byte character)
        assert text[2:-2] in corpus_text


def test_mixture_proportions_and_interleaving(tiny_tokenizer):
    calib = _build(tiny_tokenizer, "ru:0.25,zh:0.75", nsamples=40, seqlen=32)
    assert calib.calib_lang == "ru:0.25,zh:0.75"
    assert calib.window_langs.count("ru") == 10 and calib.window_langs.count("zh") == 30
    assert calib.window_langs[:10] != ["ru"] * 10  # shuffled together
    other = {"ru": "Hans", "zh": "Cyrl"}
    for code, window in zip(calib.window_langs, calib.input_ids, strict=True):
        text = _decode(tiny_tokenizer, window.tolist())
        assert script_share(text, get_language(code).script) > 0.25, text  # names may be Latin
        assert script_share(text, other[code]) == 0, text
    metrics = calib.summary_metrics()
    assert metrics["calib.windows.ru"] == 10 and metrics["calib.windows.zh"] == 30


def test_coverage_is_exact_for_disjoint_windows(tiny_tokenizer):
    calib = _build(tiny_tokenizer, "en", nsamples=10, seqlen=100)
    stats = calib.stats["en"]
    assert not stats.overlapping
    # no BOS for this tokenizer: 10 disjoint windows of 100 tokens
    assert stats.tokens_covered == 1000
    assert stats.coverage == pytest.approx(1000 / stats.corpus_tokens)
    assert 1 <= stats.documents_used <= 10 * 2 and stats.corpus_documents == 123


def test_small_corpus_overlaps_and_reports_coverage(tiny_tokenizer, tmp_path, caplog):
    (tmp_path / "sw.txt").write_text("Habari ya leo rafiki yangu. " * 40, encoding="utf-8")
    calib = _build(tiny_tokenizer, "sw", nsamples=20, seqlen=64, corpus=f"textdir:{tmp_path}")
    stats = calib.stats["sw"]
    assert stats.overlapping and "windows overlap" in caplog.text
    assert stats.corpus_tokens < 20 * 64
    assert 0 < stats.coverage <= 1 and stats.tokens_covered <= stats.corpus_tokens


def test_empty_corpus_is_a_user_error(tiny_tokenizer, tmp_path):
    (tmp_path / "sw.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CpsError, match="no 'sw' text"):
        _build(tiny_tokenizer, "sw", corpus=f"textdir:{tmp_path}")


def test_gemma_windows_start_with_bos():
    from cps.models import load_tokenizer

    tokenizer = load_tokenizer("gemma3-270m")
    config = CalibrationConfig("gemma3-270m", "sw", nsamples=4, seqlen=32)
    calib = build_calibration(config, tokenizer)
    assert (calib.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert (calib.input_ids[:, 1:] != tokenizer.bos_token_id).all()


def test_a_cache_hit_carries_the_callers_model(tiny_tokenizer):
    first = build_calibration(CalibrationConfig("tiny-llama", "de", nsamples=2, seqlen=16), tiny_tokenizer)
    other = build_calibration(CalibrationConfig("tiny-qwen2", "de", nsamples=2, seqlen=16), tiny_tokenizer)
    assert other.cache_hit and other.calib_hash == first.calib_hash  # same tokenizer, same windows
    assert other.config.model == "tiny-qwen2"


def test_a_cached_calibration_set_is_found_without_loading_the_tokenizer(store, monkeypatch):
    from cps.stages import calibrate

    config = CalibrationConfig("tiny-llama", "sw", nsamples=3, seqlen=24, seed=7)
    first = calibrate.run_calibrate(config, store)  # loads the tokenizer, records its fingerprint

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded")

    monkeypatch.setattr(calibrate, "load_tokenizer", refuse)
    again = calibrate.run_calibrate(config, store)
    assert again.calib.cache_hit and again.calib.calib_hash == first.calib.calib_hash
    assert torch.equal(again.calib.input_ids, first.calib.input_ids)
    other = CalibrationConfig("tiny-llama", "sw", nsamples=3, seqlen=24, seed=8)  # a miss must tokenize
    with pytest.raises(AssertionError, match="tokenizer was loaded"):
        calibrate.run_calibrate(other, store)
