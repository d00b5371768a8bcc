"""Where tuner keeps what it caches (converted models, tokenized data, measured peaks): one root,
$TUNER_CACHE or ~/.cache/tuner."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TUNER_CACHE", Path.home() / ".cache" / "tuner"))
