"""`cps eval`'s held-out protocol end to end: per-item results that recompute every logged number,
the held-out SNR against an independent recomputation, and the bounded cache of dense states."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import polars as pl
import pytest
import torch

from cps import tracking
from cps.config import CalibrationConfig, EvalConfig, PruneConfig
from cps.data import get_corpus
from cps.data.calibration import tokenizer_fingerprint
from cps.evaluation import hidden
from cps.evaluation.windows import cached_windows, held_out_windows, prefix_label
from cps.models import LoadOptions, decoder_layers, load_model
from cps.runs import load_run_model
from cps.stages import evaluate
from cps.stages.evaluate import run_eval
from cps.stages.prune import run_prune


def _items(store, run_id: str, folder: Path) -> dict[str, pl.DataFrame]:
    path = tracking.download_artifact(store, run_id, "items", folder)
    return {p.stem: pl.read_parquet(p) for p in sorted(path.glob("*.parquet"))}


def _first_max(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def test_per_item_results_recompute_every_logged_number(store, tmp_path):
    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)
    pruned = run_prune(PruneConfig("tiny-llama", "wanda", calibration, save_model=False), store)
    config = EvalConfig(langs=("sw", "zh"), tasks=("sib", "flores_next"), limit=5, seqlen=64, max_docs=8)
    run_eval(config, store, pruned.run_id)
    record = tracking.get_run(store, pruned.run_id)
    items = _items(store, pruned.run_id, tmp_path)
    assert set(items) == {"ppl_sw", "ppl_zh", "sib_sw", "sib_zh", "flores_next_sw", "flores_next_zh"}
    for lang in ("sw", "zh"):
        documents = items[f"ppl_{lang}"]
        assert documents.height == 8 and documents["document"].n_unique() == 8
        nll, tokens = math.fsum(documents["nll"].to_list()), documents["tokens"].sum()
        assert record.metrics[f"ppl.{lang}"] == pytest.approx(math.exp(nll / tokens), rel=1e-12)
        assert record.metrics[f"bpb.{lang}"] == pytest.approx(
            nll / math.log(2) / documents["bytes"].sum(), rel=1e-12
        )
        assert record.metrics[f"eval_tokens.{lang}"] == tokens
    for task in ("sib_sw", "sib_zh", "flores_next_sw", "flores_next_zh"):
        frame = items[task]
        assert frame.height == 5 and frame["item"].to_list() == sorted(frame["item"].to_list())
        rows = list(frame.iter_rows(named=True))
        chosen = {
            "acc": [_first_max(r["loglik"]) for r in rows],
            "acc_norm": [
                _first_max([ll / len(c) for ll, c in zip(r["loglik"], r["choices"], strict=True)])
                for r in rows
            ],
        }
        if task.startswith("flores_next"):
            chosen["acc_mutual_info"] = [
                _first_max([c - u for c, u in zip(r["loglik"], r["loglik_unconditional"], strict=True)])
                for r in rows
            ]
        assert chosen["acc"] == frame["chosen"].to_list()
        for metric, picks in chosen.items():
            correct = sum(pick == r["target"] for pick, r in zip(picks, rows, strict=True))
            assert record.metrics[f"{metric}.{task}"] == pytest.approx(correct / 5, rel=1e-12)
            low, high = record.metrics[f"{metric}_ci_low.{task}"], record.metrics[f"{metric}_ci_high.{task}"]
            assert low <= correct / 5 <= high
    protocol = json.loads(record.tags["cps.eval.protocol"])
    assert protocol == {"version": 2, "unit": "document", "prefix": "none", "seqlen": 64, "stride": 32}


def _layer_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output for one window, by a hook of the test's own."""
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in decoder_layers(model)
    ]
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return [output[0] for output in outputs]


def test_held_out_snr_equals_a_recomputation_window_by_window(store):
    calibration = CalibrationConfig("tiny-qwen2", "sw", nsamples=4, seqlen=32)
    pruned = run_prune(PruneConfig("tiny-qwen2", "sparsegpt", calibration, pattern="2:4"), store)
    result = run_eval(EvalConfig(langs=("en",), seqlen=48, max_docs=5), store, pruned.run_id)
    dense = load_model("tiny-qwen2")
    model = load_run_model(store, tracking.get_run(store, pruned.run_id), LoadOptions()).model
    text = held_out_windows(get_corpus("flores").documents("en")[:5], dense.tokenizer, 48)
    layers = len(decoder_layers(dense.model))
    signal, noise = torch.zeros(layers, dtype=torch.float64), torch.zeros(layers, dtype=torch.float64)
    for window in text.windows:  # one window at a time, no padding, scored positions only
        ref, mine = _layer_outputs(dense.model, window.input_ids), _layer_outputs(model, window.input_ids)
        for layer in range(layers):
            a, b = ref[layer][-window.scored :].double(), mine[layer][-window.scored :].double()
            signal[layer] += (a**2).sum()
            noise[layer] += ((b - a) ** 2).sum()
    expected = (10 * torch.log10(signal / noise)).tolist()
    history = tracking.client(store).get_metric_history(pruned.run_id, "snr_db.en.layer")
    logged = [point.value for point in sorted(history, key=lambda p: p.step)]
    assert logged == pytest.approx(expected, abs=1e-4)
    assert result.metrics["snr_db.en"] == pytest.approx(sum(expected) / layers, abs=1e-4)
    assert result.metrics["snr_positions.en"] == sum(w.scored for w in text.windows)


