"""Checkpoints `iter_N.pth`: written to a temporary name and renamed, so a crash mid-save
never leaves a broken file, and `last_checkpoint` always names a complete one."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

from tuner.errors import TunerError

LAST = "last_checkpoint"


def _fsync_and_replace(tmp: Path, path: Path) -> None:
    """Rename a fully written file into place: its bytes reach the disk first (fsync), then the
    rename, then the folder's entry, so a power loss leaves the old file or the new one, never an empty one."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a filesystem that cannot open folders: the rename itself is still atomic
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        _fsync_and_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        _fsync_and_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_in(work_dir: Path) -> list[Path]:
    """iter_N.pth files, oldest step first."""
    found = [(int(m.group(1)), p) for p in work_dir.glob("iter_*.pth") if (m := re.fullmatch(r"iter_(\d+)\.pth", p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(work_dir: Path, step: int, state: dict, keep: int) -> Path:
    path = work_dir / f"iter_{step}.pth"
    atomic_save(state, path)
    atomic_write_text(work_dir / LAST, str(path.resolve()))
    if keep > 0:  # the newest `keep` stay; the one just written is always among them
        for old in checkpoints_in(work_dir)[:-keep]:
            old.unlink(missing_ok=True)
            shutil.rmtree(old.with_name(old.stem + "_deepspeed"), ignore_errors=True)
    return path


def find_resume(resume: str, work_dir: Path) -> Path | None:
    """--resume PATH, or 'auto' = the work dir's last checkpoint (None when there is none)."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise TunerError(f"checkpoint to resume from not found: {resume}")
        return path
    marker = work_dir / LAST
    if marker.is_file():
        path = Path(marker.read_text().strip())
        if path.is_file():
            return path
    existing = checkpoints_in(work_dir)
    return existing[-1] if existing else None


def load_checkpoint(path: Path) -> dict:
    from tuner.model.load import load_pth

    return load_pth(path)
