"""The runs under some folders of work dirs, as `tuner board` shows them: what each is, how it stands, its
per-step figures. Read-only: only JSON and text files are read, nothing is executed.

A work dir (tuner train --work-dir, default work_dirs/CONFIG) holds one run folder per start or resume,
read as one run (tuner/engine/runstate.py: run.json, the steps, where it resumed).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuner.engine.runstate import SCALARS, STATE_FILE, read_points, run_folders

TOTAL_IN_LOG = re.compile(r"Iter\(train\) \[(\d+)/(\d+)\]")


@dataclass
class Run:
    id: str  # the work dir relative to the served root it is under, prefixed by that root's number
    work_dir: Path
    name: str  # the work dir's name
    config: str | None  # the config's name (the default work dir's name too)
    state: str  # running, finished, stopped (a checkpoint was saved), crashed
    model: str | None = None
    method: str | None = None
    steps: int = 0
    total: int | None = None
    last: dict = field(default_factory=dict)
    started: float | None = None
    updated: float | None = None
    elapsed: float = 0.0
    error: str | None = None
    checkpoint: str | None = None
    resumes: int = 0
    skipped: int = 0

    def summary(self) -> dict:
        remaining = None
        if self.state == "running" and self.total and self.last.get("step_time"):
            remaining = (self.total - self.steps) * self.last["step_time"]
        return {"id": self.id, "name": self.name, "config": self.config, "work_dir": str(self.work_dir),
                "state": self.state,
                "model": self.model, "method": self.method, "steps": self.steps, "total": self.total,
                "loss": self.last.get("loss"), "tokens_per_s": self.last.get("tokens_per_s"),
                "started": self.started, "updated": self.updated, "elapsed": self.elapsed, "remaining": remaining,
                "error": self.error, "checkpoint": self.checkpoint, "resumes": self.resumes,
                "skipped_lines": self.skipped}


def is_work_dir(folder: Path) -> bool:
    return bool(run_folders(folder))


def work_dirs(root: Path) -> tuple[list[Path], list[Path]]:
    """(the work dirs at `root` or one level below it, the folders below it that are not tuner runs)."""
    root = Path(root)
    if is_work_dir(root):
        return [root], []
    found, others = [], []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return [], []
    for child in children:
        (found if is_work_dir(child) else others).append(child)
    return found, others


def read_state(folder: Path) -> dict:
    """A run folder's run.json, or {} when it is missing or not a JSON object."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _total_from_log(folder: Path) -> int | None:
    totals = []
    for log in folder.glob("*.log"):
        try:
            text = log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        totals += [int(m.group(2)) for m in TOTAL_IN_LOG.finditer(text)]
    return totals[-1] if totals else None


def read_run(work_dir: Path, run_id: str) -> Run:
    folders = run_folders(work_dir)
    points = read_points(work_dir)
    segments = [read_state(f) for f in folders]  # (each run folder's run.json, oldest first)
    first, state = segments[0], segments[-1]
    last = points.rows[-1] if points.rows else {}
    steps = last.get("step", 0)
    total = state.get("total_steps") or _total_from_log(folders[-1])
    try:
        updated = max((f / SCALARS).stat().st_mtime for f in folders if (f / SCALARS).exists())
    except ValueError:
        updated = state.get("started")
    status, error = state.get("state"), state.get("error")
    if status == "running" and state.get("host") == socket.gethostname() and not _alive(state.get("pid")):
        status, error = "crashed", "the training process ended without saying how (killed, or out of memory?)"
    if status is None:  # a run written before run.json: judged from its steps and checkpoints
        if total and steps >= total:
            status = "finished"
        elif (work_dir / f"iter_{steps}.pth").exists():
            status = "stopped"
        elif updated and time.time() - updated < 120:
            status = "running"
        else:
            status = "crashed"
    elapsed = 0.0
    for index, segment in enumerate(segments):
        if segment.get("started"):
            end = segment.get("ended") or (updated if index == len(segments) - 1 else segment["started"])
            elapsed += max(0.0, (end or segment["started"]) - segment["started"])
    return Run(id=run_id, work_dir=work_dir, name=work_dir.name, config=first.get("config"), state=status,
               model=state.get("model") or first.get("model"), method=state.get("method") or first.get("method"),
               steps=steps, total=total, last=last, started=first.get("started"), updated=updated,
               elapsed=elapsed, error=error, checkpoint=state.get("checkpoint"), resumes=len(points.resumed_at),
               skipped=points.skipped)


class Runs:
    """The runs under the served roots, found again on every call (runs start and end while it serves)."""

    def __init__(self, roots: list[Path]):
        self.roots = [Path(r).resolve() for r in roots]

    def all(self) -> tuple[list[Run], list[str]]:
        runs, others = [], []
        for number, root in enumerate(self.roots):
            found, not_runs = work_dirs(root)
            for work_dir in found:
                relative = work_dir.relative_to(root).as_posix()
                runs.append(read_run(work_dir, f"{number}:{'' if relative == '.' else relative}"))
            others += [str(p) for p in not_runs]
        return runs, others

    def id_of(self, work_dir: Path) -> str:
        """The id of a work dir under a served root (the inverse of work_dir)."""
        work_dir = Path(work_dir).resolve()
        for number, root in enumerate(self.roots):
            if work_dir == root or root in work_dir.parents:
                relative = work_dir.relative_to(root).as_posix()
                return f"{number}:{'' if relative == '.' else relative}"
        raise ValueError(f"{work_dir} is not under a served folder")

    def work_dir(self, run_id: str) -> Path | None:
        """The work dir a run id names, only if it is a work dir inside a served root (ids come from clients)."""
        number, _, relative = run_id.partition(":")
        if not number.isdigit() or int(number) >= len(self.roots):
            return None
        root = self.roots[int(number)]
        folder = (root / relative).resolve() if relative else root
        if folder != root and root not in folder.parents:
            return None
        return folder if is_work_dir(folder) else None
