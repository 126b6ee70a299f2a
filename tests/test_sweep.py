from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import polars as pl
import pytest
from conftest import needs_module

from cps import config as config_module
from cps import tracking
from cps.errors import CpsError
from cps.stages import sweep as sweep_stage
from cps.stages.sweep import local_executor, plan_cells, run_sweep
from cps.study import load_study, parse_study

REPO = Path(__file__).resolve().parent.parent

TINY = """
[study]
name = "{name}"

[grid]
models = ["tiny-llama"]
methods = {methods}
calib_langs = {langs}
dense_baseline = {dense}

[calibration]
nsamples = {nsamples}
seqlen = 64

[prune]
device = "cpu"

[eval]
langs = ["sw", "zh"]
tasks = {tasks}
seqlen = 64
max_docs = 2
limit = 2

[analyze]
enabled = {analyze}
activations = {activations}
langs = ["sw", "zh"]
max_docs = 2
seqlen = 64
"""


def tiny_study(
    tmp_path: Path,
    name: str = "tiny",
    methods: tuple[str, ...] = ("wanda",),
    langs: tuple[str, ...] = ("sw", "zh"),
    dense: bool = False,
    nsamples: int = 4,
    tasks: tuple[str, ...] = (),
    analyze: bool = False,
    activations: bool = False,
) -> Path:
    text = TINY.format(
        name=name,
        methods=json.dumps(list(methods)),
        langs=json.dumps(list(langs)),
        dense=str(dense).lower(),
        nsamples=nsamples,
        tasks=json.dumps(list(tasks)),
        analyze=str(analyze).lower(),
        activations=str(activations).lower(),
    )
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_study_grid_and_checks():
    raw = {
        "grid": {
            "models": ["tiny-llama"],
            "methods": ["wanda", "sparsegpt"],
            "patterns": ["unstructured", "2:4"],
            "sparsities": [0.5, 0.6],
            "calib_langs": ["sw", "en:0.5,sw:0.5"],
            "seeds": [0, 42],
        }
    }
    study = parse_study(raw)
    # dense + 2 methods x (2 sparsities + one 2:4) x 2 languages x 2 seeds
    assert len(study.cells) == 1 + 2 * 3 * 2 * 2
    keys = [cell.key for cell in study.cells]
    assert keys[0]["method"] == "dense" and keys[0]["calib_lang"] == "none" and keys[0]["sparsity"] == "0.0"
    nm = [k for k in keys if k["pattern"] == "2:4"]
    assert len(nm) == 8 and {k["sparsity"] for k in nm} == {"0.5"}
    assert {k["calib_lang"] for k in keys[1:]} == {"sw", "en:0.5,sw:0.5"}
    assert all("dampening" in k for k in keys if k["method"] == "sparsegpt")
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == len(keys)
    assert study.fingerprint == parse_study(raw).fingerprint
    assert study.fingerprint != parse_study({"grid": {**raw["grid"], "seeds": [0]}}).fingerprint
    for bad, message in (
        ({"grid": {"modles": ["x"]}}, "unknown key 'modles'"),
        ({"grids": {}}, "unknown section"),
        ({"grid": {"calib_langs": ["xx"]}}, "unknown language"),
        ({"grid": {"methods": ["obc"]}}, "unknown method"),
        ({"grid": {"sparsities": [1.0]}}, "[0, 1)"),
        ({"grid": {"patterns": ["4:4"]}}, "0 < N < M"),
        ({"grid": {"methods": ["dense"]}}, "dense_baseline"),
        ({"grid": {"calib_langs": ["sw", "sw"]}}, "same cell twice"),
        ({"grid": {"seeds": []}}, "non-empty list"),
        ({"eval": {"langs": ["sw"], "max_docs": 0}}, "--max-docs"),
    ):
        with pytest.raises(CpsError, match=message.replace("[", r"\[").replace(")", r"\)")):
            parse_study(bad)


