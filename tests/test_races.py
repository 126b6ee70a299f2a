"""Several cps processes on one machine: shared caches and a shared SQLite store, started for real
(processes, not threads), and cache entries found broken."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cps import tracking
from cps.config import CalibrationConfig
from cps.data.calibration import build_calibration
from cps.models import load_tokenizer, tiny_tokenizer_dir
from cps.paths import publish, staging

WORKERS = 4


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cps", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow  # ~45 s: four cps processes at once (`make test-all`, CI)
def test_workers_started_at_once_on_a_fresh_cache_and_store_all_succeed(tmp_path: Path):
    """Four prunes at once, each building the same tokenizer, calibration set and SQLite store."""
    env = dict(os.environ, CPS_CACHE_DIR=str(tmp_path / "cache"))  # nothing converted yet
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    common = ["--model", "tiny-llama", "--lang", "sw", "--nsamples", "4", "--seqlen", "64"]
    workers = [
        _start(["prune", *common, "--sparsity", str(s), "--tracking-uri", uri, "--no-save-model"], env)
        for s in (0.2, 0.3, 0.4, 0.5)
    ]
    outcomes = [worker.communicate(timeout=300) for worker in workers]
    failures = [err for worker, (_, err) in zip(workers, outcomes, strict=True) if worker.returncode]
    assert not failures, failures[0]
    assert not any("Traceback" in err for _, err in outcomes)
    runs = tracking.find_runs(tracking.Store(uri), "prune")
    assert sorted(run.params["sparsity"] for run in runs) == ["0.2", "0.3", "0.4", "0.5"]
    assert len({run.params["calib_hash"] for run in runs}) == 1
    cache = tmp_path / "cache"
    assert [p.name for p in (cache / "calibration").iterdir()] == [
        f"{runs[0].params['calib_hash']}.safetensors"
    ]
    entries = sorted(p.name for p in (cache / "tokenizers").iterdir())
    assert len(entries) == 2 and entries[0] == "cards"  # the tokenizer and its fingerprint, no leftovers
    assert len(list((cache / "tokenizers" / "cards").iterdir())) == 1


def test_new_sqlite_store_created_by_concurrent_processes(tmp_path: Path):
    """Only the store: four processes opening (and migrating) one new database at once."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    code = (
        "from cps import tracking; s = tracking.Store(" + repr(uri) + ", 'race');"
        "tracking.experiment_id(s); print('ok')"
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(WORKERS)
    ]
    outcomes = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * WORKERS, [err for _, err in outcomes]
    assert (tmp_path / "store" / "mlflow.db.lock").is_file()
    assert len(tracking.client(tracking.Store(uri)).search_experiments(filter_string="name = 'race'")) == 1


def test_truncated_calibration_entry_is_rebuilt_with_one_warning(tiny_tokenizer, caplog, capsys):
    config = CalibrationConfig(corpus="ntrex", lang="de", nsamples=3, seqlen=32, seed=11)
    first = build_calibration(config, tiny_tokenizer)
    path = first.cache_path
    path.write_bytes(path.read_bytes()[:50])  # a crash mid-write of an older cps, a full disk
    with caplog.at_level(logging.WARNING):
        again = build_calibration(config, tiny_tokenizer)
    assert not again.cache_hit and again.input_ids.equal(first.input_ids)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "unreadable" in warning.getMessage() and path.name in warning.getMessage()
    assert load_file(str(path))["input_ids"].equal(first.input_ids)  # a whole entry again
    assert build_calibration(config, tiny_tokenizer).cache_hit


def test_truncated_calibration_entry_through_the_cli(tiny_tokenizer, store):
    args = ["calibrate", "--model", "tiny-llama", "--lang", "es", "--nsamples", "2", "--seqlen", "32"]
    args += ["--tracking-uri", store.uri]
    config = CalibrationConfig(corpus="ntrex", lang="es", nsamples=2, seqlen=32)
    path = build_calibration(config, tiny_tokenizer).cache_path
    path.write_bytes(path.read_bytes()[:-9])
    out, err = _start(args, dict(os.environ)).communicate(timeout=120)
    assert "Traceback" not in err and "unreadable" in err, (out, err)
    (run,) = tracking.find_runs(store, "calibrate")
    assert path.name == f"{run.params['calib_hash']}.safetensors"
    assert load_file(str(path))["input_ids"].shape == (2, 32)


def test_unreadable_tokenizer_folder_is_rebuilt(monkeypatch, tmp_path: Path, caplog):
    monkeypatch.setenv("CPS_CACHE_DIR", str(tmp_path))
    folder = tiny_tokenizer_dir()
    (folder / "tokenizer.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        tokenizer = load_tokenizer("tiny-llama")
    assert len(tokenizer) == 49152
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_publish_keeps_the_first_folder_and_drops_the_losers(tmp_path: Path):
    target = tmp_path / "entry"
    built = []
    for content in ("first", "second"):
        folder = staging(target)
        folder.mkdir()
        (folder / "payload").write_text(content)
        built.append(folder)
    publish(built[0], target)
    publish(built[1], target)
    assert (target / "payload").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    with pytest.raises(FileNotFoundError):
        publish(tmp_path / "never-built", tmp_path / "other")
