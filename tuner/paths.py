"""Where tuner keeps what it caches (converted models, tokenized data, measured peaks): one root,
$TUNER_CACHE or ~/.cache/tuner."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TUNER_CACHE", Path.home() / ".cache" / "tuner"))


def file_stamps(folder: Path) -> list[str]:
    """'name:size:mtime_ns' of each file in `folder`, sorted: what keys a cache made from a model folder."""
    return [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir()) if f.is_file()]
