"""A team's setup for real: a throwaway PostgreSQL cluster on loopback, an `mlflow server` backed by
it, and a Ray sweep whose workers all write through the server — then a worker SIGKILLed mid-cell
and the rerun completing only the missing cell."""

from __future__ import annotations

import glob
import json
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import needs_module, unavailable

from cps import tracking
from cps.ui import wait_healthy

# 85-90 s alone on the 2-core machine: in the default suite it pushed `make test` to 7:56 of its
# 8-minute budget, so it runs with `make test-all`.
pytestmark = pytest.mark.slow

STUDY = """
[study]
name = "team"

[grid]
models = ["tiny-llama"]
methods = ["wanda"]
calib_langs = ["sw", "zh", "ru", "es"]
dense_baseline = false

[calibration]
nsamples = 32
seqlen = 128

[prune]
device = "cpu"
save_model = true

[eval]
langs = ["sw", "en"]
seqlen = 128
max_docs = 6
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own on a free loopback port; its URI; removed afterwards."""
    binaries = _postgres_bin()
    if binaries is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    needs_module("psycopg", "the [server] extra is not installed (psycopg)")
    home = Path(tempfile.mkdtemp(prefix="cps-pg-"))
    home.chmod(0o755)
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the cluster belongs to nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        run_as = ["runuser", "-u", "nobody", "--"]
    data, port = home / "data", _free_port()
    subprocess.run(
        [*run_as, str(binaries / "initdb"), "-D", str(data), "-U", "cps", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
    start = [*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "log")]
    subprocess.run([*start, "-w", "-t", "60", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://cps@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def server(postgres: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on loopback, PostgreSQL backend store, artifacts served from a folder."""
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres]
    command += ["--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=180)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        log.close()


def _sweep(study: Path, url: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "cps", "sweep", str(study), "--executor", "ray", "--tracking-uri", url]
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _ppl_from_items(store: tracking.Store, run_id: str, lang: str, scratch: Path) -> float:
    """Perplexity recomputed from the run's per-document results, downloaded through the server."""
    items = pl.read_parquet(tracking.download_artifact(store, run_id, f"items/ppl_{lang}.parquet", scratch))
    return math.exp(items["nll"].sum() / items["tokens"].sum())


def test_ray_sweep_through_an_mlflow_server_on_postgresql(server: str, tmp_path: Path):
    import mlflow

    study = tmp_path / "team.toml"
    study.write_text(STUDY)
    store = tracking.Store(server)
    tracking.experiment_id(store)
    sweep = _sweep(study, server)
    killed, deadline = None, time.monotonic() + 400
    while killed is None and time.monotonic() < deadline and sweep.poll() is None:
        running = tracking.find_runs(store, "prune", status="RUNNING")
        if running:  # a worker mid-cell: killed outright, as the OOM killer would
            os.kill(int(running[0].tags["cps.pid"]), signal.SIGKILL)
            killed = running[0]
        time.sleep(0.2)
    output = sweep.communicate(timeout=600)[0]
    assert killed is not None, output[-3000:]
    assert killed.tags["cps.pid"] != str(sweep.pid)  # the cell ran in a Ray worker, not the driver
    finished = tracking.find_runs(store, "prune")
    assert len(finished) == 3, output[-3000:]  # the three other cells went on
    assert killed.run_id not in {run.run_id for run in finished}

    rerun = _sweep(study, server)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert tracking.get_run(store, killed.run_id).status == "FAILED"  # ended by the rerun
    runs = tracking.find_runs(store, "prune", status=None)
    finished = [run for run in runs if run.status == "FINISHED"]
    assert sorted(run.params["calib_lang"] for run in finished) == ["es", "ru", "sw", "zh"]
    assert len(runs) == 5  # four finished cells and the killed one: no cell ran twice
    (sweep_run,) = tracking.find_runs(store, "sweep")
    assert sweep_run.metrics["cells.skipped"] == 3 and sweep_run.metrics["cells.finished"] == 1

    # params, metrics and artifacts, all read through the server
    expected = {}
    for run in finished:
        assert run.params["method"] == "wanda" and run.tags["mlflow.parentRunId"] == sweep_run.run_id
        for lang in ("sw", "en"):
            recomputed = _ppl_from_items(store, run.run_id, lang, tmp_path / "items")
            assert run.metrics[f"ppl.{lang}"] == pytest.approx(recomputed, rel=1e-9)
            expected[(run.params["calib_lang"], lang)] = recomputed
    options = [
        "--pivot",
        "eval_lang",
        "--metrics",
        "ppl",
        "--format",
        "csv",
        "--out",
        str(tmp_path / "report"),
    ]
    report = subprocess.run(
        [sys.executable, "-m", "cps", "report", "--tracking-uri", server, "--filter", "study=team", *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = pl.read_csv(next((tmp_path / "report").glob("*_ppl_by_calib_lang*.csv")))  # after the findings
    assert table.height == 4
    for row in table.iter_rows(named=True):
        for lang in ("sw", "en"):
            assert row[lang] == pytest.approx(expected[(row["calib_lang"], lang)], rel=1e-9)

    # the pruned model is an MLflow model on the server: loadable, and registrable
    mlflow.set_tracking_uri(server)
    version = mlflow.register_model(f"runs:/{finished[0].run_id}/model", "cps-tiny-wanda")
    assert version.version == "1" and version.run_id == finished[0].run_id
    pipeline = mlflow.transformers.load_model(f"models:/cps-tiny-wanda/{version.version}")
    assert pipeline.model.config.num_hidden_layers == 2
    calibrations = tracking.find_runs(store, "calibrate")
    assert len({run.params["calib_hash"] for run in calibrations}) == 4
    assert all(run.tags["mlflow.parentRunId"] == sweep_run.run_id for run in calibrations)
    inputs = tracking.client(store).get_run(finished[0].run_id).inputs.dataset_inputs
    assert {json.loads(i.dataset.profile).get("documents") for i in inputs} >= {6}
