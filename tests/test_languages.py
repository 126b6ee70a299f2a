from __future__ import annotations

import pytest

from cps.errors import CpsError
from cps.languages import LANGUAGES, PAPER_LANGUAGES, get_language, parse_languages, script_share

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
