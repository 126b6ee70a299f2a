"""Language registry: ISO 639-1 code, English name, script, FLORES-200 code and mC4 config name;
calibration mixtures and their named recipes (`sw+en`, `all`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cps.errors import CpsError


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1
    name: str
    script: str  # ISO 15924
    flores: str  # FLORES-200 code, e.g. swh_Latn
    mc4: str | None  # config name of allenai/c4 (multilingual mC4); None where mC4 has no such split


LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        # the 13 languages of the shared corpora (NTREX, FLORES/SIB-200)
        Language("ar", "Arabic", "Arab", "arb_Arab", "ar"),
        Language("de", "German", "Latn", "deu_Latn", "de"),
        Language("en", "English", "Latn", "eng_Latn", "en"),
        Language("es", "Spanish", "Latn", "spa_Latn", "es"),
        Language("fr", "French", "Latn", "fra_Latn", "fr"),
        Language("hi", "Hindi", "Deva", "hin_Deva", "hi"),
        Language("ja", "Japanese", "Jpan", "jpn_Jpan", "ja"),
        Language("ko", "Korean", "Kore", "kor_Hang", "ko"),
        Language("ru", "Russian", "Cyrl", "rus_Cyrl", "ru"),
        Language("sw", "Swahili", "Latn", "swh_Latn", "sw"),
        Language("tr", "Turkish", "Latn", "tur_Latn", "tr"),
        Language("vi", "Vietnamese", "Latn", "vie_Latn", "vi"),
        Language("zh", "Chinese", "Hans", "zho_Hans", "zh"),
        # the other XCOPA languages (task data only)
        Language("et", "Estonian", "Latn", "est_Latn", "et"),
        Language("ht", "Haitian Creole", "Latn", "hat_Latn", "ht"),
        Language("id", "Indonesian", "Latn", "ind_Latn", "id"),
        Language("it", "Italian", "Latn", "ita_Latn", "it"),
        Language("qu", "Quechua", "Latn", "quy_Latn", None),
        Language("ta", "Tamil", "Taml", "tam_Taml", "ta"),
        Language("th", "Thai", "Thai", "tha_Thai", "th"),
    ]
}

# The calibration languages of arXiv 2408.14398.
PAPER_LANGUAGES = ("ar", "de", "en", "es", "ru", "sw", "zh")


def get_language(code: str) -> Language:
    try:
        return LANGUAGES[code.strip().lower()]
    except KeyError:
        known = " ".join(sorted(LANGUAGES))
        raise CpsError(f"unknown language {code!r}; known: {known}") from None


def parse_languages(spec: str) -> list[str]:
    """'ar,de, en' -> ['ar', 'de', 'en'] (validated, order kept, duplicates dropped)."""
    codes = [get_language(part).code for part in spec.split(",") if part.strip()]
    if not codes:
        raise CpsError("no language given")
    return list(dict.fromkeys(codes))


class Mixture(dict[str, float]):
    """Proportions by language code, in sampling order (the order decides which languages get the
    leftover windows and how they interleave); `recipe` is the name it was asked for by (`sw+en`,
    `all`), None for a code or proportions written out."""

    def __init__(self, shares: Mapping[str, float], recipe: str | None = None) -> None:
        super().__init__(shares)
        self.recipe = recipe


# `all`: an equal mix of the study's languages, which are the paper's calibration languages.
ALL_RECIPE = "all"


def parse_recipe(spec: str) -> Mixture | None:
    """A named mixture, or None when `spec` names none.

    `all`: the languages of `PAPER_LANGUAGES` in equal shares; `A+B` (e.g. `sw+en`): half each. A
    recipe's name is canonical, lower case with its languages in alphabetical order, English last
    (`en+sw` and `SW+EN` are both `sw+en`), so that one mixture has one name and one set of windows.
    """
    name = spec.strip().lower()
    if name == ALL_RECIPE:
        return Mixture(dict.fromkeys(PAPER_LANGUAGES, 1 / len(PAPER_LANGUAGES)), ALL_RECIPE)
    if "+" not in name:
        return None
    if ":" in name or "," in name:
        raise CpsError(f"a recipe takes no proportions: write 'sw+en' or 'en:0.5,sw:0.5', not {spec!r}")
    parts = [part.strip() for part in name.split("+")]
    if len(parts) != 2 or not all(parts):
        raise CpsError(f"a recipe A+B names two languages, e.g. sw+en (got {spec!r})")
    codes = sorted((get_language(part).code for part in parts), key=lambda code: (code == "en", code))
    if codes[0] == codes[1]:
        raise CpsError(f"recipe {spec!r} names {codes[0]!r} twice; calibrate on {codes[0]!r} alone")
    return Mixture(dict.fromkeys(codes, 0.5), "+".join(codes))


def parse_mixture(spec: str) -> Mixture:
    """'sw' -> {'sw': 1.0}; 'en:0.5,sw:0.5' -> proportions (positive, summing to 1); a recipe
    (`parse_recipe`: 'sw+en', 'all') -> its mixture, which remembers the recipe's name."""
    recipe = parse_recipe(spec)
    if recipe is not None:
        return recipe
    mixture: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        code, _, weight = part.partition(":")
        code = get_language(code).code
        try:
            share = float(weight) if weight else 1.0
        except ValueError:
            raise CpsError(f"bad proportion {weight!r} for {code!r} in {spec!r}") from None
        if not share > 0:
            raise CpsError(f"proportion of {code!r} must be positive in {spec!r}")
        if code in mixture:
            raise CpsError(f"language {code!r} appears twice in {spec!r}")
        mixture[code] = share
    if not mixture:
        raise CpsError("no calibration language given")
    if len(mixture) > 1 and abs(sum(mixture.values()) - 1) > 1e-3:
        raise CpsError(f"mixture proportions must sum to 1 (got {sum(mixture.values()):g})")
    total = sum(mixture.values())
    return Mixture({code: share / total for code, share in mixture.items()})