def test_shipped_studies_parse():
    demo = load_study(REPO / "studies" / "demo.toml")
    assert demo.grids[0].models == ("gemma3-270m",)
    assert set(demo.grids[0].calib_langs) == {"ar", "de", "en", "es", "ru", "sw", "zh"}
    assert len(demo.cells) == 1 + 2 * 7 and demo.analyses[0].activations
    paper = load_study(REPO / "studies" / "paper.toml")
    assert set(paper.grids[0].models) == {"llama3", "aya23"} and paper.grids[0].seeds == (0, 42, 1234)
    assert set(paper.grids[0].patterns) == {"unstructured", "2:4"}
    assert len(paper.cells) == 2 * (1 + 2 * 2 * 7 * 3)
    assert {c.prune.calibration.nsamples for c in paper.cells if c.prune.calibration} == {512}
    methods = load_study(REPO / "studies" / "methods.toml")
    # 3 methods x (3 targets uniform + 2 with OWL: none at 2:4) + wanda, ria x DSnoT x 2 + shortgpt
    # x 3 shares, over 3 languages; then recipes (2) and self-generated (3 languages) for wanda and
    # sparsegpt, uniform and OWL at 50%; one dense cell
    assert len(methods.cells) == 1 + 3 * (3 * 5 + 2 * 2 + 3) + 2 * 2 * 2 + 3 * 2 * 2
    variants = {cell.prune.variant for cell in methods.cells}
    assert variants == {"dense", "wanda", "wanda+owl", "sparsegpt", "sparsegpt+owl", "ria", "ria+owl",
                        "wanda+dsnot", "ria+dsnot", "shortgpt"}  # fmt: skip
    assert not any(c.prune.allocation == "owl" and c.prune.pattern == "2:4" for c in methods.cells)
    assert {c.prune.calibration.corpus for c in methods.cells if c.prune.calibration} == {"ntrex", "self"}


def test_the_paper_study_dry_run_lists_its_tasks_and_cost(tmp_path, corpora, monkeypatch):
    """On a data dir without MKQA and no network: the dry run plans without reading task data, and
    says where each family's data will come from."""
    from typer.testing import CliRunner

    from cps.cli import app
    from cps.data import mkqa
    from cps.evaluation.tasks import task_data
    from cps.study import check_inputs, estimate_gpu_hours

    for corpus in ("flores", "ntrex", "xcopa"):  # the shared corpora: no mkqa/ among them
        (tmp_path / corpus).symlink_to(corpora / corpus)

    def no_download(*args, **kwargs):
        raise AssertionError("a dry run read MKQA")

    monkeypatch.setattr(mkqa, "_official_file", no_download)
    paper = load_study(REPO / "studies" / "paper.toml", str(tmp_path))
    tasks = check_inputs(paper, read_tasks=False)  # offline: lm-eval task names from its index
    families = ("belebele", "mmlu", "arc", "hellaswag", "mkqa")
    expected = {f"{f}_{lang}" for f in families for lang in paper.evaluate.langs}
    assert set(tasks) == expected - {"arc_sw", "hellaswag_sw", "hellaswag_zh", "mkqa_sw"}
    sources = {data.family: data for data in task_data(tasks, str(tmp_path))}
    assert sources["mkqa"].here is False and mkqa.OFFICIAL_URL in sources["mkqa"].source
    assert sources["belebele"].here is None and "belebele_swh_Latn" in sources["belebele"].source
    estimate = estimate_gpu_hours(paper, tasks)
    # by hand: per cell ~93M evaluation tokens (MMLU dominates) at 2 x 8.03e9 FLOPs / 400 TFLOP/s
    assert estimate.cells == 170 and 150 < estimate.gpu_hours < 220
    argv = ["sweep", str(REPO / "studies" / "paper.toml"), "--dry-run", "--data-dir", str(tmp_path)]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "no task for arc_sw, hellaswag_sw, hellaswag_zh, mkqa_sw: left out (skip_missing)" in result.output
    assert "mkqa (6 tasks)" in result.output and "[NOT HERE]" in result.output
    assert "170 of 170 cells to run" in result.output


