"""Layer streaming: the same masks, perplexities and hidden states as the in-memory path, bit for
bit, on every architecture (tiny models saved as shards) and on Gemma-3 270M."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import resident_bytes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cps import streaming, tracking
from cps.config import CalibrationConfig, EvalConfig, PruneConfig
from cps.data import get_corpus
from cps.data.calibration import build_calibration
from cps.errors import CpsError
from cps.evaluation.activations import activation_statistics
from cps.evaluation.hidden import PositionSample, StateRecorder
from cps.evaluation.perplexity import score_text
from cps.evaluation.windows import held_out_windows
from cps.models import LoadOptions, load_model, load_tokenizer, resolve_model, weights_folder
from cps.pruning.base import get_method
from cps.pruning.engine import EngineConfig, prune_model
from cps.pruning.masks import SparsityTarget, load_masks
from cps.stages import calibrate
from cps.stages.evaluate import run_eval
from cps.stages.prune import run_prune
from cps.streaming import WeightReader, open_streamed

ARCHITECTURES = ["tiny-llama", "tiny-gemma3", "tiny-cohere", "tiny-qwen2"]


def _streamed(name: str, offload: bool = False):
    source = open_streamed(weights_folder(resolve_model(name)), torch.float32, "cpu")
    source.offload = offload
    return source


def _inputs(name: str, seqlen: int = 48):
    tokenizer = load_tokenizer(name)
    ids = build_calibration(CalibrationConfig(name, "sw", nsamples=6, seqlen=seqlen), tokenizer).input_ids
    documents = get_corpus("flores", None).documents("zh")[:5]
    return ids, held_out_windows(documents, tokenizer, 32, 16)  # long documents: several windows


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_streamed_pruning_and_scoring_equal_the_in_memory_path(name):
    ids, text = _inputs(name)
    engine = EngineConfig(batch_tokens=2 * 48)  # three batches
    for method in ("wanda", "sparsegpt"):
        memory = prune_model(load_model(name).model, ids, get_method(method), SparsityTarget(0.5), engine)
        source = _streamed(name, offload=method == "sparsegpt")
        streamed = prune_model(source.model, ids, get_method(method), SparsityTarget(0.5), engine)
        assert memory.masks.keys() == streamed.masks.keys()
        assert all(torch.equal(memory.masks[k], streamed.masks[k]) for k in memory.masks), method
        assert [s.error for s in memory.stats] == [s.error for s in streamed.stats]
        assert all(p.device.type == "meta" for layer in source.model.model.layers for p in layer.parameters())
    dense = load_model(name).model
    in_memory, from_shards = score_text(dense, text), score_text(_streamed(name).model, text)
    assert in_memory.nll == from_shards.nll and in_memory.ppl == from_shards.ppl
    sample = PositionSample.of(text)
    recorders = [StateRecorder(sample, len(dense.model.layers)) for _ in range(2)]
    score_text(dense, text, recorders[0])
    score_text(_streamed(name, offload=True).model, text, recorders[1])
    assert torch.equal(recorders[0].states, recorders[1].states)
    counts = [activation_statistics(model, text)[0] for model in (dense, _streamed(name).model)]
    assert counts[0].tokens == counts[1].tokens == sample.total
    assert torch.equal(counts[0].active, counts[1].active) and torch.equal(
        counts[0].hidden_sum, counts[1].hidden_sum
    )


def test_reader_rows_and_gathered_rows_are_the_stored_tensor(tmp_path):
    folder = weights_folder(resolve_model("tiny-llama"))
    stored = load_file(str(next(folder.glob("*.safetensors"))))
    reader = WeightReader(folder)
    name = "model.embed_tokens.weight"
    assert torch.equal(reader.read(name), stored[name])
    assert torch.equal(reader.rows(name, 100, 164), stored[name][100:164])
    ids = torch.tensor([3, 4, 5, 9, 200, 201, 49151])
    assert torch.equal(reader.gather_rows(name, ids), stored[name][ids])


def _no_tokenizer(*args, **kwargs):
    raise AssertionError("the tokenizer was loaded")


def test_streamed_prune_run_writes_a_loadable_model_and_evaluates_the_same(store, tmp_path, monkeypatch):
    calibration = CalibrationConfig("tiny-gemma3", "sw", nsamples=4, seqlen=40)
    streamed = run_prune(PruneConfig("tiny-gemma3", "sparsegpt", calibration, stream=True), store)
    memory = run_prune(PruneConfig("tiny-gemma3", "sparsegpt", calibration), store, keep_model=True)
    record = tracking.get_run(store, streamed.run_id)
    assert record.tags["cps.streamed"] == "True"
    assert streamed.metrics["calib_error.total"] == memory.metrics["calib_error.total"]
    masks = [
        load_masks(str(tracking.download_artifact(store, r.run_id, "masks.safetensors", tmp_path / r.run_id)))
        for r in (streamed, memory)
    ]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[1])
    saved = AutoModelForCausalLM.from_pretrained(
        tracking.logged_model_folder(store, streamed.run_id, tmp_path)
    )
    ids = streamed.calib.input_ids
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, memory.model.model(ids).logits)
    config = EvalConfig(langs=("sw", "zh"), seqlen=32, max_docs=3)
    results = [
        run_eval(config, store, streamed.run_id),  # the saved shards, streamed (auto: tiny in memory)
        run_eval(EvalConfig(**{**config.__dict__, "stream": True}), store, memory.run_id),  # re-pruned
        run_eval(config, store, memory.run_id),
    ]
    for name in ("ppl.sw", "ppl.zh", "snr_db.zh", "bpb.sw"):
        assert results[0].metrics[name] == results[1].metrics[name] == results[2].metrics[name], name
    # Windowed before by the same tokenizer: a streamed evaluation never loads it again.
    monkeypatch.setattr(streaming, "load_tokenizer", _no_tokenizer)
    monkeypatch.setattr(calibrate, "load_tokenizer", _no_tokenizer)
    again = run_eval(EvalConfig(**{**config.__dict__, "stream": True}), store, memory.run_id)
    assert all(again.metrics[name] == results[2].metrics[name] for name in results[2].metrics)
    tasks = EvalConfig(langs=("sw",), tasks=("xcopa",), seqlen=32, max_docs=1, stream=True)
    with pytest.raises(CpsError, match="zero-shot tasks run the whole model"):
        run_eval(tasks, store, memory.run_id)  # refused before the model is rebuilt


def test_stream_turns_itself_on_when_the_model_would_not_fit(monkeypatch, caplog):
    class Tight:
        available = 1000  # bytes free

    monkeypatch.setattr(streaming.psutil, "virtual_memory", lambda: Tight)
    with caplog.at_level(logging.WARNING):
        assert streaming.wants_stream("gemma3-270m", LoadOptions())
    (line,) = [r.getMessage() for r in caplog.records if "streaming" in r.getMessage()]
    assert "gemma3-270m" in line and "--no-stream" in line
    assert not streaming.wants_stream("gemma3-270m", LoadOptions(stream=False))
    assert not streaming.wants_stream("tiny-llama", LoadOptions())


@pytest.mark.slow  # ~50 s: the tiny models check the same equality by default (`make test-all`, CI)
def test_gemma3_270m_streamed_equals_in_memory(gemma):
    ids = build_calibration(
        CalibrationConfig("gemma3-270m", "sw", nsamples=2, seqlen=64), gemma.tokenizer
    ).input_ids
    documents = get_corpus("flores", None).documents("sw")[:3]
    text = held_out_windows(documents, gemma.tokenizer, 64)
    memory = load_model("gemma3-270m")
    source = open_streamed(weights_folder(resolve_model("gemma3-270m")), torch.float32, "cpu")
    expected = score_text(memory.model, text)
    assert score_text(source.model, text).nll == expected.nll
    engine = EngineConfig()
    masks = [
        prune_model(model, ids, get_method("wanda"), SparsityTarget(0.5), engine).masks
        for model in (memory.model, source.model)
    ]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_weights_kept_by_a_streamed_prune_load_like_the_in_memory_ones(store):
    """A sweep keeps SparseGPT's weights for its analyses: from a streamed prune too, in the same
    file layout, read back in memory and streamed."""
    from cps import runs

    calibration = CalibrationConfig("tiny-qwen2", "sw", nsamples=4, seqlen=40)
    config = PruneConfig("tiny-qwen2", "sparsegpt", calibration, save_model=False)
    memory = run_prune(config, store, keep_model=True)
    kept: list = []
    streamed = run_prune(
        PruneConfig(**{**config.__dict__, "stream": True}),
        store,
        then=lambda run_id, loaded: kept.append(runs.keep_weights(run_id, loaded.model)),
    )
    assert kept[0].is_file()
    record = tracking.get_run(store, streamed.run_id)
    in_memory = runs.load_run_model(store, record, LoadOptions())
    for name, weight in memory.model.model.state_dict().items():
        assert torch.equal(in_memory.model.state_dict()[name], weight), name
    _, text = _inputs("tiny-qwen2")
    from_kept = runs.load_run_model(store, record, LoadOptions(stream=True))
    assert score_text(from_kept.model, text).nll == score_text(memory.model.model, text).nll
    runs.drop_kept_weights([streamed.run_id])


def test_capture_and_evaluation_hand_back_the_pages_around_the_embedding_rows_they_read(tmp_path):
    """The kernel maps whole neighbourhoods of a checkpoint around each embedding row a batch reads
    (Gemma-3: ~0.45 GB of its 0.67 GB embedding for 16k Swahili tokens). Once the layer inputs are
    captured they are handed back, and an evaluated model hands them back after each lookup; the
    states, and a pruning from them, are those of the same model in ordinary memory."""
    from pathlib import Path

    from cps.evaluation.perplexity import checked_head
    from cps.pruning.engine import calibration_batches
    from cps.streaming import capture_layer_calls

    if not Path("/proc/self/pagemap").exists():
        pytest.skip("no /proc/self/pagemap (not Linux): nothing is handed back here")
    load_model("tiny-llama").model.save_pretrained(tmp_path)
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    copied = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for parameter in copied.parameters():  # anonymous memory: nothing to hand back
        parameter.data = parameter.data.clone()
    embedding = mapped.get_input_embeddings().weight
    size = embedding.numel() * embedding.element_size()
    ids, _ = _inputs("tiny-llama")
    with torch.inference_mode():
        mapped.get_input_embeddings()(ids)
        assert resident_bytes(embedding) > 0.5 * size  # what reading the rows leaves mapped
        calls = capture_layer_calls(mapped, calibration_batches(ids, 96), "cpu")
        assert resident_bytes(embedding) < 0.05 * size
        plain = capture_layer_calls(copied, calibration_batches(ids, 96), "cpu")
    assert len(calls.hidden) == len(plain.hidden) > 1
    assert all(torch.equal(calls.hidden[i], plain.hidden[i]) for i in range(len(calls.hidden)))
    # an evaluated model hands them back after every lookup (the decoder passes before the head's)
    assert checked_head(mapped, ids[:1]) is not None
    with torch.inference_mode():
        states = mapped.base_model(input_ids=ids, use_cache=False).last_hidden_state
        assert resident_bytes(embedding) < 0.05 * size
        assert torch.equal(states, copied.base_model(input_ids=ids, use_cache=False).last_hidden_state)
    target = SparsityTarget(0.5)
    engine = EngineConfig(batch_tokens=96)
    masks = [prune_model(m, ids, get_method("wanda"), target, engine).masks for m in (mapped, copied)]
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])