def mixture_spec(mixture: Mapping[str, float]) -> str:
    """The mixture written out, recipe or not: 'sw' or 'sw:0.5,en:0.5' (what decides its windows)."""
    if len(mixture) == 1:
        return next(iter(mixture))
    return ",".join(f"{code}:{share:g}" for code, share in mixture.items())


def mixture_label(mixture: Mapping[str, float]) -> str:
    """The canonical `calib_lang` param: the recipe's name ('sw+en', 'all') for a recipe, else
    `mixture_spec` ('sw', 'en:0.5,sw:0.5'): what a user filters runs by."""
    recipe = getattr(mixture, "recipe", None)
    return recipe if recipe else mixture_spec(mixture)


# Unicode blocks of the scripts above; used to check that text is in the language it claims.
_BLOCKS: dict[str, tuple[tuple[int, int], ...]] = {
    "Latn": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "Arab": ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "Cyrl": ((0x400, 0x52F),),
    "Deva": ((0x900, 0x97F),),
    "Hang": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    "Hani": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)),
    "Kana": ((0x3040, 0x30FF),),  # hiragana and katakana
    "Taml": ((0xB80, 0xBFF),),
    "Thai": ((0xE00, 0xE7F),),
}
# Scripts written with several blocks.
_COMPOSITE = {"Jpan": ("Kana", "Hani"), "Kore": ("Hang", "Hani"), "Hans": ("Hani",)}


def _block_of(char: str) -> str | None:
    point = ord(char)
    for block, ranges in _BLOCKS.items():
        if any(low <= point <= high for low, high in ranges):
            return block
    return None


def script_share(text: str, script: str) -> float:
    """Fraction of the letters of `text` (characters of any known script) written in `script`."""
    wanted = set(_COMPOSITE.get(script, (script,)))
    blocks = [b for b in map(_block_of, text) if b is not None]
    if not blocks:
        return 0.0
    return sum(b in wanted for b in blocks) / len(blocks)
