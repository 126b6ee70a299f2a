"""`cps ui`: the MLflow UI for the project's tracking store, on the loopback interface by default."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from cps import tracking
from cps.errors import CpsError

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class UiConfig:
    port: int = 5000
    host: str | None = None  # None: the loopback interface; anything else must be asked for
    workers: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise CpsError(f"--port must be in 1..65535 (got {self.port})")
        if self.workers < 1:
            raise CpsError(f"--workers must be positive (got {self.workers})")

    @property
    def bind(self) -> str:
        return self.host or LOOPBACK


def server_command(store: tracking.Store, config: UiConfig) -> list[str]:
    uri = store.resolved_uri
    if uri.startswith(("http://", "https://")):
        raise CpsError(f"the tracking store is already a server: open {uri} in a browser")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    root = tracking.artifact_root(uri)
    if root:
        command += ["--default-artifact-root", root]
    command += ["--host", config.bind, "--port", str(config.port), "--workers", str(config.workers)]
    return command


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CpsError(f"the MLflow server exited with code {process.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise CpsError(f"the MLflow server did not answer {url}/health within {timeout:.0f} s")


# MLflow 3.17's UI shows the workflow its sidebar switch (or this URL parameter) names, GenAI by
# default (traces, token usage) whatever the experiment's kind tag says: cps runs are model training.
WORKFLOW = "workflowType=machine_learning"


def first_page(url: str, store: tracking.Store) -> str:
    """The page a user opens: the experiment's runs table (the experiments list where the store has
    no such experiment yet)."""
    experiment = tracking.experiment_id(store, create=False)
    return f"{url}/#/experiments/{experiment}?{WORKFLOW}" if experiment else f"{url}/#/?{WORKFLOW}"


def serve(store: tracking.Store, config: UiConfig, announce=print) -> int:
    """Start the server, print its URL once /health answers, and wait; Ctrl-C / SIGTERM stop it."""
    tracking.client(store)  # the store exists and is usable (migrated) before the server reads it
    if not _port_free(config.bind, config.port):
        raise CpsError(f"port {config.port} on {config.bind} is in use; pick another with --port")
    command = server_command(store, config)
    # Ctrl-C stops the UI even when started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    process = subprocess.Popen(command, start_new_session=True)
    host = f"[{config.bind}]" if ":" in config.bind else config.bind
    url = f"http://{host}:{config.port}"
    try:
        wait_healthy(url, process)
        announce(f"MLflow UI for {store.resolved_uri}: {first_page(url, store)}  (Ctrl-C stops it)")
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """End the server and its workers (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