def test_sweep_skips_done_cells_and_reruns_a_crashed_one(tmp_path, store, monkeypatch):
    study = load_study(tiny_study(tmp_path, langs=("sw", "zh", "ru"), dense=True, analyze=True))
    real_eval = sweep_stage.run_eval

    def crash_on_zh(config, store_, run_id, loaded=None):
        if tracking.get_run(store_, run_id).params.get("calib_lang") == "zh":
            raise RuntimeError("simulated crash")
        return real_eval(config, store_, run_id, loaded)

    monkeypatch.setattr(sweep_stage, "run_eval", crash_on_zh)
    first = run_sweep(study, store)
    assert [o.plan.cell.key.get("calib_lang") for o in first.failed] == ["zh"]
    assert "simulated crash" in first.failed[0].error
    runs = tracking.find_runs(store, "prune", status=None)
    assert sorted(r.status for r in runs) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert len(first.analysis_run_ids) == 1  # sw + ru still form a group
    parent = tracking.get_run(store, first.parent_run_id)
    assert parent.stage == "sweep" and parent.metrics["cells.failed"] == 1
    # where the time went: each finished cell's prune + eval is its whole time; the crashed cell has
    # no evaluation time; the parent's split adds up to the sweep's time
    cells = pl.read_parquet(tracking.local_artifact_dir(store, first.parent_run_id, "cells.parquet"))
    done = cells.filter(pl.col("error").is_null())
    assert len(done) == 3 and (done["eval_s"] > 0).all() and (done["prune_s"] > 0).all()
    assert (done["prune_s"] + done["eval_s"] - done["seconds"]).abs().max() < 1e-9
    assert cells.filter(pl.col("error").is_not_null())["eval_s"].to_list() == [None]
    split = first.time_split()
    assert split["eval"] == pytest.approx(done["eval_s"].sum()) == parent.metrics["time.eval_s"]
    assert split["analyses"] > 0 and sum(split.values()) == pytest.approx(first.seconds)
    assert all(r.tags["mlflow.parentRunId"] == first.parent_run_id for r in runs)
    calibrations = tracking.find_runs(store, "calibrate")  # nested under the sweep too (MLflow UI)
    assert len(calibrations) == 3
    assert all(r.tags["mlflow.parentRunId"] == first.parent_run_id for r in calibrations)

    monkeypatch.setattr(sweep_stage, "run_eval", real_eval)
    actions = {p.cell.key["calib_lang"]: p.action for p in plan_cells(study, store)}
    assert actions == {"none": "done", "sw": "done", "zh": "rerun", "ru": "done"}
    second = run_sweep(study, store)
    assert second.parent_run_id == first.parent_run_id  # the same study resumes its parent run
    assert [o.plan.cell.key.get("calib_lang") for o in second.outcomes] == ["zh"] and not second.failed
    finished = tracking.find_runs(store, "prune")
    assert len(finished) == 4 and len({r.params["calib_lang"] for r in finished}) == 4
    assert len(second.analysis_run_ids) == 1  # the group changed (zh joined): analysed again
    third = run_sweep(study, store)
    assert third.outcomes == [] and third.analysis_run_ids == [] and third.skipped_analyses == 1


def test_a_finished_run_without_the_evaluation_is_only_evaluated(tmp_path, store, monkeypatch):
    from cps.stages.prune import run_prune

    study = load_study(tiny_study(tmp_path, langs=("sw",)))
    (cell,) = study.cells
    pruned = run_prune(cell.prune, store)  # e.g. a plain `cps prune` with the same settings
    (plan,) = plan_cells(study, store)
    assert plan.action == "evaluate" and plan.run_id == pruned.run_id
    result = run_sweep(study, store, local_executor)
    assert result.outcomes[0].run_id == pruned.run_id
    assert len(tracking.find_runs(store, "prune")) == 1
    record = tracking.get_run(store, pruned.run_id)
    assert "ppl.sw" in record.metrics and "snr_db.sw" in record.metrics
    assert tracking.local_artifact_dir(store, pruned.run_id, "items/ppl_sw.parquet").is_file()
    assert plan_cells(study, store)[0].action == "done"
    # runs evaluated under an older protocol are evaluated again, never mixed into one report
    monkeypatch.setattr(config_module, "PROTOCOL_VERSION", config_module.PROTOCOL_VERSION + 1)
    assert plan_cells(study, store)[0].action == "evaluate"


