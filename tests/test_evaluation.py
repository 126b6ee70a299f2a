from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from cps import tracking
from cps.data import get_corpus
from cps.data.calibration import CalibrationConfig
from cps.errors import CpsError
from cps.evaluation.perplexity import perplexity, score_chunks
from cps.evaluation.tasks import _flores_next_items, _sib_items, _xcopa_items, expand_tasks, run_tasks
from cps.models import load_model
from cps.pruning.masks import SparsityTarget
from cps.stages.evaluate import EvalConfig, run_eval
from cps.stages.prune import PruneConfig, run_prune


def test_perplexity_equals_a_plain_labels_loop():
    loaded = load_model("tiny-llama")
    documents = get_corpus("flores").documents("sw")[:12]
    result = perplexity(loaded.model, loaded.tokenizer, documents, seqlen=64)
    # the same stream built by hand, scored chunk by chunk with model(input_ids, labels=...)
    separator = loaded.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for index, document in enumerate(documents):
        stream += loaded.tokenizer(document.text, add_special_tokens=False)["input_ids"]
        stream += separator if index < len(documents) - 1 else []
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), 63):
            context = [loaded.tokenizer.bos_token_id] if start == 0 else [stream[start - 1]]
            ids = torch.tensor([context + stream[start : start + 63]])
            total += loaded.model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert result.tokens == count == len(stream)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-4)
    text_bytes = len("\n\n".join(d.text for d in documents).encode())
    assert result.bpb == pytest.approx(total / math.log(2) / text_bytes, rel=1e-4)


def test_every_stream_token_is_predicted_once():
    stream = torch.arange(10, 30)
    chunks = score_chunks(stream, seqlen=6, start_token=1)
    assert torch.equal(torch.cat([c[1:] for c in chunks]), stream)
    assert all(len(c) <= 6 for c in chunks) and chunks[0][0] == 1
    without = score_chunks(stream, seqlen=6, start_token=None)
    assert torch.equal(torch.cat([c[1:] for c in without]), stream[1:])  # only the first is lost
    with pytest.raises(CpsError):
        score_chunks(stream, seqlen=1, start_token=1)


