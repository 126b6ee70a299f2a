from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cps import tracking
from cps.errors import CpsError


def test_finished_run_reads_back(store):
    with tracking.start_run(store, "calibrate", {"model": "tiny-llama", "seqlen": 64}, "r1") as run:
        run.log_metrics({"calib.coverage": 0.25})
        run.log_series("snr_db", [1.0, 2.0, 3.0])
    record = tracking.get_run(store, run.run_id)
    assert record.status == "FINISHED" and record.stage == "calibrate"
    assert record.params["model"] == "tiny-llama" and record.params["seqlen"] == "64"
    assert record.params["cps_version"] and record.params["git_sha"]
    assert record.tags["cps.version.torch"].startswith("2.")
    assert record.metrics["calib.coverage"] == 0.25
    history = tracking.client(store).get_metric_history(run.run_id, "snr_db")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 2.0), (2, 3.0)]


def test_runs_never_stay_running(store):
    with pytest.raises(RuntimeError), tracking.start_run(store, "prune", {"a": 1}) as failed:
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), tracking.start_run(store, "prune", {"a": 2}) as killed:
        raise KeyboardInterrupt
    assert tracking.get_run(store, failed.run_id).status == "FAILED"
    assert tracking.get_run(store, killed.run_id).status == "KILLED"
    assert tracking.find_runs(store, status="RUNNING") == []


def _running_run(store, start_time: float | None = None, **tags: str) -> str:
    """A RUNNING run as another process would have left it (its tags as given)."""
    run = tracking.client(store).create_run(
        tracking.experiment_id(store),
        start_time=None if start_time is None else int(start_time * 1000),
        tags={tracking.STAGE_TAG: "prune", **tags},
    )
    return run.info.run_id


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_runs_of_this_host_and_of_other_hosts_end_failed(store):
    """This host: the pid decides. Another host (a Ray worker's node): its heartbeat, else its start."""
    host, grace = socket.gethostname(), tracking.STALE_AFTER_BEATS * tracking.HEARTBEAT_S
    long_ago, now = time.time() - 2 * grace, time.time()
    beat = tracking.HEARTBEAT_TAG
    silent = _running_run(store, **{"cps.host": "node-7", "cps.pid": "4242", beat: f"{long_ago:.3f}"})
    never_beat = _running_run(store, start_time=long_ago, **{"cps.host": "node-7", "cps.pid": "4243"})
    dead_here = _running_run(store, **{"cps.host": host, "cps.pid": str(_dead_pid()), beat: f"{now:.3f}"})
    beating = _running_run(store, **{"cps.host": "node-7", "cps.pid": "4244", beat: f"{now - grace / 2:.3f}"})
    just_started = _running_run(store, start_time=now, **{"cps.host": "node-7", "cps.pid": "4245"})
    alive_here = _running_run(
        store, **{"cps.host": host, "cps.pid": str(os.getpid()), beat: f"{long_ago:.3f}"}
    )
    not_ours = _running_run(store, start_time=long_ago)  # no cps.host: not a cps run

    assert sorted(tracking.fail_stale_runs(store)) == sorted([silent, never_beat, dead_here])
    for run_id in (silent, never_beat, dead_here):
        assert tracking.get_run(store, run_id).status == "FAILED"
    for run_id in (beating, just_started, alive_here, not_ours):
        assert tracking.get_run(store, run_id).status == "RUNNING"
    failure = tracking.get_run(store, silent).tags["cps.failure"]
    assert failure.startswith("process 4242 on node-7: no heartbeat for ") and "died" not in failure
    assert tracking.get_run(store, dead_here).tags["cps.failure"].endswith(f"on {host} died")
    assert tracking.fail_stale_runs(store) == []


def _heartbeat_threads(run_id: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"cps-heartbeat-{run_id}"]


def test_an_open_run_beats_until_it_ends(store, monkeypatch):
    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.05)
    with tracking.start_run(store, "prune", {}) as run:
        first = float(tracking.get_run(store, run.run_id).tags[tracking.HEARTBEAT_TAG])  # set at start
        (thread,) = _heartbeat_threads(run.run_id)
        assert thread.daemon  # never keeps the process alive
        deadline, beats = time.monotonic() + 10, {first}
        while len(beats) < 3 and time.monotonic() < deadline:
            beats.add(float(tracking.get_run(store, run.run_id).tags[tracking.HEARTBEAT_TAG]))
            time.sleep(0.02)
        assert len(beats) >= 3 and max(beats) > first  # refreshed, more than once
    assert _heartbeat_threads(run.run_id) == [] and not thread.is_alive()
    ended = tracking.get_run(store, run.run_id)
    time.sleep(0.3)  # six beats' time: nothing written after the end
    assert tracking.get_run(store, run.run_id).tags == ended.tags and ended.status == "FINISHED"
    # a resumed run beats again, from its resume on, and stops with it
    with tracking.resume_run(store, run.run_id):
        resumed = float(tracking.get_run(store, run.run_id).tags[tracking.HEARTBEAT_TAG])
        assert resumed > float(ended.tags[tracking.HEARTBEAT_TAG])
        assert len(_heartbeat_threads(run.run_id)) == 1
    assert _heartbeat_threads(run.run_id) == []