def _sweep_process(study: Path, store: tracking.Store) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cps", "sweep", str(study), "--tracking-uri", str(store.uri)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sweep_resumes_after_a_killed_cell(tmp_path, store):
    """SIGKILL mid-cell: the rerun ends the orphaned run FAILED and runs only what is missing."""
    path = tiny_study(tmp_path, name="killed", langs=("sw", "zh", "ru", "es"), nsamples=64)
    study = load_study(path)
    tracking.experiment_id(store)
    process = _sweep_process(path, store)
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        finished = tracking.find_runs(store, "prune")
        running = tracking.find_runs(store, "prune", status="RUNNING")
        if finished and running:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            killed = running[0].run_id
            break
        time.sleep(0.1)
    assert killed is not None, "the sweep never was between cells"
    assert tracking.get_run(store, killed).status == "RUNNING"  # SIGKILL leaves it RUNNING
    done_before = {r.run_id for r in tracking.find_runs(store, "prune")}
    dry = subprocess.run(
        [sys.executable, "-m", "cps", "sweep", str(path), "--dry-run", "--tracking-uri", str(store.uri)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0 and f"{4 - len(done_before)} of 4 cells to run" in dry.stdout
    rerun = _sweep_process(path, store)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert re.search(r"^time: prune [\d.]+ min, eval [\d.]+ min \(\d cells, [\d.]+ s each\)", output, re.M)
    assert tracking.get_run(store, killed).status == "FAILED"
    finished = tracking.find_runs(store, "prune")
    assert len(finished) == 4  # no duplicate finished runs
    assert sorted(r.params["calib_lang"] for r in finished) == ["es", "ru", "sw", "zh"]
    assert done_before <= {r.run_id for r in finished}  # finished cells were skipped, not redone
    new = {r.run_id for r in finished} - done_before
    assert len(new) == 4 - len(done_before)
    sweeps = tracking.find_runs(store, "sweep", status=None)
    assert len(sweeps) == 1 and sweeps[0].status == "FINISHED"  # the killed parent resumed and ended
    assert all(plan.action == "done" for plan in plan_cells(study, store))


@pytest.mark.slow  # ~50 s: ClusterSession is tested without Ray by default (`make test-all`, CI)
def test_ray_executor_runs_a_two_cell_grid(tmp_path, store):
    needs_module("ray", "the [ray] extra is not installed")
    from cps.stages.sweep import ray_executor

    study = load_study(tiny_study(tmp_path, name="ray", langs=("sw", "zh"), tasks=("xcopa",)))
    result = run_sweep(study, store, ray_executor(cpus_per_cell=1))
    assert not result.failed and len(result.outcomes) == 2
    runs = tracking.find_runs(store, "prune")
    assert sorted(r.params["calib_lang"] for r in runs) == ["sw", "zh"]
    for run in runs:
        assert {"ppl.sw", "ppl.zh", "acc.xcopa_sw", "acc.xcopa_zh"} <= run.metrics.keys()
        assert run.tags["mlflow.parentRunId"] == result.parent_run_id
    pids = {r.tags["cps.pid"] for r in runs}
    assert str(__import__("os").getpid()) not in pids  # the cells ran in Ray workers


def test_kept_weights_load_exactly_and_serve_the_sweeps_analyses(tmp_path, store, monkeypatch):
    import torch

    from cps import runs
    from cps.config import CalibrationConfig, PruneConfig
    from cps.models import LoadOptions
    from cps.stages.prune import run_prune

    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)
    config = PruneConfig("tiny-llama", "sparsegpt", calibration, save_model=False)
    pruned = run_prune(config, store, keep_model=True)
    path = runs.keep_weights(pruned.run_id, pruned.model.model)
    record = tracking.get_run(store, pruned.run_id)
    kept = runs.load_run_model(store, record, LoadOptions())
    runs.drop_kept_weights([pruned.run_id])
    assert not path.exists()
    rebuilt = runs.load_run_model(store, record, LoadOptions())  # pruned again from the calibration run
    for name, weight in pruned.model.model.state_dict().items():
        assert torch.equal(kept.model.state_dict()[name], weight), name
        assert torch.equal(rebuilt.model.state_dict()[name], weight), name

    # In a sweep with activation analyses: SparseGPT cells keep their weights, the analyses load
    # them (never pruning again), and the sweep removes them afterwards.
    study = load_study(tiny_study(tmp_path, methods=("sparsegpt",), analyze=True, activations=True))
    kept_paths = []
    real_keep = sweep_stage.keep_weights
    monkeypatch.setattr(
        sweep_stage, "keep_weights", lambda *a: kept_paths.append(real_keep(*a)) or kept_paths[-1]
    )

    def no_rebuild(*args):
        raise AssertionError("the analyses pruned again instead of loading the kept weights")

    monkeypatch.setattr(runs, "_prune_again", no_rebuild)
    result = run_sweep(study, store)
    assert not result.failed and len(result.analysis_run_ids) == 1 and not result.analysis_errors
    assert len(kept_paths) == 2 and not any(p.exists() for p in kept_paths)


def test_a_sqlite_store_is_refused_for_a_cluster_of_several_nodes(tmp_path):
    from cps.stages.sweep import check_store_reach

    local = tracking.Store(f"sqlite:///{tmp_path}/mlflow.db")
    check_store_reach(local, nodes=1)  # one machine: fine
    with pytest.raises(CpsError, match=r"one machine's file.*MLflow server"):
        check_store_reach(local, nodes=3)
    with pytest.raises(CpsError, match="one machine's file"):
        check_store_reach(tracking.Store(str(tmp_path / "mlruns")), nodes=2)
    check_store_reach(tracking.Store("http://10.0.0.5:5000"), nodes=8)


def test_cluster_shape_sizes_cells_and_refuses_a_local_store_across_nodes(tmp_path, monkeypatch):
    from cps.stages.sweep import cluster_shape

    monkeypatch.chdir(tmp_path)
    relative = tracking.Store("sqlite:///mlruns/mlflow.db", "exp")
    server = tracking.Store("http://10.0.0.5:5000")
    gpus = cluster_shape(1, {"GPU": 2.0, "CPU": 16.0}, relative, cpus_per_cell=4, local=True)
    assert gpus.resources == {"num_gpus": 1} and gpus.keeps_weights
    # the cells get the store as this process sees it, whatever their working folder
    assert gpus.store == tracking.Store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "exp")
    cpus = cluster_shape(1, {"CPU": 16.0, "GPU": 0.0}, relative, cpus_per_cell=4, local=True)
    assert cpus.resources == {"num_cpus": 4}
    assert not cluster_shape(1, {"CPU": 8.0}, relative, 1, local=False).keeps_weights  # --address
    many = cluster_shape(3, {"CPU": 96.0}, server, 2, local=True)
    assert many.resources == {"num_cpus": 2} and not many.keeps_weights  # weights on other nodes
    with pytest.raises(CpsError, match=r"3 nodes but the tracking store .* one machine's file"):
        cluster_shape(3, {"CPU": 96.0}, relative, 2, local=False)


