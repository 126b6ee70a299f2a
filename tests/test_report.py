"""`cps report` against numbers computed here straight from the store (MlflowClient, plain Python)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from conftest import chromium_page

from cps import tracking
from cps.errors import CpsError
from cps.metrics import companion, metric_lang, split_task, task_family
from cps.report import ReportConfig, build_report, render, write_report

BASE = {"model": "tiny-llama", "pattern": "unstructured", "calib_corpus": "ntrex", "nsamples": "4"}


def _log(store, params, metrics):
    with tracking.start_run(store, "prune", params) as run:
        run.log_metrics(metrics)
    return run.run_id


@pytest.fixture
def filled(store):
    """Two methods x two calibration languages x two seeds, a dense baseline, and a run of another model."""
    ppl = {
        ("wanda", "sw", 0): (20.0, 41.0),
        ("wanda", "sw", 1): (22.0, 43.0),
        ("wanda", "zh", 0): (25.0, 30.0),
        ("wanda", "zh", 1): (27.0, 31.0),
        ("sparsegpt", "sw", 0): (18.0, 39.0),
        ("sparsegpt", "sw", 1): (19.0, 40.0),
        ("sparsegpt", "zh", 0): (23.0, 28.0),
        ("sparsegpt", "zh", 1): (24.0, 27.0),
    }
    for (method, lang, seed), (sw, zh) in ppl.items():
        params = {**BASE, "method": method, "sparsity": "0.5", "calib_lang": lang, "seed": seed}
        # seed 1 logs the in-sample SNR under its name before the rename (snr_db.mean): still read
        calib_snr = "calib_snr_db.mean" if seed == 0 else "snr_db.mean"
        metrics = {"ppl.sw": sw, "ppl.zh": zh, "acc.xcopa_sw": 0.5 + seed / 10, calib_snr: 10.0 + seed}
        metrics |= {"acc.flores_next_sw": 0.25, "acc_mutual_info.flores_next_sw": 0.6 + seed / 10}
        metrics |= {"acc_ci_low.xcopa_sw": 0.2 + seed / 10, "acc_ci_high.xcopa_sw": 0.8 + seed / 10}
        metrics |= {
            "acc_mutual_info_ci_low.flores_next_sw": 0.3,
            "acc_mutual_info_ci_high.flores_next_sw": 0.9,
        }
        # held-out SNR: higher on the calibration language; the per-layer series is not a language
        metrics |= {"snr_db.sw": 20.0 - sw / 10, "snr_db.zh": 20.0 - zh / 10, "snr_db.sw.layer": 99.0}
        _log(store, params, metrics)
    dense = {**BASE, "method": "dense", "sparsity": "0.0", "calib_lang": "none", "seed": 0}
    _log(store, dense, {"ppl.sw": 16.0, "ppl.zh": 25.0, "acc.xcopa_sw": 0.7})
    _log(
        store,
        {**BASE, "model": "other", "method": "wanda", "sparsity": "0.5", "calib_lang": "sw", "seed": 0},
        {"ppl.sw": 99.0},
    )
    failed = {**BASE, "method": "wanda", "sparsity": "0.5", "calib_lang": "es", "seed": 0}
    with pytest.raises(RuntimeError), tracking.start_run(store, "prune", failed) as run:
        run.log_metrics({"ppl.sw": 1e6})
        raise RuntimeError("crash")  # a failed run is never reported
    assert tracking.get_run(store, run.run_id).status == "FAILED"
    return store


def _from_store(store, **where):
    """Metrics of the finished prune runs with these params, read with MlflowClient directly."""
    client = tracking.client(store)
    runs = client.search_runs([tracking.experiment_id(store)], "attributes.status = 'FINISHED'")
    return [
        run.data.metrics
        for run in runs
        if run.data.tags.get("cps.stage") == "prune"
        and all(run.data.params.get(k) == str(v) for k, v in where.items())
    ]


def _row(section, **key):
    rows = [row for row in section.frame.iter_rows(named=True) if all(row[k] == v for k, v in key.items())]
    assert len(rows) == 1, (key, section.frame)
    return rows[0]


def test_report_numbers_equal_values_from_the_store(filled):
    config = ReportConfig(filters=(("model", "tiny-llama"),), pivot="eval_lang")
    report = build_report(filled, config)
    assert report.runs == 9  # 8 pruned + dense; the other model and the failed runs are left out
    pivot = next(s for s in report.sections if s.title.startswith("ppl by"))
    assert pivot.key == ["method", "calib_lang"] and pivot.diagonal == "calib_lang"
    for method in ("wanda", "sparsegpt"):
        for lang in ("sw", "zh"):
            stored = _from_store(filled, model="tiny-llama", method=method, calib_lang=lang)
            row = _row(pivot, method=method, calib_lang=lang)
            for eval_lang in ("sw", "zh"):
                values = [m[f"ppl.{eval_lang}"] for m in stored]
                assert row[eval_lang] == pytest.approx(statistics.mean(values))
                assert row[f"{eval_lang}.std"] == pytest.approx(statistics.stdev(values))
    dense = _from_store(filled, model="tiny-llama", method="dense")[0]
    change = next(s for s in report.sections if s.title.startswith("ppl change"))
    stored = _from_store(filled, model="tiny-llama", method="wanda", calib_lang="zh")
    expected = statistics.mean((m["ppl.sw"] / dense["ppl.sw"] - 1) * 100 for m in stored)
    assert _row(change, method="wanda", calib_lang="zh")["sw"] == pytest.approx(expected)
    assert _row(change, method="dense", calib_lang="none")["sw"] == pytest.approx(0.0)
    tasks = next(s for s in report.sections if s.title.startswith("Task accuracy"))
    wanda = [m["acc.xcopa_sw"] for m in _from_store(filled, model="tiny-llama", method="wanda")]
    assert _row(tasks, method="wanda", task="xcopa")["sw"] == pytest.approx(statistics.mean(wanda))
    # flores_next reads acc_mutual_info (the pack's metric), not the plain acc logged beside it
    mutual = [
        m["acc_mutual_info.flores_next_sw"] for m in _from_store(filled, model="tiny-llama", method="wanda")
    ]
    assert _row(tasks, method="wanda", task="flores_next")["sw"] == pytest.approx(statistics.mean(mutual))
    assert _row(tasks, method="wanda", task="xcopa")["sw.ci_low"] == pytest.approx(0.25)  # mean of bounds
    assert _row(tasks, method="wanda", task="flores_next")["sw.ci_high"] == pytest.approx(0.9)
    pruning = next(s for s in report.sections if s.title.startswith("Pruning, in-sample"))
    assert _row(pruning, method="sparsegpt", calib_lang="sw")["calib_snr_db.mean"] == pytest.approx(10.5)
    # the diagonal and the column winners in the rendered table
    text = render(report, "markdown")
    assert "[18.50 ± 0.7071 *]" in text  # sparsegpt calibrated on sw: best ppl on sw, on the diagonal
    assert "| sparsegpt | zh | 23.50 ± 0.7071 | [27.50 ± 0.7071 *] |" in text
    assert "| wanda | xcopa | 0.55 ± 0.05774 (0.25–0.85) |" in text  # accuracy (Wilson interval)


def test_held_out_snr_matrix(filled):
    report = build_report(
        filled, ReportConfig(metrics=("snr",), pivot="eval_lang", filters=(("model", "tiny-llama"),))
    )
    matrix = next(s for s in report.sections if s.title.startswith("snr by"))
    assert matrix.best == "max" and matrix.diagonal == "calib_lang" and "hidden states" in matrix.note
    assert set(matrix.frame.columns) >= {"sw", "zh"} and "layer" not in matrix.frame.columns
    for method in ("wanda", "sparsegpt"):
        stored = _from_store(filled, model="tiny-llama", method=method, calib_lang="zh")
        expected = statistics.mean(m["snr_db.zh"] for m in stored)
        assert _row(matrix, method=method, calib_lang="zh")["zh"] == pytest.approx(expected)
    text = render(report, "markdown")
    assert "| sparsegpt | sw | [18.15 ± 0.07071 *] | 16.05 ± 0.07071 |" in text
    assert not any(s.title.startswith("snr change") for s in report.sections)  # no dense SNR


def test_group_by_any_param_and_every_format(filled, tmp_path):
    by_method = build_report(filled, ReportConfig(group_by=("method",), filters=(("model", "tiny-llama"),)))
    assert by_method.sections[0].title.startswith("Findings")  # the findings table first
    metrics = by_method.main
    values = [m["ppl.zh"] for m in _from_store(filled, model="tiny-llama", method="wanda")]
    assert _row(metrics, method="wanda")["ppl.zh"] == pytest.approx(statistics.mean(values))
    assert _row(metrics, method="wanda")["n"] == 4
    by_seed = build_report(filled, ReportConfig(group_by=("seed",), metrics=("ppl",), include_dense=False))
    # two models in the selection: rows never mix them
    assert by_seed.main.key == ["model", "method", "seed"]
    for fmt in ("table", "markdown", "csv", "json", "html"):
        text = render(by_method, fmt)
        assert "ppl.zh" in text
    parsed = json.loads(render(by_method, "json"))
    assert parsed[1]["rows"][0]["n"] >= 1
    pivoted = build_report(filled, ReportConfig(pivot="eval_lang", filters=(("model", "tiny-llama"),)))
    written = write_report(pivoted, tmp_path / "out")
    names = {path.name for path in written}
    assert {"report.md", "report.html"} <= names
    pngs = [path for path in written if path.suffix == ".png"]
    assert pngs and all(path.stat().st_size > 1000 for path in pngs)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert all(f"plots/{path.name}" in markdown for path in pngs)


def test_report_errors(store, filled):
    with pytest.raises(CpsError, match="no finished prune runs"):
        build_report(filled, ReportConfig(filters=(("model", "nothing"),)))
    with pytest.raises(CpsError, match="to group by"):
        build_report(filled, ReportConfig(group_by=("nonsense",)))
    with pytest.raises(CpsError, match="no metric"):
        build_report(filled, ReportConfig(metrics=("rouge",)))
    with pytest.raises(CpsError, match="unknown format"):
        render(build_report(filled, ReportConfig()), "xlsx")


def test_metric_names():
    assert metric_lang("ppl.sw") == "sw" and metric_lang("acc.flores_next_zh") == "zh"
    assert metric_lang("snr_db.sw") == "sw" and metric_lang("snr_db.sw.layer") is None
    assert metric_lang("snr_db.mean") is None and metric_lang("calib_snr_db.mean") is None
    assert metric_lang("acc.mmlu") is None and metric_lang("acc.global_mmlu_sw") == "sw"
    assert task_family("acc.flores_next_zh") == "flores_next" and task_family("acc.sib_sw") == "sib"
    assert task_family("acc.mmlu") == "mmlu"
    assert split_task("flores_next_sw") == ("flores_next", "sw") and split_task("mmlu") == ("mmlu", None)
    assert companion("acc.sib_sw", "ci_low") == "acc_ci_low.sib_sw"


def test_csv_is_one_table_a_csv_reader_reads(filled):
    import io

    import polars as pl

    report = build_report(filled, ReportConfig(pivot="eval_lang", filters=(("model", "tiny-llama"),)))
    assert len(report.sections) > 1
    parsed = pl.read_csv(io.StringIO(render(report, "csv")))
    assert parsed.equals(report.main.frame)  # the first table after the findings


def test_heatmaps_star_every_tie_and_keep_their_titles_inside(filled):
    import polars as pl

    from cps.analysis.plots import matrix_heatmap

    tied = pl.DataFrame({"calib": ["a", "b", "c"], "eval": ["x"] * 3, "value": [2.0, 2.0, 1.0]})
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cps.report.write import heatmaps

    long_title = matrix_heatmap(tied, "calib", "eval", "value", "a title " * 30, best="max")
    texts = [t.get_text() for t in long_title.axes[0].texts]
    assert sorted(texts) == ["1", "2*", "2*"]  # both best cells starred, like the tables
    report = build_report(filled, ReportConfig(pivot="eval_lang", filters=(("model", "tiny-llama"),)))
    figures = [long_title, *(f for s in report.sections if s.heatmap for f in heatmaps(s).values())]
    for figure in figures:
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        box = figure._suptitle.get_window_extent(canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= figure.bbox.width + 0.5  # the title is never cut off


def test_the_html_report_renders_in_chromium(filled, tmp_path):
    """Headless Chromium opens report.html: every image loads, every table renders; the screenshot
    stays in the test's folder for a person to look at."""
    config = ReportConfig(
        pivot="eval_lang", metrics=("ppl", "snr", "acc"), filters=(("model", "tiny-llama"),)
    )
    report = build_report(filled, config)
    write_report(report, tmp_path / "out")
    with chromium_page() as page:
        page.goto((tmp_path / "out" / "report.html").as_uri(), wait_until="load")
        loaded = "i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]"
        images = page.evaluate(f"() => Array.from(document.images).map({loaded})")
        rows = page.evaluate("() => Array.from(document.querySelectorAll('table')).map(t => t.rows.length)")
        # the findings table links to the sections with the evidence: every link has its target
        links = page.evaluate(
            "() => Array.from(document.querySelectorAll('a[href^=\"#\"]'))"
            ".map(a => [a.getAttribute('href'), !!document.getElementById(a.getAttribute('href').slice(1))])"
        )
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert images and all(loaded for _, loaded in images), images
    assert len(images) == len(list((tmp_path / "out" / "plots").glob("*.png")))
    assert rows == [section.frame.height + 1 for section in report.sections]
    assert report.sections[0].title.startswith("Findings")
    assert ["#ppl-by-language", True] in links and all(found for _, found in links), links
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_significance_from_per_item_results(store):
    """Two calibration languages x two evaluation languages: on sw, calibrating on sw is right on
    60 more of 200 items and has a lower perplexity on every document; on zh the models tie."""
    import polars as pl

    base = [float(i % 2) for i in range(200)]
    for calib in ("sw", "zh"):
        params = {**BASE, "method": "wanda", "sparsity": "0.5", "calib_lang": calib, "seed": 0}
        with tracking.start_run(store, "prune", params) as run:
            run.log_metrics({"ppl.sw": 10.0, "ppl.zh": 10.0})
            items = {}
            for lang in ("sw", "zh"):
                correct = list(base)
                if calib == lang == "sw":
                    correct[0:120:2] = [1.0] * 60
                items[f"items/xcopa_{lang}.parquet"] = pl.DataFrame(
                    {"task": f"xcopa_{lang}", "item": range(200), "lang": lang, "acc": correct}
                )
                nll = [30.0 if calib == lang == "sw" else 40.0] * 50
                items[f"items/ppl_{lang}.parquet"] = pl.DataFrame(
                    {
                        "document": [f"d{i}" for i in range(50)],
                        "nll": nll,
                        "tokens": [20] * 50,
                        "bytes": [80] * 50,
                    }
                )
            run.log_frames(items)
    report = build_report(store, ReportConfig(pivot="eval_lang", metrics=("ppl",)))
    detail = next(s for s in report.sections if s.title.startswith("Appendix: own-language"))
    xcopa_sw = _row(detail, task="xcopa", eval_lang="sw")
    assert xcopa_sw["other"] == "zh" and xcopa_sw["own - other"] == pytest.approx(0.3)
    assert xcopa_sw["significant"] == "true" and 0 < xcopa_sw["own - other.ci_low"] < 0.3
    assert _row(detail, task="xcopa", eval_lang="zh")["significant"] == "false"
    ppl_sw = _row(detail, task="ppl", eval_lang="sw")
    assert ppl_sw["own - other"] == pytest.approx(math.exp(1.5) - math.exp(2.0))
    lines = next(s for s in report.sections if s.title.startswith("Appendix: does calibrating"))
    assert _row(lines, task="xcopa")["line"] == (
        "own-language calibration wins significantly in 1 of 2 languages, loses significantly in 0"
    )
    text = render(report, "markdown")
    assert "| xcopa | accuracy | sw | zh | 0.3 (" in text
    without = build_report(store, ReportConfig(pivot="eval_lang", metrics=("ppl",), significance=False))
    assert not any(s.title.startswith("Appendix: own-language") for s in without.sections)
