from __future__ import annotations

import pytest

from cps.errors import CpsError
from cps.languages import (
    LANGUAGES,
    PAPER_LANGUAGES,
    get_language,
    mixture_label,
    mixture_spec,
    parse_languages,
    parse_mixture,
    parse_recipe,
    script_share,
)

CORPUS_LANGUAGES = ["ar", "de", "en", "es", "fr", "hi", "ja", "ko", "ru", "sw", "tr", "vi", "zh"]


def test_registry_covers_the_corpora_languages_with_consistent_codes():
    for code in CORPUS_LANGUAGES:
        lang = get_language(code)
        assert lang.code == code
        assert LANGUAGES[code] is lang
        # FLORES-200 codes end with the script (Kore is written Hang there)
        assert lang.flores.split("_")[1] == {"Kore": "Hang"}.get(lang.script, lang.script)
        assert lang.mc4 == code
    assert set(PAPER_LANGUAGES) <= set(CORPUS_LANGUAGES)
    assert get_language("sw").flores == "swh_Latn"
    assert get_language("ZH").name == "Chinese"


def test_unknown_language_is_a_user_error():
    with pytest.raises(CpsError, match="unknown language 'xx'"):
        get_language("xx")
    with pytest.raises(CpsError):
        parse_languages("en,xx")
    with pytest.raises(CpsError, match="no language"):
        parse_languages(" , ")


def test_parse_languages_keeps_order_and_drops_duplicates():
    assert parse_languages("sw, en,SW,zh") == ["sw", "en", "zh"]


@pytest.mark.parametrize(
    ("text", "script", "share"),
    [
        ("Habari ya leo", "Latn", 1.0),
        ("Привет мир", "Cyrl", 1.0),
        ("مرحبا بالعالم", "Arab", 1.0),
        ("你好世界", "Hans", 1.0),
        ("こんにちは世界", "Jpan", 1.0),
        ("안녕하세요", "Kore", 1.0),
        ("नमस्ते", "Deva", 1.0),
        ("abc ДЕ", "Cyrl", 0.4),  # 2 of 5 letters; spaces and digits do not count
        ("1234 !!", "Latn", 0.0),
    ],
)
def test_script_share(text, script, share):
    assert script_share(text, script) == pytest.approx(share)


def test_a_pair_recipe_is_half_each_under_one_canonical_name():
    for spelling in ("sw+en", "en+sw", " SW + EN "):
        mixture = parse_mixture(spelling)
        assert mixture == {"sw": 0.5, "en": 0.5} and list(mixture) == ["sw", "en"]  # English last
        assert mixture_label(mixture) == "sw+en"
        assert mixture_spec(mixture) == "sw:0.5,en:0.5"  # what decides the windows
    assert mixture_label(parse_mixture("zh+de")) == "de+zh"  # no English: alphabetical
    assert parse_mixture("de+zh") == {"de": 0.5, "zh": 0.5}


def test_all_is_an_equal_mix_of_the_paper_languages():
    mixture = parse_mixture("all")
    assert list(mixture) == list(PAPER_LANGUAGES) and len(PAPER_LANGUAGES) == 7
    assert all(share == pytest.approx(1 / 7) for share in mixture.values())
    assert sum(mixture.values()) == pytest.approx(1)
    assert mixture_label(mixture) == mixture_label(parse_mixture(" ALL ")) == "all"


def test_proportions_written_out_keep_their_own_label():
    # the same shares as sw+en, but asked for by proportions: the label stays what was written
    # (runs logged before recipes existed keep matching), the windows are the same (one spec)
    written = parse_mixture("sw:0.5,en:0.5")
    assert written == parse_mixture("sw+en") and written.recipe is None
    assert mixture_label(written) == "sw:0.5,en:0.5"
    assert mixture_spec(written) == mixture_spec(parse_mixture("sw+en"))
    assert mixture_label(parse_mixture("sw")) == "sw" and parse_recipe("sw") is None
    assert mixture_label({"en": 0.25, "zh": 0.75}) == "en:0.25,zh:0.75"  # a plain dict as before


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("xx+en", "unknown language 'xx'"),
        ("sw+sw", "names 'sw' twice"),
        ("en+EN", "names 'en' twice"),
        ("sw+en+de", "names two languages"),
        ("sw+", "names two languages"),
        ("+", "names two languages"),
        ("sw+en:0.5", "takes no proportions"),
        ("sw+en,de", "takes no proportions"),
        ("al", "unknown language 'al'"),
    ],
)
def test_a_bad_recipe_is_a_user_error(spec, message):
    with pytest.raises(CpsError, match=message):
        parse_mixture(spec)
