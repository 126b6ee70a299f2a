"""Where cps reads data and keeps its caches: `--data-dir` > `CPS_DATA_DIR` > `./data`."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from cps.errors import CpsError

log = logging.getLogger(__name__)


def data_dir(override: str | Path | None = None) -> Path:
    """The corpora root. Raises CpsError when the chosen folder does not exist."""
    if override:
        source, path = "--data-dir", Path(override)
    elif os.environ.get("CPS_DATA_DIR"):
        source, path = "CPS_DATA_DIR", Path(os.environ["CPS_DATA_DIR"])
    else:
        source, path = "default ./data", Path("data")
    path = path.expanduser()
    if not path.is_dir():
        raise CpsError(f"data dir {path} ({source}) does not exist; pass --data-dir or set CPS_DATA_DIR")
    return path.resolve()


def cache_dir() -> Path:
    """Converted models and calibration sets: `CPS_CACHE_DIR`, default `~/.cache/cps`."""
    return Path(os.environ.get("CPS_CACHE_DIR") or Path.home() / ".cache" / "cps").expanduser()


# ---------------------------------------------------------------------------------------------
# Cache entries shared by concurrent processes
#
# Every entry is written under a name no other process uses (`staging`), then renamed into place
# (`publish`): a reader sees no entry or a whole one. When two processes build the same entry the
# loser drops its copy and uses the winner's. A lock file serialises what cannot be made atomic
# (creating a SQLite store).


def staging(target: Path) -> Path:
    """A unique sibling name for building `target` (same folder, so the rename stays atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"


def publish(built: Path, target: Path) -> Path:
    """Rename `built` (a file or folder) to `target`; if another process published first, keep
    theirs and drop ours. Returns `target`."""
    try:
        os.replace(built, target) if built.is_file() else os.rename(built, target)
    except OSError:  # a folder onto an existing folder: somebody else won
        if not target.exists():
            raise
        shutil.rmtree(built, ignore_errors=True)
    return target


def discard(entry: Path, why: str) -> None:
    """Drop an unreadable cache entry, with one warning line, so that it is built again."""
    log.warning("cache entry %s is unreadable (%s); building it again", entry, why)
    remove(entry)


def remove(entry: Path) -> None:
    """Delete a cache entry (file or folder)."""
    if entry.is_dir():
        # Renamed away first: a concurrent reader never sees a half-deleted folder.
        away = staging(entry)
        with contextlib.suppress(OSError):
            os.rename(entry, away)
            shutil.rmtree(away, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held for the block; processes on
    one machine wait for each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
