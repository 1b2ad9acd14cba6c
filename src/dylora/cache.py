"""The one cache directory for fetched data and prepared models: $DYLORA_CACHE or ~/.cache/dylora."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DYLORA_CACHE"


def cache_dir() -> Path:
    """Return the cache root, creating it on demand."""
    path = Path(os.environ.get(CACHE_ENV) or "~/.cache/dylora").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