class _HeartbeatFails:
    """A client whose tag writes fail for the heartbeat only."""

    def __init__(self, real) -> None:
        self.real = real

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if any(tag.key == tracking.HEARTBEAT_TAG for tag in tags):
            raise OSError("database is locked")
        return self.real.log_batch(run_id, metrics=metrics, params=params, tags=tags)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_failing_heartbeat_never_ends_its_run(store, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.02)
    with caplog.at_level(logging.DEBUG, logger="cps.tracking"), tracking.start_run(store, "prune", {}) as run:
        run._client = _HeartbeatFails(run._client)
        deadline = time.monotonic() + 10
        while "database is locked" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        run.log_metrics({"still.writing": 1.0})
    record = tracking.get_run(store, run.run_id)
    assert record.status == "FINISHED" and record.metrics["still.writing"] == 1.0
    failed = [r for r in caplog.records if "heartbeat of run" in r.getMessage()]
    assert failed and {r.levelno for r in failed} == {logging.DEBUG}
    assert _heartbeat_threads(run.run_id) == []


def test_find_runs_filters_by_stage_params_and_status(store):
    for lang in ("sw", "en", "sw"):
        with tracking.start_run(store, "calibrate", {"calib_lang": lang}):
            pass
    with tracking.start_run(store, "prune", {"calib_lang": "sw"}):
        pass
    assert len(tracking.find_runs(store, "calibrate", {"calib_lang": "sw"})) == 2
    assert len(tracking.find_runs(store, params={"calib_lang": "sw"})) == 3
    assert tracking.find_runs(store, "calibrate", {"calib_lang": "zh"}) == []
    assert tracking.find_runs(tracking.Store(store.uri, "no-such-experiment")) == []


def test_frames_and_artifacts_round_trip(store, tmp_path):
    import polars as pl

    frame = pl.DataFrame({"layer": [0, 1], "snr_db": [10.5, 7.25]})
    with tracking.start_run(store, "prune", {}) as run:
        run.log_frame(frame, "layer_stats.parquet")
    path = tracking.download_artifact(store, run.run_id, "layer_stats.parquet", tmp_path)
    assert pl.read_parquet(path).equals(frame)
    with pytest.raises(CpsError, match="no artifact"):
        tracking.download_artifact(store, run.run_id, "missing.bin", tmp_path)


def test_unknown_run_id_is_a_user_error(store):
    with tracking.start_run(store, "calibrate", {}):
        pass
    with pytest.raises(CpsError, match="no run 'deadbeef'"):
        tracking.get_run(store, "deadbeef")


def test_unreachable_server_fails_fast():
    started = time.monotonic()
    with pytest.raises(CpsError, match="unreachable"):
        tracking.client(tracking.Store("http://127.0.0.1:9"))
    assert time.monotonic() - started < 10


def test_unreachable_database_fails_fast_without_printing_its_password():
    started = time.monotonic()
    with pytest.raises(CpsError, match="unreachable") as caught:
        tracking.client(tracking.Store("postgresql://team:s3cret@127.0.0.1:9/mlflow"))
    assert time.monotonic() - started < 10  # MLflow alone retries for minutes
    assert "s3cret" not in str(caught.value) and "team:***@" in str(caught.value)


def test_default_store_is_sqlite_under_mlruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.Store().resolved_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.Store().resolved_uri == "http://example:5000"
    assert tracking.Store("sqlite:////x/db").resolved_uri == "sqlite:////x/db"


