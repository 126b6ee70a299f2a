"""Every place cps writes weights, read back by the tools a user would use (plain
`AutoModelForCausalLM.from_pretrained`, `mlflow.transformers.load_model`, safetensors), and every
place it reads weights refusing those that do not fit (issue 23: saved models whose embedding was
written under `lm_head.weight$` and loaded back random)."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cps import runs, tracking
from cps.config import CalibrationConfig, EvalConfig, PruneConfig
from cps.errors import CpsError
from cps.models import (
    LoadOptions,
    check_saved,
    load_model,
    model_location,
    resolve_model,
    tiny_model_dir,
)
from cps.stages.evaluate import run_eval
from cps.stages.prune import run_prune
from cps.streaming import WeightReader, load, open_loaded, streamed

# The key mapping cps's loader passed before issue 23 for checkpoints storing tied embeddings under
# the head's name; transformers 5 remembers it and writes the embedding under the pattern's text.
OLD_KEY_MAPPING = {r"^lm_head\.weight$": "model.embed_tokens.weight"}


def plain(folder: Path) -> torch.nn.Module:
    """`from_pretrained` with nothing of cps: fp32, its loading info free of every key (a
    compressed-tensors folder of an asymmetric grid needs `dequantize=True`: `load_kwargs`)."""
    from cps.pruning.compressed import load_kwargs

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True, **load_kwargs(folder)
    )
    assert not any(info.values()), info
    return model.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def saved_run_loads_anywhere(
    store, tmp_path: Path, name: str, method: str, stream: bool, **settings: object
) -> str:
    """Prune `name` with `method` (streamed or in memory; `settings`: more PruneConfig fields, e.g.
    bits) and save it; its logged model, read by plain transformers and by MLflow, gives the
    logits of the same pruning held in memory."""
    calibration = CalibrationConfig(name, "sw", nsamples=4, seqlen=64)
    config = PruneConfig(name, method, calibration, stream=stream, **settings)
    if stream:
        result = run_prune(config, store)
        reference = run_prune(replace(config, stream=False, save_model=False), store, keep_model=True)
        model = reference.model.model
    else:
        result = run_prune(config, store, keep_model=True)
        model = result.model.model
    assert not any(
        isinstance(module, torch.nn.Linear) and module.weight.device.type == "meta"
        for module in model.modules()
    )
    folder = tracking.logged_model_folder(store, result.run_id, tmp_path)
    assert folder is not None, "the run logged no MLflow model"
    ids = result.calib.input_ids[:2, :48]
    expected = logits(model, ids)
    assert_same_logits(logits(plain(folder), ids), expected)
    if not config.sym:  # transformers 5.25's default path refuses compressed-tensors' packed
        return result.run_id  # asymmetric zero points (llm-compressor#1618), MLflow's takes no kwargs
    import mlflow.transformers

    pipeline = mlflow.transformers.load_model(f"runs:/{result.run_id}/model")
    loaded = pipeline.model  # (a quantized model refuses `.float()`: it loads as it was saved, fp32 here)
    loaded = loaded if getattr(loaded, "is_quantized", False) else loaded.float()
    assert_same_logits(logits(loaded.eval(), ids), expected)
    return result.run_id


@pytest.mark.slow  # ~60 s (`make test-all`, CI)
def test_gemma_saved_in_memory_loads_anywhere_and_evaluates_like_its_masks(store, tmp_path, monkeypatch):
    """The issue's case: Gemma-3's tied embedding survives `cps prune`'s save; `cps eval` of the
    saved run equals `cps eval` of the same run rebuilt from dense x masks."""
    run_id = saved_run_loads_anywhere(store, tmp_path, "gemma3-270m", "wanda", stream=False)
    config = EvalConfig(langs=("sw", "en"), tasks=(), max_docs=2, seqlen=128)
    saved = run_eval(config, store, run_id)
    assert tracking.get_run(store, run_id).tags["cps.eval.weights"] == runs.ORIGINS["saved"]
    monkeypatch.setattr(runs.tracking, "logged_model_folder", lambda *args: None)  # as --no-save-model
    rebuilt = run_eval(config, store, run_id)
    assert tracking.get_run(store, run_id).tags["cps.eval.weights"] == runs.ORIGINS["masks"]
    for name in ("ppl.sw", "ppl.en", "snr_db.sw"):
        assert saved.metrics[name] == pytest.approx(rebuilt.metrics[name], rel=1e-6), name
    assert saved.metrics["ppl.sw"] < 1e4  # a random embedding scores ~1e7


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, method, stream",
    [
        ("gemma3-270m", "sparsegpt", False),
        ("smollm2-135m", "wanda", False),
        ("smollm2-135m", "sparsegpt", False),
        ("smollm2-135m", "shortgpt", False),  # layers taken out: a shorter config, same logits
    ],
)  # the streamed runs: tests/test_saved_streamed.py (another file, so another test worker)
def test_saved_real_models_load_anywhere(name, method, stream, store, tmp_path):
    saved_run_loads_anywhere(store, tmp_path, name, method, stream)


# ---------------------------------------------------------------------------------------------
# Runs saved before the fix


def break_as_before_issue_23(folder: Path, dense_folder: Path) -> None:
    """Rewrite a logged model's `model/` folder as cps wrote it before issue 23: its checkpoint
    converted with the tied embedding under the head's name, loaded with the key mapping, saved."""
    state = {}
    for shard in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        state |= load_file(str(shard)) if shard.suffix == ".safetensors" else {}
        shard.unlink()
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    head_only = folder.parent / "head-only"
    head_only.mkdir()
    for extra in ("config.json", "generation_config.json"):
        (head_only / extra).write_bytes((dense_folder / extra).read_bytes())
    save_file(state, str(head_only / "model.safetensors"), metadata={"format": "pt"})
    old_load = AutoModelForCausalLM.from_pretrained(head_only, key_mapping=OLD_KEY_MAPPING)
    old_load.save_pretrained(folder)