class _TaskError(Exception):
    """Ray's RayTaskError: the cell's own exception as `.cause`."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"task failed\n{cause!r}")
        self.cause = cause


class _FakeCluster:
    """A `ClusterBackend` without Ray: tasks end in the order `ends` gives (indices of submission);
    a result that is an exception is raised by `get`."""

    def __init__(
        self, results: list, ends: list[int], nodes: int = 1, gpus: float = 0.0, started: bool = True
    ):
        self.results, self.ends, self.nodes, self.gpus, self.started = results, ends, nodes, gpus, started
        self.local = True
        self.calls: list[str] = []
        self.submitted: list[tuple] = []
        self.resources: dict | None = None

    def init(self) -> bool:
        self.calls.append("init")
        return self.started

    def cluster(self) -> tuple[int, dict[str, float]]:
        return self.nodes, {"CPU": 8.0, "GPU": self.gpus}

    def remote(self, resources):
        self.resources = dict(resources)

        def submit(*args) -> int:
            self.submitted.append(args)
            return len(self.submitted) - 1

        return submit

    def wait(self, refs: list[int]) -> int:
        self.calls.append("wait")
        return next(ref for ref in self.ends if ref in refs)

    def get(self, ref: int):
        result = self.results[ref]
        if isinstance(result, Exception):
            raise result
        return result

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def _plans(tmp_path: Path) -> list[sweep_stage.CellPlan]:
    study = load_study(tiny_study(tmp_path, langs=("sw", "zh", "ru")))
    return [sweep_stage.CellPlan(cell, "run") for cell in study.cells]


def test_cluster_session_yields_each_cell_as_it_ends_without_ray(tmp_path, store):
    from cps.stages.sweep import ClusterSession

    plans = _plans(tmp_path)
    results = [
        ("run-sw", 5.0, 2.0),
        _TaskError(MemoryError("CUDA out of memory\nstack")),
        ("run-ru", 7.0, 3.0),
    ]
    cluster = _FakeCluster(results, ends=[2, 1, 0], gpus=4.0)
    outcomes = list(ClusterSession(cluster, cpus_per_cell=3).run(plans, store, {"cps.study": "x"}, keep=True))
    assert [o.plan for o in outcomes] == [plans[2], plans[1], plans[0]]  # in the order they ended
    assert [(o.run_id, o.seconds, o.eval_seconds, o.error) for o in outcomes[::2]] == [
        ("run-ru", 7.0, 3.0, None),
        ("run-sw", 5.0, 2.0, None),
    ]
    failed = outcomes[1]
    assert failed.run_id is None and failed.eval_seconds is None and failed.seconds >= 0
    assert failed.error == "MemoryError: CUDA out of memory"  # the cell's exception, first line
    assert cluster.resources == {"num_gpus": 1}
    assert [args[0] for args in cluster.submitted] == plans  # every cell submitted before any wait
    assert all(args[1:] == (store, {"cps.study": "x"}, 3, True) for args in cluster.submitted)
    assert cluster.calls == ["init", "wait", "wait", "wait", "shutdown"]

    # an error that wraps nothing is its own; a cluster this session did not start stays up
    cluster = _FakeCluster([RuntimeError("worker died")], ends=[0], started=False)
    (outcome,) = ClusterSession(cluster).run(plans[:1], store, {})
    assert outcome.error == "RuntimeError: worker died" and "shutdown" not in cluster.calls
    assert cluster.resources == {"num_cpus": 1} and cluster.submitted[0][-1] is False  # keep: not asked


def test_cluster_session_shuts_down_what_it_started_however_it_ends(tmp_path, store):
    from cps.stages.sweep import ClusterSession

    plans = _plans(tmp_path)
    refused = _FakeCluster([], ends=[], nodes=2)  # a SQLite store on two nodes
    with pytest.raises(CpsError, match="2 nodes"):
        list(ClusterSession(refused).run(plans, store, {}))
    assert refused.submitted == [] and refused.calls == ["init", "shutdown"]
    stopped = _FakeCluster([("a", 1.0, 0.5), ("b", 1.0, 0.5), ("c", 1.0, 0.5)], ends=[0, 1, 2])
    outcomes = ClusterSession(stopped).run(plans, store, {})
    assert next(outcomes).run_id == "a"
    outcomes.close()  # the consumer stopped early (Ctrl-C in the sweep's loop)
    assert stopped.calls == ["init", "wait", "shutdown"]


def test_ray_backend_starts_a_local_instance_or_says_it_cannot_reach_the_cluster(monkeypatch):
    """The adapter's calls, against a stand-in `ray` module."""
    import types

    from cps.stages.sweep import RayBackend

    calls: list[dict] = []
    state = {"initialized": False, "error": None}

    def init(**kwargs) -> None:
        calls.append(kwargs)
        if state["error"]:
            raise state["error"]

    fake = types.SimpleNamespace(init=init, is_initialized=lambda: state["initialized"])
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("CPS_DATA_DIR", "/data")
    monkeypatch.setenv("HF_HOME", "/hf")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert RayBackend().init() is True
    (local,) = calls
    assert local["address"] is None and local["_node_ip_address"] == "127.0.0.1"
    assert local["object_store_memory"] == 512 * 2**20 and not local["include_dashboard"]
    assert local["runtime_env"] == {
        "env_vars": {"CPS_DATA_DIR": "/data", "CPS_CACHE_DIR": ANY, "HF_HOME": "/hf"}
    }
    calls.clear()
    assert RayBackend("ray://head:10001").init() is True
    assert calls[0]["address"] == "ray://head:10001" and "_node_ip_address" not in calls[0]
    state["error"] = ConnectionError("could not connect to head:10001\ndetails")
    with pytest.raises(CpsError, match=r"^cannot reach the Ray cluster ray://head:10001: could not connect"):
        RayBackend("ray://head:10001").init()
    state["initialized"], calls[:] = True, []
    assert RayBackend().init() is False and calls == []  # already connected: used, never shut down
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(CpsError, match=r"needs Ray: pip install"):
        RayBackend().init()


