"""MKQA's own answer scoring (Longpre et al., 2021; github.com/apple/ml-mkqa, `mkqa_eval_util.py`),
rewritten: per language, lower-case, drop punctuation, drop the language's articles, split on
whitespace, or into characters for Chinese, Japanese, Thai and Khmer; exact match and token F1,
each the best over the gold answers. A gold answer `""` (unanswerable, long answer) is matched only
by an empty prediction: F1 is 1 when both are empty, 0 when one is.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

MIXED_SEGMENTATION = ("zh_cn", "zh_hk", "zh_tw", "ja", "th", "km")
ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    "ar": r"\sال^|ال",  # as the official script has it
    "nl": r"\b(de|het|een|des|der|den)\b",
    "sv": r"\b(en|ett)\b",
    "da": r"\b(en|et)\b",
    "no": r"\b(en|et|ei)\b",
    "fr": r"\b(le|la|l'|les|du|de|d'|des|un|une|des)",
    "pt": r"\b(o|a|os|as|um|uma|uns|umas)\b",
    "it": r"\b(il|lo|la|l'|i|gli|le|del|dello|della|dell'|dei|degli|degl'|delle|un'|uno|una|un)",
    "fi": r"\b(se|yks|yksi)\b",
    "hu": r"\b(a|az|egy)\b",
}
_PUNCTUATION = set(string.punctuation)


def tokens(text: str, lang: str) -> list[str]:
    """The official normalisation, as tokens (`lang` is MKQA's code: en, zh_cn, ...)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    if lang in ARTICLES:
        text = re.sub(ARTICLES[lang], " ", text)
    pieces = list(text) if lang in MIXED_SEGMENTATION else text.split()
    return [piece for piece in pieces if piece.strip()]


def exact_match(prediction: str, gold: str, lang: str) -> float:
    return float(tokens(prediction, lang) == tokens(gold, lang))


def f1(prediction: str, gold: str, lang: str) -> float:
    gold_tokens = tokens(gold, lang) if gold else []
    predicted = tokens(prediction, lang) if prediction else []
    if not gold_tokens or not predicted:
        return float(gold_tokens == predicted)
    common = sum((Counter(gold_tokens) & Counter(predicted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best(metric: Callable[[str, str, str], float], prediction: str, answers: list[str], lang: str) -> float:
    """The best score over the gold answers (never empty: an unanswerable question has `""`)."""
    return max(metric(prediction, answer, lang) for answer in answers)


def scores(prediction: str, answers: list[str], lang: str) -> dict[str, float]:
    """exact_match and f1 of one prediction, MKQA's way."""
    return {
        "exact_match": best(exact_match, prediction, answers, lang),
        "f1": best(f1, prediction, answers, lang),
    }