def test_runs_follow_mlflow_conventions_datasets_and_a_transformers_model(store, tmp_path):
    """What the MLflow UI shows in its Dataset and Models columns, and what its loaders read."""
    import mlflow
    import mlflow.transformers
    import torch

    from cps.config import CalibrationConfig, EvalConfig, PruneConfig
    from cps.stages.evaluate import run_eval
    from cps.stages.prune import run_prune

    calibration = CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32)
    result = run_prune(PruneConfig("tiny-llama", "wanda", calibration), store, keep_model=True)
    run_eval(EvalConfig(langs=("sw", "zh"), tasks=(), seqlen=32, max_docs=2), store, result.run_id)
    mlflow_client = tracking.client(store)
    run = mlflow_client.get_run(result.run_id)
    inputs = {
        (i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
        for i in run.inputs.dataset_inputs
    }
    held_out = {name for name, _, context in inputs if context == "evaluation"}
    assert ("ntrex:sw", result.calib.calib_hash, "calibration") in inputs
    assert held_out == {"flores:sw", "flores:zh"}
    (calibrate,) = tracking.find_runs(store, "calibrate")
    (calib_input,) = mlflow_client.get_run(calibrate.run_id).inputs.dataset_inputs
    assert calib_input.dataset.digest == result.calib.calib_hash
    (output,) = run.outputs.model_outputs
    (logged,) = mlflow_client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.model_id == output.model_id and logged.source_run_id == result.run_id
    pipeline = mlflow.transformers.load_model(f"runs:/{result.run_id}/model")
    ids = result.calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(pipeline.model(ids).logits, result.model.model(ids).logits)
    folder = tracking.logged_model_folder(store, result.run_id, tmp_path)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_a_model_written_in_place_is_the_model_mlflows_log_model_writes(store):
    """`log_transformers_model` writes into a local store's folder what `mlflow.transformers.log_model`
    would copy there: the same files byte for byte, the same MLmodel but for the ids and times, a
    READY logged model linked to its run and to the run's metrics."""
    import mlflow
    import mlflow.transformers
    import yaml

    from cps.models import load_model

    loaded = load_model("tiny-llama")
    versions = tracking.library_tags()
    mlflow_client = tracking.client(store)
    folders, models = [], []
    for way in ("in place", "log_model"):
        with tracking.start_run(store, "prune", {"way": way}) as run:
            run.log_metrics({"sparsity.actual": 0.5, "time.prune_s": 1.0})
            if way == "in place":
                model_id = tracking.log_transformers_model(run, loaded.model, loaded.tokenizer)
            else:
                model_id = mlflow.transformers.log_model(
                    transformers_model={"model": loaded.model, "tokenizer": loaded.tokenizer},
                    name="model",
                    task="text-generation",
                    run_id=run.run_id,
                    pip_requirements=[
                        f"{p}=={versions[f'cps.version.{p}']}" for p in ("torch", "transformers")
                    ],
                ).model_id
        logged = mlflow_client.get_logged_model(model_id)
        assert logged.status.to_int() == mlflow.entities.LoggedModelStatus.READY.to_int()
        assert logged.source_run_id == run.run_id and logged.name == "model"
        (output,) = mlflow_client.get_run(run.run_id).outputs.model_outputs
        assert output.model_id == model_id
        models.append(logged)
        folders.append(Path(logged.artifact_location.removeprefix("file://")))
    assert (
        {m.key: m.value for m in models[0].metrics}
        == {m.key: m.value for m in models[1].metrics}
        == {
            "sparsity.actual": 0.5,
            "time.prune_s": 1.0,
        }
    )
    files = [sorted(p.relative_to(f).as_posix() for p in f.rglob("*") if p.is_file()) for f in folders]
    assert files[0] == files[1] and "model/model.safetensors" in files[0]
    for relative in files[0]:
        if relative != "MLmodel":
            assert (folders[0] / relative).read_bytes() == (folders[1] / relative).read_bytes(), relative
    described = [yaml.safe_load((f / "MLmodel").read_text()) for f in folders]
    varying = {"artifact_path", "model_id", "model_uuid", "run_id", "utc_time_created"}
    assert {k: v for k, v in described[0].items() if k not in varying} == {
        k: v for k, v in described[1].items() if k not in varying
    }
    assert described[0]["model_id"] == models[0].model_id


def test_a_model_that_fails_to_write_is_failed_and_leaves_no_files(store, monkeypatch):
    import mlflow
    import mlflow.transformers

    from cps.models import load_model

    def full_disk(**kwargs):
        Path(kwargs["path"], "model").mkdir(parents=True)
        Path(kwargs["path"], "model", "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(mlflow.transformers, "save_model", full_disk)
    loaded = load_model("tiny-llama")
    with pytest.raises(OSError), tracking.start_run(store, "prune", {}) as run:
        tracking.log_transformers_model(run, loaded.model, loaded.tokenizer)
    mlflow_client = tracking.client(store)
    (logged,) = mlflow_client.search_logged_models(experiment_ids=[tracking.experiment_id(store)])
    assert logged.status.to_int() == mlflow.entities.LoggedModelStatus.FAILED.to_int()
    assert not Path(logged.artifact_location.removeprefix("file://")).exists()
    assert mlflow_client.get_run(run.run_id).info.status == "FAILED"