def test_runs_logged_before_dtypes_were_resolved_still_count_as_done(tmp_path, store):
    """A store made before issue 25 logged `dtype=auto`: its finished cells are found (not pruned
    and evaluated again) and its dense run is reused, as pruned in memory on the CPU = float32."""
    from cps.config import EVAL_FINGERPRINT_TAG
    from cps.models import model_id, resolve_model
    from cps.runs import dense_run

    study = load_study(tiny_study(tmp_path, langs=("sw",), dense=True))
    assert {cell.key["dtype"] for cell in study.cells} == {"float32"}
    logged = {"model_id": model_id(resolve_model("tiny-llama")), "dtype": "auto"}  # as runs logged them
    old = {}
    for cell in study.cells:
        with tracking.start_run(store, "prune", {**cell.key, **logged}) as run:
            run.set_tags({EVAL_FINGERPRINT_TAG: study.evaluate.fingerprint()})
        old[cell.label] = run.run_id
    plans = plan_cells(study, store)
    assert [(plan.action, plan.run_id) for plan in plans] == [("done", old[p.cell.label]) for p in plans]
    dense = next(cell for cell in study.cells if cell.prune.method is None)
    assert dense_run(store, dense.prune.model, "float32") == old[dense.label]
    with tracking.start_run(store, "prune", {**dense.key, **logged}) as streamed:
        streamed.set_tags({"cps.streamed": True})  # its dtype is unknown: never taken for float32
    assert dense_run(store, dense.prune.model, "float32") == old[dense.label]


@pytest.mark.parametrize("name", ["demo", "findings"])
def test_every_shipped_study_plans(name):
    """Each study in studies/ passes the checks a sweep makes before any work (task data not read;
    paper.toml: test_the_paper_study_dry_run_lists_its_tasks_and_cost)."""
    from cps.study import check_inputs

    study = load_study(REPO / "studies" / f"{name}.toml")
    assert check_inputs(study, read_tasks=False)
