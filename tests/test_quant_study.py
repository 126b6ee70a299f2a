"""A quantization study end to end on the tiny model: GPTQ and RTN cells, SparseGPT + 4-bit, the
analyses (code agreement next to mask IoU) and the report, read back by polars; and the shipped
studies/quant.toml's grid."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cps import tracking
from cps.report import ReportConfig, build_report
from cps.stages.sweep import run_sweep
from cps.study import left_out, load_study

REPO = Path(__file__).resolve().parent.parent

STUDY = """
[study]
name = "tinyquant"

[[grid]]
models = ["tiny-llama"]
methods = ["gptq", "rtn"]
bits = [4]
group_sizes = [32]
calib_langs = ["sw", "zh"]
dense_baseline = true

[[grid]]
models = ["tiny-llama"]
methods = ["sparsegpt"]
sparsities = [0.5]
bits = [0, 4]
group_sizes = [32]
calib_langs = ["sw", "zh"]
dense_baseline = true

[calibration]
nsamples = 4
seqlen = 64

[prune]
device = "cpu"

[eval]
langs = ["sw", "zh"]
seqlen = 64
max_docs = 2

[analyze]
activations = true
langs = ["sw", "zh"]
max_docs = 2
seqlen = 64
"""


def test_shipped_quant_study_grid():
    study = load_study(REPO / "studies" / "quant.toml")
    variants = [cell.prune.variant for cell in study.cells]
    assert variants.count("gptq-w4g128") == 7 and variants.count("gptq-w3g128") == 7
    assert variants.count("sparsegpt+gptq-w4g128") == 7 and variants.count("rtn-w4g128") == 1
    assert variants.count("dense") == 1 and len(study.cells) == 23
    joint = [c.prune for c in study.cells if c.prune.variant.startswith("sparsegpt")]
    assert all(c.joint and c.target.sparsity == 0.5 for c in joint)
    assert all(c.prune.target.sparsity == 0 for c in study.cells if c.prune.quantizes)


def test_a_grid_leaves_out_quantizers_without_bits(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(STUDY.replace("bits = [4]", "bits = [0, 4]"), encoding="utf-8")
    study = load_study(path)
    assert any("gptq quantizes: give --bits" in line for line in left_out(study))
    assert sum(cell.prune.quantizes for cell in study.cells) == 4  # gptq and rtn at 4 bits only


@pytest.mark.slow  # ~30 s: nine cells, four analyses with activations (`make test-all`, CI)
def test_tiny_quant_study_sweeps_analyses_and_reports(tmp_path, store):
    path = tmp_path / "tinyquant.toml"
    path.write_text(STUDY, encoding="utf-8")
    study = load_study(path)
    assert len(study.cells) == 1 + 2 * 2 + 2 * 2
    result = run_sweep(study, store)
    assert not result.failed, [o.error for o in result.failed]
    analyses = {
        record.params["method"] + ":" + record.params.get("bits", "-"): record
        for record in tracking.find_runs(store, "analyze")
    }
    assert set(analyses) == {"gptq:4", "rtn:4", "sparsegpt:4", "sparsegpt:-"}
    for key, record in analyses.items():
        metrics = record.metrics
        if key.startswith(("gptq", "rtn")):  # nothing pruned: no IoU, the codes compared
            assert "iou.mean" not in metrics
        else:
            assert 0 < metrics["iou.mean"] < 1
        if key == "sparsegpt:-":
            assert "code_agreement.mean" not in metrics
            continue
        agreement = pl.read_parquet(
            tracking.local_artifact_dir(store, record.run_id, "code_agreement.parquet")
        )
        assert len(agreement) == 14 and agreement["agreement"].is_between(0, 1).all()
        assert metrics["code_agreement.mean"] == pytest.approx(agreement["agreement"].mean())
        # both sides of the comparison read back: the share recomputed from the runs' codes
        if key == "rtn:4":  # reads no calibration: the same codes whatever the language
            assert agreement["agreement"].min() == 1.0
        else:
            assert agreement["agreement"].max() < 1.0
    report = build_report(store, ReportConfig(filters=(("study", "tinyquant"),)))
    titles = [s.title for s in report.sections]
    runs = next((s for s in report.sections if "method" in s.frame.columns), None)
    assert runs is not None, titles
    methods = set(runs.frame["method"].to_list())
    assert {"gptq-w4g32", "rtn-w4g32", "sparsegpt+gptq-w4g32", "sparsegpt", "dense"} <= methods