@pytest.mark.slow  # Gemma-3 270M saved and read back twice, ~20 s a method (`make test-all`, CI)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_run_saved_with_the_misnamed_embedding_is_evaluated_rebuilt(method, store, tmp_path, caplog):
    name = "smollm2-135m"
    calibration = CalibrationConfig(name, "sw", nsamples=2, seqlen=32)
    run_id = run_prune(PruneConfig(name, method, calibration), store).run_id
    config = EvalConfig(langs=("sw",), tasks=(), max_docs=2, seqlen=64)
    good = run_eval(config, store, run_id)
    folder = tracking.logged_model_folder(store, run_id, tmp_path)
    break_as_before_issue_23(folder, Path(model_location(resolve_model(name))))
    # the defect as users met it: plain transformers leaves the embedding and the head random
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["unexpected_keys"] == {"lm_head.weight$"}
    assert info["missing_keys"] == {"model.embed_tokens.weight", "lm_head.weight"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cps.runs"):
        again = run_eval(config, store, run_id)
    said = [
        r.getMessage() for r in caplog.records if r.name == "cps.runs" and "lm_head.weight$" in r.getMessage()
    ]
    assert len(said) == 1 and "\n" not in said[0] and run_id in said[0]
    assert again.metrics["ppl.sw"] == pytest.approx(good.metrics["ppl.sw"], rel=1e-6)
    tags = tracking.get_run(store, run_id).tags
    assert "lm_head.weight$" in tags[runs.SAVED_MODEL_TAG]
    origin = runs.ORIGINS["masks" if method == "wanda" else "pruned_again"]
    assert tags["cps.eval.weights"] == origin
    streamed_again = runs.load_run_model(store, tracking.get_run(store, run_id), LoadOptions(stream=True))
    assert streamed(streamed_again.model) is not None and streamed_again.origin == origin


# ---------------------------------------------------------------------------------------------
# Loading refuses weights that do not fit


def _tiny_folder(tmp_path: Path, drop: str | None = None, add: str | None = None) -> Path:
    """tiny-llama saved by `save_pretrained`, with one tensor dropped and one foreign one added."""
    folder = tmp_path / "tiny"
    load_model("tiny-llama").model.save_pretrained(folder)
    for extra in Path(model_location(resolve_model("tiny-llama"))).glob("*token*"):
        (folder / extra.name).write_bytes(extra.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_every_load_refuses_missing_and_unexpected_keys_in_one_line(tmp_path):
    folder = _tiny_folder(tmp_path, drop="model.norm.weight", add="lm_head.weight$")
    for options in (LoadOptions(stream=False), LoadOptions(stream=True)):
        with pytest.raises(CpsError) as refused:
            load(str(folder), options)
        message = str(refused.value)
        assert "\n" not in message and "missing: model.norm.weight" in message, message
        assert "unexpected: lm_head.weight$" in message, message
    sound = _tiny_folder(tmp_path / "sound")
    model = load(str(sound), LoadOptions(stream=True))
    with pytest.raises(CpsError, match=r"unexpected: model\.layers\.9\.mlp\.up_proj\.weight"):
        fake = tmp_path / "overlay.safetensors"
        save_file({"model.layers.9.mlp.up_proj.weight": torch.zeros(128, 64)}, str(fake))
        streamed(model.model).use_overlay(WeightReader(fake))
    with pytest.raises(CpsError, match=r"of another shape: model\.layers\.0\.mlp\.up_proj\.weight"):
        save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)}, str(fake))
        streamed(model.model).use_overlay(WeightReader(fake))


