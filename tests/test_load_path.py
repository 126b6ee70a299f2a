"""One rule for where and in what dtype a model is loaded (`cps.models.placement`), on every path:
prune (dense baseline, streamed, in memory), eval (a run rebuilt, pruned again in its own dtype)
and the streaming decision (the size in the dtype that will be loaded).

No GPU here: `torch.cuda.is_available` is faked, and each path is stopped (`Stop`) where it has
decided, before anything is moved to the device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cps import runs, streaming, tracking
from cps.config import CalibrationConfig, EvalConfig, PruneConfig
from cps.errors import CpsError
from cps.models import LoadOptions, Placement, load_model, placement
from cps.stages import prune as prune_stage
from cps.stages.evaluate import run_eval
from cps.stages.prune import run_prune

CALIBRATION = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)


class Stop(Exception):
    """Raised by a spy once the path it watches has decided its device and dtype."""


@pytest.fixture
def cuda(monkeypatch):
    """This machine claims a GPU: `--device cuda` resolves, `auto` picks it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _only_run(store) -> tracking.RunRecord:
    (record,) = tracking.find_runs(store, "prune", status=None)
    return record


def test_placement_is_the_readme_rule_for_the_device_that_computes(cuda):
    assert placement(LoadOptions("auto", "cuda")) == Placement("cuda", "cuda", torch.bfloat16)
    assert placement(LoadOptions("auto", "auto")) == Placement("cuda", "cuda", torch.bfloat16)
    # weights held on the CPU, each layer computed on the GPU: the GPU's dtype
    assert placement(LoadOptions("auto", "cuda:1", hold_on_cpu=True)) == Placement(
        "cpu", "cuda:1", torch.bfloat16
    )
    assert placement(LoadOptions("float32", "cuda", hold_on_cpu=True)).dtype == torch.float32
    assert placement(LoadOptions("auto", "cpu")) == Placement("cpu", "cpu", torch.float32)
    assert placement(LoadOptions("float16", "cpu")).dtype == torch.float16


def test_placement_refuses_cuda_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement(LoadOptions("auto", "auto")) == Placement("cpu", "cpu", torch.float32)
    with pytest.raises(CpsError, match="CUDA is not available"):
        placement(LoadOptions("auto", "cuda"))


def _engine_spy(seen: dict):
    """A stand-in for the pruning engine: records the model's dtype, where its weights are held and
    where the engine computes, then stops before anything moves to the (faked) GPU."""

    def spy(model, ids, method, target, engine, on_layer=None, plan=None):
        parameter = next(model.parameters())
        seen.update(dtype=parameter.dtype, held=parameter.device.type, compute=engine.device)
        raise Stop

    return spy


def test_the_dense_baseline_loads_bf16_for_cuda_auto_and_logs_it(store, cuda):
    result = run_prune(PruneConfig("tiny-llama", method=None, device="cuda"), store, keep_model=True)
    parameter = next(result.model.model.parameters())
    assert parameter.dtype == torch.bfloat16 and parameter.device.type == "cpu"  # moved by its user
    assert _only_run(store).params["dtype"] == "bfloat16"
    assert runs.dense_run(store, "tiny-llama", "bfloat16") == result.run_id  # eval finds it


