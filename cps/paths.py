"""Where cps reads data and keeps its caches: `--data-dir` > `CPS_DATA_DIR` > `./data`."""

from __future__ import annotations

import os
from pathlib import Path

from cps.errors import CpsError


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
