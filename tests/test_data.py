from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest

from cps.data import get_corpus, mc4
from cps.data.inventory import inventory
from cps.errors import CpsError
from cps.paths import data_dir


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    flag, env, default = tmp_path / "flag", tmp_path / "env", tmp_path / "data"
    for folder in (flag, env, default):
        folder.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CPS_DATA_DIR", str(env))
    assert data_dir(flag) == flag
    assert data_dir() == env
    monkeypatch.delenv("CPS_DATA_DIR")
    assert data_dir() == default
    default.rmdir()
    with pytest.raises(CpsError, match="does not exist"):
        data_dir()


def test_ntrex_keeps_documents_whole(corpora):
    corpus = get_corpus("ntrex")
    docs = corpus.documents("sw")
    ids = (corpora / "ntrex" / "documents.txt").read_text(encoding="utf-8").splitlines()
    assert len(docs) == len(set(ids)) == 123
    assert sum(d.text.count("\n") + 1 for d in docs) == len(ids) == 1997
    # the first document is exactly the first run of lines with the first id
    first_run = ids.count(ids[0])
    lines = (corpora / "ntrex" / "sw.txt").read_text(encoding="utf-8").splitlines()
    assert docs[0].id == ids[0]
    assert docs[0].text == "\n".join(lines[:first_run])


def test_flores_evaluation_split_never_holds_train_rows(corpora):
    with open(corpora / "flores" / "en.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    train_texts = {r["text"] for r in rows if r["sib_split"] == "train"}
    eval_texts = [r["text"] for r in rows if r["sib_split"] in ("dev", "test")]
    docs = get_corpus("flores").documents("en")
    sentences = [s for d in docs for s in d.text.split("\n")]
    assert sorted(sentences) == sorted(eval_texts)
    assert not train_texts & set(sentences)
    corpus = get_corpus("flores")
    assert {r.split for r in corpus.rows("en")} == {"train", "dev", "test"}
    assert len(corpus.rows("en", ("train",))) == len(train_texts)


def test_xcopa_items(corpora):
    corpus = get_corpus("xcopa")
    assert {"sw", "zh", "qu", "et"} <= set(corpus.languages())
    items = corpus.items("sw", "val")
    assert len(items) == 100
    assert items[0]["question"] in ("cause", "effect") and items[0]["label"] in (0, 1)
    with pytest.raises(CpsError, match="task items"):
        corpus.documents("sw")


def test_textdir_splits_documents_on_blank_lines(tmp_path):
    (tmp_path / "sw.txt").write_text("Habari.\nYa leo.\n\n\nKwaheri.\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a language", encoding="utf-8")
    corpus = get_corpus(f"textdir:{tmp_path}")
    assert corpus.languages() == ["sw"]
    assert [d.text for d in corpus.documents("sw")] == ["Habari.\nYa leo.", "Kwaheri."]
    with pytest.raises(CpsError, match="no 'en' data"):
        corpus.documents("en")


def test_unknown_corpus_and_bad_specs(tmp_path):
    with pytest.raises(CpsError, match="unknown corpus 'wiki'"):
        get_corpus("wiki")
    with pytest.raises(CpsError, match="needs a folder"):
        get_corpus("textdir:")
    with pytest.raises(CpsError, match="does not exist"):
        get_corpus(f"textdir:{tmp_path / 'missing'}")
    with pytest.raises(CpsError, match="not found"):
        get_corpus("ntrex", tmp_path)


def test_mc4_offline_gives_a_clear_message(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CpsError, match=r"mC4 .* needs network access.*--corpus ntrex"):
        get_corpus("mc4").documents("sw")


def _streamed_mc4(monkeypatch, texts: list[str]) -> tuple[list[tuple], list[int]]:
    """`datasets` replaced by a stub whose `load_dataset` streams records shaped as allenai/c4's
    ({"text", "timestamp", "url"}); returns the calls it got and how many records were pulled."""
    calls: list[tuple] = []
    pulled = [0]

    def stream():
        for number, text in enumerate(texts):
            pulled[0] += 1
            yield {"text": text, "timestamp": "2019-04-22T08:12:32Z", "url": f"https://example.org/{number}"}

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return stream()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(mc4, "probe_hub", lambda: None)
    return calls, pulled


def test_mc4_streams_documents_in_order_up_to_the_character_budget(monkeypatch):
    texts = ["Habari ya asubuhi.", "Leo ni siku nzuri.", "x" * 30, "Kwaheri.", "Tutaonana kesho."]
    calls, pulled = _streamed_mc4(monkeypatch, texts)
    docs = get_corpus("mc4").documents("sw", max_chars=40)
    # the train split of the language's config, streamed, with no loading script to trust
    assert calls == [(("allenai/c4", "sw"), {"split": "train", "streaming": True})]
    # whole documents in stream order; the one that reaches the budget is the last (18 + 18 + 30 >= 40)
    assert [d.text for d in docs] == texts[:3]
    assert [d.id for d in docs] == ["mc4.sw.0", "mc4.sw.1", "mc4.sw.2"]
    assert pulled == [3]  # nothing read past the budget
    assert [
        d.text for d in get_corpus("mc4").documents("zh", max_chars=10**6)
    ] == texts  # the stream ends first
    assert calls[-1][0] == ("allenai/c4", "zh")


def test_mc4_empty_stream_or_language_without_mc4(monkeypatch):
    _streamed_mc4(monkeypatch, [])
    with pytest.raises(CpsError, match="mC4 config 'sw' returned no documents"):
        get_corpus("mc4").documents("sw")
    with pytest.raises(CpsError, match="has no 'qu' data"):  # Quechua: not in mC4
        get_corpus("mc4").documents("qu")


def test_inventory_counts_everything_and_reports_broken_files(corpora, tmp_path):
    found = inventory(str(corpora))
    assert not found.problems
    assert found.sizes[("ntrex", "en")].documents == 123
    assert found.sizes[("flores", "en")].documents == 303  # dev 99 + test 204
    assert found.sizes[("xcopa", "sw")].documents == 600
    broken = tmp_path / "data"
    for name in ("ntrex", "flores", "xcopa"):
        (broken / name).mkdir(parents=True)
    (broken / "ntrex" / "en.txt").write_text("one\ntwo\n", encoding="utf-8")
    (broken / "ntrex" / "documents.txt").write_text("d1\n", encoding="utf-8")
    (broken / "flores" / "en.tsv").write_text("wrong\theader\n", encoding="utf-8")
    item = '{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 0}'
    (broken / "xcopa" / "val.sw.jsonl").write_text(item + "\n", encoding="utf-8")
    (broken / "xcopa" / "test.sw.jsonl").write_text("{not json\n", encoding="utf-8")
    problems = " | ".join(inventory(str(broken)).problems)
    assert "line-aligned" in problems and "expected columns" in problems and "not JSON" in problems


def test_corpus_fingerprint_follows_content(tmp_path):
    (tmp_path / "en.txt").write_text("one", encoding="utf-8")
    corpus = get_corpus(f"textdir:{tmp_path}")
    before = corpus.fingerprint("en")
    assert corpus.fingerprint("en") == before
    (tmp_path / "en.txt").write_text("two!", encoding="utf-8")
    assert corpus.fingerprint("en") != before


def test_corpora_are_not_in_the_repository():
    repo = Path(__file__).resolve().parent.parent
    tracked = [p for p in repo.rglob("*") if p.suffix in (".tsv", ".jsonl") and ".venv" not in p.parts]
    assert not tracked
