"""MKQA: MKQA's answer scoring against hand-computed values, and the pack task end to end on a
fixture file in the official schema."""

from __future__ import annotations

import json
import math

import pytest

from cps.errors import CpsError
from cps.evaluation import mkqa
from cps.evaluation.tasks import expand_tasks, run_tasks
from cps.models import load_model


@pytest.mark.parametrize(
    ("prediction", "answers", "lang", "em", "f1"),
    [
        ("The Eiffel Tower.", ["Eiffel Tower"], "en", 1.0, 1.0),  # article and punctuation go
        ("Eiffel", ["Eiffel Tower"], "en", 0.0, 2 * (1 * 0.5) / 1.5),  # P 1, R 1/2
        ("usa", ["United States", "USA"], "en", 1.0, 1.0),  # the best over the aliases
        ("Der Rhein", ["Rhein"], "de", 1.0, 1.0),  # German articles
        ("北京市", ["北京"], "zh_cn", 0.0, 0.8),  # by characters: P 2/3, R 1, F1 0.8
        ("", [""], "en", 1.0, 1.0),  # unanswerable, and the model gives no answer
        ("Paris", [""], "en", 0.0, 0.0),  # unanswerable, but the model answers
        ("in 1969 the year", ["1969"], "en", 0.0, 2 * (1 / 3) / (1 / 3 + 1)),  # P 1/3, R 1
    ],
)
def test_scores_by_hand(prediction, answers, lang, em, f1):
    assert mkqa.scores(prediction, answers, lang) == {"exact_match": em, "f1": pytest.approx(f1)}


def _fixture(root) -> None:
    """Three questions in the official schema: answerable, with an alias, unanswerable."""
    examples = [
        {
            "example_id": 1,
            "queries": {
                "en": "what is the capital of france",
                "zh_cn": "法国的首都是哪里",
                "de": "Hauptstadt von Frankreich",
            },
            "answers": {
                "en": [{"type": "entity", "text": "Paris"}],
                "zh_cn": [{"type": "entity", "text": "巴黎"}],
                "de": [{"type": "entity", "text": "Paris"}],
            },
        },
        {
            "example_id": 2,
            "queries": {"en": "who wrote hamlet", "zh_cn": "谁写了哈姆雷特", "de": "Wer schrieb Hamlet"},
            "answers": {
                "en": [{"type": "entity", "text": "William Shakespeare", "aliases": ["Shakespeare"]}],
                "zh_cn": [{"type": "entity", "text": "莎士比亚"}],
                "de": [{"type": "entity", "text": "William Shakespeare"}],
            },
        },
        {
            "example_id": 3,
            "queries": {
                "en": "what is inside a black hole",
                "zh_cn": "黑洞里面有什么",
                "de": "Was ist in einem Schwarzen Loch",
            },
            "answers": {lang: [{"type": "unanswerable", "text": None}] for lang in ("en", "zh_cn", "de")},
        },
    ]
    (root / "mkqa").mkdir(parents=True)
    (root / "mkqa" / "mkqa.jsonl").write_text("\n".join(json.dumps(e) for e in examples), encoding="utf-8")


def test_mkqa_runs_through_lm_eval_and_keeps_what_recomputes_it(tmp_path):
    _fixture(tmp_path)
    data_dir = str(tmp_path)
    with pytest.raises(CpsError, match="no task for mkqa_sw"):  # MKQA has no Swahili
        expand_tasks(["mkqa"], ["en", "sw"], data_dir)
    assert expand_tasks(["mkqa"], ["en", "sw", "zh"], data_dir, skip_missing=True) == ["mkqa_en", "mkqa_zh"]
    loaded = load_model("tiny-llama")
    results = run_tasks(loaded.model, loaded.tokenizer, ["mkqa_en", "mkqa_zh"], data_dir)
    scores = {(s.task, s.metric): s for s in results.scores}
    assert set(scores) == {(t, m) for t in ("mkqa_en", "mkqa_zh") for m in ("exact_match", "f1")}
    for task, code in (("mkqa_en", "en"), ("mkqa_zh", "zh_cn")):
        items = results.items[task]
        assert items.height == 3 and set(items["lang"]) == {task[-2:]}
        recomputed = [
            mkqa.scores(row["response"].strip(), row["answers"], code) for row in items.iter_rows(named=True)
        ]
        assert [r["f1"] for r in recomputed] == pytest.approx(items["f1"].to_list())
        assert scores[task, "f1"].value == pytest.approx(sum(r["f1"] for r in recomputed) / 3)
        assert scores[task, "f1"].ci_low is None and scores[task, "exact_match"].ci_low is not None
        assert all(not math.isnan(v) for v in items["exact_match"].to_list())
    assert sorted(results.items["mkqa_en"]["answers"][0]) == ["Paris"]
    assert sorted(results.items["mkqa_en"]["answers"][1]) == ["Shakespeare", "William Shakespeare"]
    assert results.items["mkqa_en"]["answers"][2].to_list() == [""]  # unanswerable: expects no answer
