"""A work dir's run folders, read as one run, and run.json in each of them.

A work dir (tuner train --work-dir) holds one run folder per start or resume (TIMESTAMP/, its log and
vis_data/scalars.json: one JSON line per step). Together they are one run: a resume's steps follow the
earlier ones (a resume from an earlier checkpoint replaces the steps after it), and the steps where it
resumed are kept to be marked (read_points).

run.json says what the run is and how it stands, for `tuner board` and scripts (no log parsing): written
when training starts and when it ends (finished, stopped by a signal with a checkpoint, crashed with the
error), never half-written (a temporary name, then renamed):

    {"state": "running", "config": "NAME", "config_path": "...", "model": "...", "method": "LoRA · DPO",
     "total_steps": 120, "start_step": 0, "pid": 1234, "host": "...", "started": 1733234567.1,
     "ended": null, "checkpoint": null, "error": null}

A run killed outright (SIGKILL, out of memory) cannot write its end: it stays "running" with a process
that is gone, which the board's reader (tuner/board/runs.py) reports as crashed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "run.json"
SCALARS = Path("vis_data") / "scalars.json"
RUN_FOLDER = re.compile(r"^\d{8}_\d{6}")  # (the run folders' time stamps: 20261203_154201)


def describe_method(cfg) -> str:
    """'LoRA', 'QLoRA · DPO', 'full · GRPO', 'LoRA · LLaVA', ..."""
    parts = [{"full": "full", "lora": "LoRA", "qlora": "QLoRA"}.get(cfg.method, cfg.method)]
    if cfg.preference is not None:
        parts.append("reward model" if cfg.preference.method == "reward" else cfg.preference.method.upper())
    if cfg.rl is not None:
        parts.append(cfg.rl.method.upper())
    if cfg.llava is not None:
        parts.append("LLaVA")
    return " · ".join(parts)


class RunState:
    def __init__(self, run_dir: Path, **fields):
        self.path = Path(run_dir) / STATE_FILE
        self.fields = {"state": "running", **fields, "pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.time(), "ended": None, "checkpoint": None, "error": None}

    def write(self, state: str | None = None, **changes) -> None:
        if state is not None:
            self.fields["state"] = state
            if state != "running":
                self.fields["ended"] = time.time()
        self.fields.update(changes)
        from tuner.engine.checkpoint import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps(self.fields, indent=1) + "\n")
        except OSError:  # (a full disk must not turn a finished run into a failed one)
            pass


@dataclass
class Points:
    rows: list[dict]  # one per step, in step order
    resumed_at: list[int]  # the first step of each resume
    skipped: int  # lines that were not JSON objects with a step (a half-written last line, say)


def run_folders(work_dir: Path) -> list[Path]:
    """The work dir's run folders, oldest first (their names are time stamps)."""
    try:
        children = sorted(p for p in work_dir.iterdir() if p.is_dir() and RUN_FOLDER.match(p.name))
    except OSError:
        return []
    return [p for p in children if (p / SCALARS).exists() or (p / STATE_FILE).exists()]


def read_points(work_dir: Path) -> Points:
    by_step: dict[int, dict] = {}
    resumed_at, skipped = [], 0
    for index, folder in enumerate(run_folders(work_dir)):
        first = None
        try:
            lines = (folder / SCALARS).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                skipped += 1
                continue
            if first is None:
                first = row["step"]
                if index:  # a resume: the steps it runs again replace the earlier ones
                    by_step = {s: r for s, r in by_step.items() if s < first}
                    resumed_at.append(first)
            by_step[row["step"]] = row
    return Points([by_step[s] for s in sorted(by_step)], resumed_at, skipped)