def _lm_eval_xcopa_utils():
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "xcopa" / "utils.py"
    spec = importlib.util.spec_from_file_location("xcopa_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xcopa_prompts_match_lm_evals_own_tasks(corpora):
    utils = _lm_eval_xcopa_utils()
    for lang in get_corpus("xcopa").languages():
        raw = get_corpus("xcopa").items(lang, "test")
        built = _xcopa_items(lang, None)["test"]
        assert len(built) == len(raw) == 500
        reference_text = getattr(utils, f"doc_to_text_{lang}")
        for item, doc in zip(built[:50], raw[:50], strict=True):
            assert item["text"] == reference_text(doc)
            assert item["choices"] == utils.doc_to_choice(doc)
            assert item["label"] == doc["label"]


def test_sib_and_flores_next_items_use_only_evaluation_rows():
    sib = _sib_items("sw", None)["test"]
    assert len(sib) == 303 and {item["label"] for item in sib} == set(range(7))
    train = {row.text for row in get_corpus("flores").rows("sw", ("train",))}
    assert not train & {item["text"] for item in sib}
    english, swahili = _flores_next_items("en", None)["test"], _flores_next_items("sw", None)["test"]
    assert len(english) == len(swahili) == 70  # consecutive dev+test pairs in FLORES
    assert [i["label"] for i in english] == [i["label"] for i in swahili]  # parallel items
    rows = {row.text: row.flores_id for row in get_corpus("flores").rows("en")}
    for item in english:
        assert len(set(item["choices"])) == 4
        assert rows[item["choices"][item["label"]]] == rows[item["context"]] + 1
        assert not train & {item["context"], *item["choices"]}
    assert _flores_next_items("en", None) == {"test": english}  # deterministic


def test_each_task_family_runs_through_lm_eval():
    loaded = load_model("tiny-llama")
    names = expand_tasks(["sib", "flores_next", "xcopa"], ["sw", "en"], None)
    assert names == ["sib_sw", "sib_en", "flores_next_sw", "flores_next_en", "xcopa_sw"]
    scores = run_tasks(loaded.model, loaded.tokenizer, ["sib_sw", "flores_next_en", "xcopa_sw"], limit=4)
    found = {(s.task, s.metric) for s in scores}
    assert found == {
        ("sib_sw", "acc"),
        ("sib_sw", "acc_norm"),
        ("flores_next_en", "acc"),
        ("flores_next_en", "acc_norm"),
        ("flores_next_en", "acc_mutual_info"),
        ("xcopa_sw", "acc"),
    }
    assert all(0 <= s.value <= 1 and s.samples == 4 for s in scores)


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_continuation_only_head_scores_like_lm_evals_hflm(name, monkeypatch):
    """Same loglikelihoods and greedy flags as HFLM, over batches mixing lengths, shared inputs
    (the same tokens split differently into context and continuation) and a trailing 0 token."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from cps.evaluation.lm import ContinuationLM

    loaded = load_model(name)
    contexts = ["The capital of France is", "Habari ya asubuhi, leo", "今天的天气", "A"]
    continuations = [" Paris", " Paris is big and old", " x", "ni siku nzuri sana kwa", "很好"]
    pairs = [(c, k) for c in contexts for k in continuations] + [("The capital", " of France is Paris")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores, full_head_calls = {}, []
    full_head = HFLM._model_call
    monkeypatch.setattr(
        HFLM, "_model_call", lambda self, *a, **k: full_head_calls.append(1) or full_head(self, *a, **k)
    )
    for kind in (HFLM, ContinuationLM):
        full_head_calls.clear()
        lm = kind(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4)
        scores[kind] = lm.loglikelihood(requests, disable_tqdm=True)
        tokens = [([5, 7, 0], [0]), ([5, 7], [0, 0]), ([9], [3, 4])]  # right padding is 0 too
        scores[kind, "tokens"] = lm._loglikelihood_tokens([(("", ""), c, k) for c, k in tokens])
        assert (len(full_head_calls) > 0) == (kind is HFLM)  # the fast path served every batch
    for fast, reference in (
        (scores[ContinuationLM], scores[HFLM]),
        (scores[ContinuationLM, "tokens"], scores[HFLM, "tokens"]),
    ):
        assert [flag for _, flag in fast] == [flag for _, flag in reference]
        assert [value for value, _ in fast] == pytest.approx([value for value, _ in reference], abs=1e-4)


def test_unknown_tasks_and_missing_language_data():
    loaded = load_model("tiny-llama")
    with pytest.raises(CpsError, match="unknown task 'no_such_task'"):
        run_tasks(loaded.model, loaded.tokenizer, ["no_such_task"])
    with pytest.raises(CpsError, match="no xcopa data for language 'en'"):
        run_tasks(loaded.model, loaded.tokenizer, ["xcopa_en"])


def test_gemma3_270m_is_above_chance_on_next_sentence(gemma):
    scores = {s.metric: s for s in run_tasks(gemma.model, gemma.tokenizer, ["flores_next_en"], limit=40)}
    assert scores["acc"].samples == 40
    # chance is 0.25; scored against each candidate's unconditional likelihood (PMI) the model
    # picks the true next sentence most of the time (0.8 measured), length-normalized often
    assert scores["acc_mutual_info"].value > 0.5, scores
    assert scores["acc_norm"].value > 0.4, scores


def test_metrics_land_in_the_evaluated_run(store):
    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)
    pruned = run_prune(PruneConfig(calibration, "wanda"), store)
    other = run_prune(PruneConfig(calibration, "magnitude"), store)
    result = run_eval(
        EvalConfig(run_id=pruned.run_id, langs=("sw", "zh"), tasks=("sib",), limit=3, seqlen=128), store
    )
    record = tracking.get_run(store, pruned.run_id)
    assert record.status == "FINISHED"
    for key in ("ppl.sw", "bpb.sw", "ppl.zh", "bpb.zh", "acc.sib_sw", "acc_norm.sib_zh", "acc_stderr.sib_sw"):
        assert key in record.metrics and record.metrics[key] == pytest.approx(result.metrics[key])
    assert not any(k.startswith("ppl.") for k in tracking.get_run(store, other.run_id).metrics)
    # the model evaluated is the pruned one: the dense model has a different perplexity
    dense = run_eval(EvalConfig(model="tiny-llama", langs=("sw",), seqlen=128), store)
    assert dense.metrics["ppl.sw"] != pytest.approx(result.metrics["ppl.sw"])
    again = run_eval(EvalConfig(model="tiny-llama", langs=("sw",), seqlen=128), store)
    assert again.run_id == dense.run_id  # the dense run is reused, not duplicated
    assert len(tracking.find_runs(store, "prune", {"method": "dense"})) == 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_rebuilt_models_evaluate_like_saved_ones(method, store):
    calibration = CalibrationConfig("tiny-qwen2", "sw", nsamples=4, seqlen=32)
    saved = run_prune(PruneConfig(calibration, method, SparsityTarget.parse("2:4", None)), store)
    unsaved = run_prune(
        PruneConfig(calibration, method, SparsityTarget.parse("2:4", None), save_model=False), store
    )
    config = {"langs": ("en",), "seqlen": 96}
    from_artifact = run_eval(EvalConfig(run_id=saved.run_id, **config), store)
    rebuilt = run_eval(EvalConfig(run_id=unsaved.run_id, **config), store)
    assert rebuilt.metrics["ppl.en"] == pytest.approx(from_artifact.metrics["ppl.en"], rel=1e-6)


def test_eval_errors(store):
    with pytest.raises(CpsError, match="no run 'feedface'"):
        run_eval(EvalConfig(run_id="feedface"), store)
    with pytest.raises(CpsError, match="not both"):
        EvalConfig(run_id="x", model="tiny-llama")
    with pytest.raises(CpsError, match="no 'et' data"):
        run_eval(EvalConfig(model="tiny-llama", langs=("et",)), store)
    with tracking.start_run(store, "calibrate", {}) as calibrate:
        pass
    with pytest.raises(CpsError, match="a calibrate run"):
        run_eval(EvalConfig(run_id=calibrate.run_id), store)
    with pytest.raises(CpsError, match="unknown task"):
        run_eval(EvalConfig(model="tiny-llama", tasks=("nonsense_task",)), store)