def test_dense_states_are_computed_once_then_read_from_the_cache(store, monkeypatch):
    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)
    runs = [
        run_prune(PruneConfig("tiny-llama", m, calibration), store).run_id for m in ("wanda", "magnitude")
    ]
    loads: list[str] = []
    real_load = evaluate.load
    monkeypatch.setattr(
        evaluate, "load", lambda name, *a, **k: loads.append(name) or real_load(name, *a, **k)
    )
    langs = {"langs": ("sw", "zh", "de"), "seqlen": 64, "max_docs": 3}
    cache = Path(os.environ["CPS_CACHE_DIR"]) / "hidden"
    before = set(cache.glob("*.safetensors")) if cache.is_dir() else set()
    first = run_eval(EvalConfig(**langs), store, runs[0])
    assert loads == ["tiny-llama"]  # the dense model, once for all three languages
    assert len(set(cache.glob("*.safetensors")) - before) == 3
    second = run_eval(EvalConfig(**langs), store, runs[1])
    assert loads == ["tiny-llama"]  # cache hits: not loaded again
    assert second.metrics["snr_db.sw"] != pytest.approx(first.metrics["snr_db.sw"])
    again = run_eval(EvalConfig(**langs), store, runs[0])
    assert again.metrics["snr_db.zh"] == first.metrics["snr_db.zh"]  # the cached states are exact
    # the dense model's own evaluation records its states in the same pass it scores perplexity
    dense = run_eval(EvalConfig(langs=("en",), seqlen=64, max_docs=3), store, model="tiny-llama")
    assert not any(name.startswith("snr_db") for name in dense.metrics)
    loads.clear()
    run_eval(EvalConfig(langs=("en",), seqlen=64, max_docs=3), store, runs[0])
    assert loads == []


def test_the_cache_is_bounded(monkeypatch, tiny_tokenizer, tmp_path):
    monkeypatch.setenv("CPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CPS_HIDDEN_CACHE_GB", str(8 * 40_000 / 2**30))  # an entry may take 40 kB
    text = held_out_windows(get_corpus("flores").documents("en")[:6], tiny_tokenizer, 64)
    sample = hidden.sampling_for(text, layers=2, width=64, element_bytes=4)
    total = sum(w.scored for w in text.windows)
    assert sample.every == math.ceil(total * 2 * 64 * 4 / 40_000) > 1
    assert sample.size == len(range(0, total, sample.every))
    keys = [hidden.ReferenceKey("m", "float32", "cpu", f"text{i}", 1) for i in range(12)]
    for index, key in enumerate(keys):
        hidden.save_reference(key, torch.zeros(2, 75, 64))  # ~38 kB each
        os.utime(key.path, (index, index))  # strictly increasing use times
    kept = [key for key in keys if key.path.is_file()]
    assert kept == keys[-8:]  # 8 x 38 kB fit in 320 kB: the least recently used went first
    assert hidden.load_reference(keys[0]) is None
    keys[-1].path.write_bytes(b"truncated")  # an unreadable entry is dropped and recomputed
    assert hidden.load_reference(keys[-1]) is None and not keys[-1].path.exists()


def test_cached_windows_are_the_computed_ones_and_a_hit_needs_no_tokenizer(tiny_tokenizer):
    corpus = get_corpus("flores", None)
    fresh = held_out_windows(corpus.documents("zh")[:4], tiny_tokenizer, 32, 16)
    first, label = cached_windows(corpus, "zh", 4, tiny_tokenizer, 32, 16)

    def refuse():
        raise AssertionError("the tokenizer was loaded")

    fingerprint = tokenizer_fingerprint(tiny_tokenizer)
    second, again = cached_windows(corpus, "zh", 4, refuse, 32, 16, fingerprint)
    assert label == again == prefix_label(tiny_tokenizer)
    for text in (first, second):
        assert text.fingerprint() == fresh.fingerprint()
        assert (text.tokens, text.bytes, text.prefix) == (fresh.tokens, fresh.bytes, fresh.prefix)
        assert text.stride == fresh.stride == 16
        assert [d.id for d in text.documents] == [d.id for d in fresh.documents]
    # another stride or document count is another entry
    other, _ = cached_windows(corpus, "zh", 3, tiny_tokenizer, 32, 8)
    assert other.stride == 8 and len(other.documents) == 3
    # an unreadable entry is rebuilt (one warning), not fatal
    for path in (Path(os.environ["CPS_CACHE_DIR"]) / "windows").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:40])
    rebuilt, _ = cached_windows(corpus, "zh", 4, lambda: tiny_tokenizer, 32, 16, fingerprint)
    assert rebuilt.fingerprint() == fresh.fingerprint()
