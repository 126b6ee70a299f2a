from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import chromium_page

from cps import tracking
from cps.errors import CpsError
from cps.notes import describe
from cps.ui import WORKFLOW, UiConfig, is_loopback, server_command


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_loopback_by_default_and_the_server_command(store):
    assert UiConfig().bind == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    command = server_command(store, UiConfig(port=5123))
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--backend-store-uri") + 1] == store.resolved_uri
    assert command[command.index("--default-artifact-root") + 1].endswith("/mlruns/artifacts")
    with pytest.raises(CpsError, match="already a server"):
        server_command(tracking.Store("http://127.0.0.1:5000"), UiConfig())
    with pytest.raises(CpsError, match="--port"):
        UiConfig(port=70000)


def test_ui_answers_health_on_loopback_and_stops_cleanly(store, tmp_path):
    """`cps ui` on a store: /health, the REST API finds the run, and in headless Chromium the
    experiment opens on its runs table (a model-training experiment, not MLflow 3's GenAI overview),
    the run's description on its page."""
    params = {"model": "tiny-llama", "nsamples": 4, "seqlen": 8}
    with tracking.start_run(store, "calibrate", params, "calib-ui-check") as run:
        run.log_metrics({"tokens": 1.0})
    note = describe(store, run.run_id)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cps", "ui", "--port", str(port), "--tracking-uri", str(store.uri)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and url not in line:
            assert process.poll() is None, process.communicate()
            line = process.stdout.readline()
        assert url in line, "cps ui never printed its URL"
        with urllib.request.urlopen(f"{url}/health", timeout=10) as reply:
            assert reply.status == 200 and reply.read().strip() == b"OK"
        # the UI reads this store: its REST API finds the run logged above
        with urllib.request.urlopen(
            f"{url}/api/2.0/mlflow/runs/get?run_id={run.run_id}", timeout=10
        ) as reply:
            assert run.run_id in reply.read().decode()
        assert f"{url}/#/experiments/{tracking.experiment_id(store)}?{WORKFLOW}" in line  # printed
        first_page, run_page = _browse(line.split()[-4], run.run_id, tmp_path, note)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0
    with socket.socket() as probe:  # the server and its workers are gone: the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    assert "Runs" in first_page and "calib-ui-check" in first_page, first_page[:400]
    assert "Traces\n0" not in first_page  # not the GenAI overview
    assert note in run_page


def _browse(address: str, run_id: str, folder, note: str) -> tuple[str, str]:
    """The text of the page `cps ui` prints and of the run's page (one click from it), read
    in headless Chromium once they show what is looked for (or after 30 s); screenshots stay in
    `folder` for a person to look at."""

    def settled(page, wanted: str) -> str:
        deadline = time.monotonic() + 30
        text = page.inner_text("body")
        while wanted not in text and time.monotonic() < deadline:
            page.wait_for_timeout(250)
            text = page.inner_text("body")
        return text

    with chromium_page() as page:
        page.goto(address, wait_until="load")
        first = settled(page, "calib-ui-check")
        page.screenshot(path=str(folder / "experiment.png"))
        page.goto(address.replace("?", f"/runs/{run_id}?"), wait_until="load")
        run_text = settled(page, note)
        page.screenshot(path=str(folder / "run.png"))
    return first, run_text


def test_ui_refuses_a_port_in_use(store):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cps", "ui", "--port", str(port), "--tracking-uri", str(store.uri)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2 and "in use" in result.stderr
    assert result.stderr.strip().count("\n") == 0
