"""MKQA: MKQA's answer scoring against hand-computed values, the reader on files in the official
format (local, gzipped, downloaded), and the pack task end to end on a fixture file."""

from __future__ import annotations

import gzip
import io
import json
import math
import urllib.error
import urllib.request

import pytest

from cps.data import get_corpus
from cps.data import mkqa as mkqa_data
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


# Three records as the official mkqa.jsonl.gz has them (github.com/apple/ml-mkqa, its
# tests/testdata): `query`, `queries` and `answers` per language, an integer `example_id`,
# `entity` and `aliases` only on some answers, `text: null` for long and unanswerable answers.
OFFICIAL_RECORDS = [
    {
        "query": "who directed gladiator",
        "queries": {
            "en": "who directed gladiator",
            "zh_cn": "角斗士的导演是谁",
            "de": "Wer war Regisseur von Gladiator",
        },
        "answers": {
            "en": [
                {
                    "type": "entity",
                    "entity": "Q56005",
                    "text": "Ridley Scott",
                    "aliases": ["Sir Ridley Scott"],
                }
            ],
            "zh_cn": [{"type": "entity", "text": "雷德利·斯科特", "entity": "Q56005"}],
            "de": [{"type": "entity", "entity": "Q56005", "text": "Ridley Scott", "aliases": []}],
        },
        "example_id": 7631360939705650347,
    },
    {
        "query": "where can i go with a uk visa",
        "queries": {
            "en": "where can i go with a uk visa",
            "zh_cn": "如果我有英国签证我可以去哪里？",
            "de": "Wohin mit UK-Visum",
        },
        "answers": {lang: [{"type": "long_answer", "text": None}] for lang in ("en", "zh_cn", "de")},
        "example_id": -7449157003522518870,
    },
    {
        "query": "when did help me help you come out",
        "queries": {
            "en": "when did help me help you come out",
            "zh_cn": "help me help you 是何时上映的",
            "de": "Wann kam Help Me Help You heraus",
        },
        "answers": {
            lang: [
                {"type": "date", "text": "2017", "aliases": ["2017"]},
                {"type": "date", "text": "2017-05-18", "aliases": ["18 May 2017"]},
            ]
            for lang in ("en", "zh_cn", "de")
        },
        "example_id": 36228854473990432,
    },
]


def _official_gz() -> bytes:
    return gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in OFFICIAL_RECORDS).encode())


def _check_items(corpus) -> None:
    zh = corpus.items("zh")  # cps's zh is MKQA's zh_cn
    assert [item["question"] for item in zh] == [r["queries"]["zh_cn"] for r in OFFICIAL_RECORDS]
    assert [item["example_id"] for item in zh] == [
        "7631360939705650347",
        "-7449157003522518870",
        "36228854473990432",
    ]
    assert [item["answers"] for item in zh] == [
        ["雷德利·斯科特"],
        [""],
        ["18 May 2017", "2017", "2017-05-18"],
    ]
    en = corpus.items("en")
    assert en[0] == {
        "example_id": "7631360939705650347",
        "question": "who directed gladiator",
        "answers": ["Ridley Scott", "Sir Ridley Scott"],
    }
    assert [item["question"] for item in corpus.items("de")][1] == "Wohin mit UK-Visum"


def test_mkqa_reads_the_official_gzipped_file_from_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    (tmp_path / "mkqa").mkdir()
    (tmp_path / "mkqa" / "mkqa.jsonl.gz").write_bytes(_official_gz())
    corpus = get_corpus("mkqa", tmp_path)
    assert corpus.files("en") == [tmp_path / "mkqa" / "mkqa.jsonl.gz"]
    _check_items(corpus)
    # a plain mkqa.jsonl comes first
    (tmp_path / "mkqa" / "mkqa.jsonl").write_text(json.dumps(OFFICIAL_RECORDS[0]), encoding="utf-8")
    assert [item["question"] for item in get_corpus("mkqa", tmp_path).items("en")] == [
        "who directed gladiator"
    ]


def test_mkqa_without_a_file_downloads_the_official_release_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CPS_CACHE_DIR", str(tmp_path / "cache"))
    asked: list[str] = []

    def urlopen(url, timeout):
        asked.append(url)
        return io.BytesIO(_official_gz())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    (tmp_path / "data").mkdir()
    _check_items(get_corpus("mkqa", tmp_path / "data"))
    assert asked == ["https://github.com/apple/ml-mkqa/raw/main/dataset/mkqa.jsonl.gz"]
    assert [p.name for p in (tmp_path / "cache" / "mkqa").iterdir()] == ["mkqa.jsonl.gz"]  # no partial left
    _check_items(get_corpus("mkqa", tmp_path / "data"))  # a new reader: from the cache
    assert len(asked) == 1


def _no_network(url, timeout):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize(
    ("urlopen", "reason"),
    [
        (_no_network, "name resolution"),
        (lambda url, timeout: io.BytesIO(_official_gz()[:-40]), "end-of-stream"),  # cut short
    ],
    ids=["offline", "cut-short"],
)
def test_mkqa_unreachable_or_broken_download_is_one_line_and_not_cached(
    tmp_path, monkeypatch, urlopen, reason
):
    monkeypatch.setenv("CPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(
        CpsError, match=rf"no mkqa/mkqa.jsonl.*official release .* unreachable .*{reason}"
    ) as caught:
        get_corpus("mkqa", tmp_path).items("en")
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "cache" / "mkqa").iterdir())
    assert mkqa_data.OFFICIAL_URL in str(caught.value)