def test_the_cli_names_the_keys_of_weights_that_do_not_fit(tmp_path, store, capsys, monkeypatch):
    from cps.cli import main

    folder = _tiny_folder(tmp_path, drop="model.norm.weight")
    argv = ["eval", "--model", str(folder), "--langs", "sw", "--max-docs", "1", "--tasks", ""]
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["cps", *argv, "--tracking-uri", str(store.uri)])
    with pytest.raises(SystemExit) as ended:
        main()
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]  # bars
    assert ended.value.code == 2 and len(lines) == 1, stderr
    assert "missing: model.norm.weight" in lines[0] and "Traceback" not in stderr
    assert all(run.status != "RUNNING" for run in tracking.find_runs(store, status=None))


def test_kept_weights_and_masks_that_do_not_fit_are_refused(store):
    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)
    pruned = run_prune(
        PruneConfig("tiny-llama", "sparsegpt", calibration, save_model=False), store, keep_model=True
    )
    path = runs.keep_weights(pruned.run_id, pruned.model.model)
    state = load_file(str(path))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(path))
    record = tracking.get_run(store, pruned.run_id)
    with pytest.raises(CpsError, match=r"missing: model\.layers\.1\.mlp\.down_proj\.weight"):
        runs.load_run_model(store, record, LoadOptions(stream=False))
    runs.drop_kept_weights([pruned.run_id])
    masks = runs.run_masks(store, pruned.run_id)
    with pytest.raises(CpsError, match=r"unexpected: model\.layers\.7\.mlp\.gate_proj"):
        runs._check_masks(
            record,
            {**masks, "model.layers.7.mlp.gate_proj": masks["model.layers.0.mlp.gate_proj"]},
            pruned.model.model,
        )


def test_a_save_that_renames_a_tensor_fails_the_logged_model_and_the_run(store, tmp_path):
    """What issue 23's save did, made on a tiny model: a load's key mapping, reversed on save."""
    import mlflow

    source = tmp_path / "source"
    load_model("tiny-llama").model.save_pretrained(source)
    renamed = AutoModelForCausalLM.from_pretrained(
        source, key_mapping={r"^lm_head\.weight$": "lm_head.weight"}
    )
    tokenizer = load_model("tiny-llama").tokenizer
    refused = r"missing: lm_head\.weight; unexpected: lm_head\.weight\$"
    with pytest.raises(CpsError, match=refused), tracking.start_run(store, "prune", {}) as run:
        tracking.log_transformers_model(run, renamed, tokenizer)
    (logged,) = tracking.client(store).search_logged_models(experiment_ids=[tracking.experiment_id(store)])
    assert logged.status.to_int() == mlflow.entities.LoggedModelStatus.FAILED.to_int()
    assert tracking.get_run(store, run.run_id).status == "FAILED"
    with pytest.raises(CpsError, match=r"missing: lm_head\.weight"):
        renamed.save_pretrained(tmp_path / "again")
        check_saved("a copy", tmp_path / "again", renamed)


# ---------------------------------------------------------------------------------------------
# The audit: every other write path, read back by plain transformers


