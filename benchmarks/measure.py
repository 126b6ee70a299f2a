"""Helpers the benchmark scripts share: a child process's wall time and peak memory, another commit's
cps side by side with this one, and the current process's peak memory per phase."""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Measured:
    seconds: float
    peak_gb: float  # ru_maxrss of the child alone, GiB (as cps's own peak_rss_gb)
    output: str
    returncode: int


def run_measured(command: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Measured:
    """Run `command`; its wall time and its own peak RSS (wait4 reports that child's usage only)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        sink.seek(0)
        output = sink.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    return Measured(seconds, usage.ru_maxrss / 2**20, output, process.returncode)


def checkout(commit: str) -> Path:
    """This repository's tree at `commit` in a temporary folder (kept for the process's life), to
    be put first on PYTHONPATH: the same interpreter and packages run that commit's cps."""
    folder = Path(tempfile.mkdtemp(prefix=f"cps-{commit[:8]}-"))
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(folder, filter="data")
    return folder


def environment(source: Path, cache: Path | None = None) -> dict[str, str]:
    """The environment that runs the cps found in `source`; with `cache`, a cps cache folder of its
    own that shares only the converted models (so neither side finds the other's cached results)."""
    env = dict(os.environ, PYTHONPATH=str(source))
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        shared = Path(os.environ.get("CPS_CACHE_DIR") or Path.home() / ".cache" / "cps").expanduser()
        for name in ("models", "tokenizers"):
            link = cache / name
            if (shared / name).is_dir() and not link.exists():
                link.symlink_to(shared / name)
        env["CPS_CACHE_DIR"] = str(cache)
    return env


def reset_peak() -> None:
    """Start a new peak RSS for this process (Linux: VmHWM, reset through /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_since_reset_gb() -> float:
    """This process's peak RSS since the last `reset_peak`, GiB."""
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["VmHWM"].split()[0]) / 2**20