def test_pruning_in_memory_loads_bf16_for_cuda_auto_on_the_cpu(store, cuda, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(prune_stage, "prune_model", _engine_spy(seen))
    with pytest.raises(Stop):
        run_prune(PruneConfig("tiny-llama", "wanda", CALIBRATION, device="cuda"), store)
    assert seen == {"dtype": torch.bfloat16, "held": "cpu", "compute": "cuda"}
    assert _only_run(store).params["dtype"] == "bfloat16"


def test_pruning_streamed_loads_bf16_for_cuda_auto(store, cuda, monkeypatch):
    seen = {}

    def spy(folder, dtype, device, trust_remote_code=False):
        seen.update(dtype=dtype, device=str(device))
        raise Stop

    monkeypatch.setattr(streaming, "open_streamed", spy)
    with pytest.raises(Stop):
        run_prune(PruneConfig("tiny-llama", "wanda", CALIBRATION, device="cuda", stream=True), store)
    assert seen == {"dtype": torch.bfloat16, "device": "cuda"}
    assert _only_run(store).params["dtype"] == "bfloat16"


def test_an_unsaved_sparsegpt_run_is_pruned_again_in_the_dtype_it_was_pruned_in(store, monkeypatch):
    # Pruned in bf16 (what `--device cuda --dtype auto` prunes in), not saved: eval prunes it again.
    config = PruneConfig("tiny-llama", "sparsegpt", CALIBRATION, dtype="bfloat16", save_model=False)
    pruned = run_prune(config, store, keep_model=True)
    record = tracking.get_run(store, pruned.run_id)
    assert record.params["dtype"] == "bfloat16"
    rebuilt_in = []
    real = runs.prune_model

    def spy(model, *args, **kwargs):
        rebuilt_in.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runs, "prune_model", spy)
    # Evaluated in float32 (auto on the CPU): the run's own weights, cast as a saved model's would be.
    rebuilt = runs.load_run_model(store, record, LoadOptions())
    assert rebuilt_in == [torch.bfloat16] and rebuilt.origin == runs.ORIGINS["pruned_again"]
    expected = pruned.model.model.state_dict()
    for name, weight in rebuilt.model.state_dict().items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, expected[name].float()), name
    fresh = load_model("tiny-llama", LoadOptions(), tokenizer=False).model  # buffers as a float32 load's
    buffers = {name: buffer.dtype for name, buffer in fresh.named_buffers()}
    assert {name: buffer.dtype for name, buffer in rebuilt.model.named_buffers()} == buffers

    # `cps eval --device cuda`: pruned again in bf16 on the CPU, each layer computed on the GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}
    monkeypatch.setattr(runs, "prune_model", _engine_spy(seen))
    with pytest.raises(Stop):
        run_eval(EvalConfig(langs=("sw",), seqlen=32, max_docs=1, device="cuda"), store, pruned.run_id)
    assert seen == {"dtype": torch.bfloat16, "held": "cpu", "compute": "cuda"}


def test_a_run_logged_before_dtypes_were_resolved_is_pruned_again_in_float32():
    def record(dtype: str, tags: dict[str, str]) -> tracking.RunRecord:
        return tracking.RunRecord("r", "FINISHED", {"dtype": dtype}, {}, tags, "", 0, "0")

    assert runs.pruned_dtype(record("bfloat16", {})) == "bfloat16"
    # `auto` in memory always loaded on the CPU, so in float32; streamed, on an unrecorded device
    assert runs.pruned_dtype(record("auto", {})) == "float32"
    assert runs.pruned_dtype(record("auto", {"cps.streamed": "True"})) == "auto"


def test_the_streaming_decision_counts_the_bytes_of_the_loaded_dtype(tmp_path, monkeypatch, cuda):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tensors = {
        "a.weight": torch.ones(64, 64, dtype=torch.bfloat16),
        "b.weight": torch.ones(32, 64, dtype=torch.bfloat16),
        "ids": torch.arange(16),  # int64: counted as stored, whatever the dtype
    }
    save_file(tensors, str(folder / "model.safetensors"))
    parameters = 64 * 64 + 32 * 64

    class Free:
        available = 5 * parameters  # 60%: 3 bytes a parameter, between bf16's 2 and fp32's 4

    monkeypatch.setattr(streaming.psutil, "virtual_memory", lambda: Free)
    name = str(folder)
    assert streaming.wants_stream(name, LoadOptions("float32"))  # 2x the file's size: streamed
    assert streaming.wants_stream(name, LoadOptions("auto", "cpu"))
    assert not streaming.wants_stream(name, LoadOptions("bfloat16"))
    assert not streaming.wants_stream(name, LoadOptions("auto", "cuda"))
    assert not streaming.wants_stream(name, LoadOptions("auto", "cuda", hold_on_cpu=True))
    # from the headers: floating-point tensors at the loaded dtype's size, the rest as stored
    assert streaming.loaded_bytes(folder, torch.float32) == 4 * parameters + 16 * 8
    assert streaming.loaded_bytes(folder, torch.bfloat16) == 2 * parameters + 16 * 8
    # a dtype cps does not read (fp8) counts as stored, instead of failing the decision
    save_file({"q.weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn)}, str(folder / "extra.safetensors"))
    assert streaming.loaded_bytes(folder, torch.float32) == 4 * parameters + 16 * 8 + 64