@pytest.mark.slow
def test_converted_embedded_model_is_transformers_own_gguf_load(tmp_path):
    """The cached conversion of SmolLM2's GGUF loads plainly into what transformers' own GGUF
    loader makes of the package's file, tensor for tensor, in `save_pretrained`'s layout."""
    from cps.models import _gguf_path

    spec = resolve_model("smollm2-135m")
    converted = plain(Path(model_location(spec)))
    gguf = _gguf_path(spec, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    expected = reference.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in converted.state_dict().items())
    converted.save_pretrained(tmp_path / "saved")
    stored = WeightReader(Path(model_location(spec))).entries.keys()
    assert stored == WeightReader(tmp_path / "saved").entries.keys()
    assert converted.config.architectures == ["LlamaForCausalLM"]


def test_tiny_model_folder_is_the_model_cps_builds():
    spec = resolve_model("tiny-gemma3")
    built = load_model("tiny-gemma3").model
    ids = torch.tensor([[1, 50, 400, 7000]])
    assert torch.equal(logits(plain(tiny_model_dir(spec)), ids), logits(built, ids))


def test_kept_and_repruned_weights_over_the_dense_checkpoint_are_the_pruned_model(store):
    """A sweep's kept weights (`pruned/RUN.safetensors`) and a streamed re-pruning's shards
    (`pruned/RUN.layers/`): the dense checkpoint loaded by plain transformers with those tensors
    over it (safetensors, `load_state_dict`) is the pruned model."""
    from cps.paths import cache_dir

    name = "tiny-qwen2"
    calibration = CalibrationConfig(name, "sw", nsamples=4, seqlen=40)
    pruned = run_prune(PruneConfig(name, "sparsegpt", calibration, save_model=False), store, keep_model=True)
    ids = pruned.calib.input_ids[:2]
    expected = logits(pruned.model.model, ids)
    record = tracking.get_run(store, pruned.run_id)
    runs.keep_weights(pruned.run_id, pruned.model.model)
    repruned_from = cache_dir() / "pruned" / f"{pruned.run_id}.layers"
    for path in (runs.kept_weights_path(pruned.run_id), repruned_from):
        if path == repruned_from:
            runs.drop_kept_weights([pruned.run_id])
            runs.load_run_model(store, record, LoadOptions(stream=True))  # prunes again into shards
        dense = plain(tiny_model_dir(resolve_model(name)))
        tensors = {
            key: tensor
            for file in ([path] if path.is_file() else sorted(path.glob("*.safetensors")))
            for key, tensor in load_file(str(file)).items()
        }
        outcome = dense.load_state_dict(tensors, strict=False)
        assert not outcome.unexpected_keys and len(outcome.missing_keys) < len(dense.state_dict())
        assert_same_logits(logits(dense, ids), expected)
    runs.drop_kept_weights([pruned.run_id])


def test_a_registered_model_loads_by_name(store):
    """`mlflow.register_model` on a run's logged model; MLflow's loader reads it back by name."""
    import mlflow
    import mlflow.transformers

    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)
    pruned = run_prune(PruneConfig("tiny-llama", "wanda", calibration), store, keep_model=True)
    mlflow.set_tracking_uri(store.resolved_uri)
    version = mlflow.register_model(f"runs:/{pruned.run_id}/model", "cps-tiny")
    pipeline = mlflow.transformers.load_model(f"models:/cps-tiny/{version.version}")
    ids = pruned.calib.input_ids[:2]
    assert_same_logits(logits(pipeline.model, ids), logits(pruned.model.model, ids))


def test_a_streamed_runs_saved_model_opens_streamed_and_in_memory(store, tmp_path):
    """A streamed prune's shards are an MLflow model like an in-memory prune's (issue 23: before,
    a plain `model/` artifact that MLflow's loader could not read), and load back either way."""
    name = "tiny-gemma3"
    run_id = saved_run_loads_anywhere(store, tmp_path, name, "wanda", stream=True)
    folder = tracking.logged_model_folder(store, run_id, tmp_path)
    assert folder is not None and (folder.parent / "MLmodel").is_file()
    record = tracking.get_run(store, run_id)
    ids = torch.tensor([[1, 50, 400, 7000, 12]])
    expected = logits(plain(folder), ids)
    for options in (LoadOptions(stream=False), LoadOptions(stream=True)):
        loaded = runs.load_run_model(store, record, options)
        assert loaded.origin == runs.ORIGINS["saved"]
        if options.stream:
            assert streamed(loaded.model) is not None
        else:
            assert_same_logits(logits(loaded.model, ids), expected)
    again = open_loaded(name, folder, LoadOptions(stream=True), tokenizer=False)
    assert streamed(again.model).reader.folder == folder
