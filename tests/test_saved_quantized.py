"""Quantized runs (`cps quantize`, `cps prune --bits`) end to end: their compressed-tensors model
read back by plain `from_pretrained` and `mlflow.transformers.load_model` with the in-memory
quantized model's logits, their params and codes artifact read back, and evaluation of a run
rebuilt (streamed: pruned again) or loaded from its saved model giving the same perplexity."""

from __future__ import annotations

import pytest
import torch
from test_saved_models import saved_run_loads_anywhere

from cps import tracking
from cps.config import EvalConfig
from cps.pruning.compressed import quantized_config, read_codes
from cps.runs import run_codes
from cps.stages.evaluate import run_eval
from cps.stages.prune import run_prune


@pytest.mark.parametrize(
    ("method", "settings", "stream"),
    [
        ("gptq", {"bits": 4, "group_size": 32}, False),
        # the other paths, ~15 s each: `make test-all` (CI)
        pytest.param(
            "gptq",
            {"bits": 3, "group_size": -1, "sym": False, "act_order": True},
            True,
            marks=pytest.mark.slow,
        ),
        pytest.param("sparsegpt", {"bits": 4, "group_size": 32}, True, marks=pytest.mark.slow),
        pytest.param("wanda", {"bits": 4, "group_size": 32, "quant": "rtn"}, False, marks=pytest.mark.slow),
    ],
)
def test_tiny_quantized_runs_load_anywhere(method, settings, stream, store, tmp_path):
    run_id = saved_run_loads_anywhere(store, tmp_path, "tiny-llama", method, stream, **settings)
    record = tracking.get_run(store, run_id)
    assert record.params["method"] == method and record.params["bits"] == str(settings["bits"])
    assert record.params["group_size"] == str(settings["group_size"])
    folder = tracking.logged_model_folder(store, run_id, tmp_path / "again")
    config = quantized_config(folder)
    assert config["format"] == "pack-quantized"
    # the codes artifact and the checkpoint hold the same integer codes
    codes = run_codes(store, run_id)
    assert len(codes) == 14  # 7 linears x 2 layers
    for name, stored in read_codes(folder):
        assert torch.equal(stored, codes[name]), name
    masks_zero = method in ("sparsegpt", "wanda")
    if masks_zero:  # pruned and quantized: every pruned weight is stored as its zero point
        from cps.runs import run_masks

        masks = run_masks(store, run_id)
        assert all(mask.float().mean() == 0.5 for mask in masks.values())


def test_quantize_cli_and_a_rebuilt_run_evaluates_as_saved(store, tmp_path, capsys):
    """`cps quantize` logs a run at sparsity 0 with its grid; `cps eval` of it from the saved model
    and rebuilt (no saved model: quantized again from its calibration run) agree."""
    from test_cli import cps_here

    args = ["quantize", "--model", "tiny-llama", "--lang", "sw", "--nsamples", "4", "--seqlen", "64",
            "--bits", "4", "--group-size", "32", "--tracking-uri", str(store.uri)]  # fmt: skip
    result = cps_here(args, capsys)
    assert result.returncode == 0, result.stderr
    assert "gptq-w4g32" in result.stdout
    result = cps_here([*args, "--no-save-model"], capsys)
    assert result.returncode == 0, result.stderr
    saved, rebuilt = sorted(tracking.find_runs(store, "prune"), key=lambda r: r.start_time)
    for record in (saved, rebuilt):
        assert record.params["method"] == "gptq" and float(record.params["sparsity"]) == 0.0
        assert record.params["bits"] == "4" and record.params["sym"] == "True"
        assert record.params["act_order"] == "False" and record.params["quant"] == "gptq"
        assert record.metrics["sparsity.mask"] == 0  # nothing pruned; some weights round to 0
        assert 0 < record.metrics["sparsity.actual"] < 0.2
    config = EvalConfig(langs=("sw",), seqlen=64, max_docs=2)
    scores = {}
    for record in (saved, rebuilt):
        run_eval(config, store, record.run_id)
        scores[record.run_id] = tracking.get_run(store, record.run_id).metrics["ppl.sw"]
    assert scores[saved.run_id] == pytest.approx(scores[rebuilt.run_id], rel=1e-5)
    assert tracking.get_run(store, saved.run_id).tags["cps.eval.weights"] == "the run's saved model"
    assert "snr_db.sw" in tracking.get_run(store, rebuilt.run_id).metrics  # held-out SNR works


@pytest.mark.slow  # Gemma-3 270M quantized with GPTQ and saved, ~1 min (`make test-all`, CI)
def test_gemma_gptq_saved_loads_anywhere(store, tmp_path):
    saved_run_loads_anywhere(store, tmp_path, "gemma3-270m", "gptq", False, bits=4, group_size=128)


@pytest.mark.slow  # ~25 s (`make test-all`, CI)
def test_gptq_on_a_pruned_run_holds_its_zeros_and_rebuilds(store):
    """`cps quantize --from-run`: a Wanda run's model quantized with GPTQ around its masks (the
    masks logged again, its zeros stored, the kept weights on the grid); evaluated rebuilt (the
    source rebuilt from its masks, then quantized again, codes checked) as in memory."""
    from cps.config import CalibrationConfig, PruneConfig
    from cps.runs import run_masks

    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=64)
    source = run_prune(PruneConfig("tiny-llama", "wanda", calibration, save_model=False), store)
    config = PruneConfig(
        "tiny-llama", "gptq", calibration, bits=4, group_size=32, from_run=source.run_id, save_model=False
    )
    quantized = run_prune(config, store, keep_model=True)
    record = tracking.get_run(store, quantized.run_id)
    assert record.params["from_run"] == source.run_id and record.params["from_method"] == "wanda"
    assert record.params["sparsity"] == "0.5" and record.metrics["sparsity.mask"] == 0.5
    masks, codes = run_masks(store, source.run_id), run_codes(store, quantized.run_id)
    assert run_masks(store, quantized.run_id).keys() == masks.keys()
    model = quantized.model.model
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.data
        assert torch.all(weight[mask] == 0) and torch.equal(run_masks(store, quantized.run_id)[name], mask)
        assert bool((weight[~mask] != 0).any())
    assert len(codes) == len(masks)
    config = EvalConfig(langs=("sw",), seqlen=64, max_docs=2)
    run_eval(config, store, quantized.run_id, quantized.model)
    in_memory = tracking.get_run(store, quantized.run_id).metrics["ppl.sw"]
    run_eval(config, store, quantized.run_id)  # no saved model: rebuilt
    rebuilt = tracking.get_run(store, quantized.run_id)
    assert rebuilt.metrics["ppl.sw"] == pytest.approx(in_memory, rel=1e-6)
    assert rebuilt.tags["cps.eval.weights"] == "pruned again from the run's calibration set"
