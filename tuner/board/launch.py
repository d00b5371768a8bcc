"""Launching runs from the board (`tuner board --allow-launch`): a built-in config with the form's edits, its
plan as `tuner check-config` prints it, and `tuner train` as a child process of the board.

    form_of(name)                   the form's fields with the config's values ("editable": False where the
                                    config has no such field, e.g. LoRA r on a full fine-tuning config)
    edited_config(name, values)     the built-in config with the edits applied, checked as --cfg-options are
    Launcher.start / stop / resume  tuner train in a new work dir under the first served folder; SIGTERM (the
                                    run saves a checkpoint); tuner train --resume auto with what it ran with

Only built-in configs are launched, by name: a client never names a file to run. The edited config is
written into the work dir as Python (config_writer.xtuner_text, the built-in library's own writer; every
edited value a literal), so the run can be read, diffed and resumed like any other: `tuner train
WORK_DIR/NAME.py --work-dir WORK_DIR`. launch.json beside it keeps the command for Resume; the child's output
goes to launch.log, which the page shows as it grows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import TunerError

LAUNCH_FILE = "launch.json"
LAUNCH_LOG = "launch.log"
MAX_LOG_BYTES = 256 << 10  # (one answer of /api/log: the page asks again from where it stopped)


@dataclass(frozen=True)
class Field:
    key: str  # section.field, as --cfg-options names it
    label: str
    kind: str  # text, number, bool, choice, lines (a list of text, one per line)


# The fields users edit most (the list, in the order of a config's PART 1).
FIELDS = [Field("model.path", "model path or hub id", "text"), Field("data.path", "data path", "text"),
          Field("data.format", "data format", "choice"), Field("data.template", "template", "text"),
          Field("data.max_length", "max_length", "number"), Field("data.pack", "pack to max_length", "bool"),
          Field("lora.r", "LoRA r", "number"), Field("lora.alpha", "LoRA alpha", "number"),
          Field("optim.lr", "learning rate", "number"), Field("train.max_epochs", "epochs", "number"),
          Field("train.max_steps", "max steps (empty: all)", "number"),
          Field("train.batch_size", "batch size", "number"),
          Field("train.accumulative_counts", "accumulation", "number"),
          Field("evaluate.inputs", "evaluation questions (one per line)", "lines")]
DEEPSPEED_CHOICES = ["", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                     "deepspeed_zero3_offload"]


def builtin_path(name) -> Path:
    from tuner.configs_index import builtin_configs

    configs = builtin_configs() if isinstance(name, str) else {}
    if name not in configs:
        raise TunerError(f"no built-in config named {name!r}", hint="pick one from the list (tuner list-cfg)")
    return configs[name]


def _single_source(cfg):
    """The one dataset of a config that names it in data.sources (the form's data fields edit it), or None."""
    sources = cfg.data.sources
    return sources[0] if sources and len(sources) == 1 and not cfg.data.path else None


def _target(cfg, key: str):
    """(the object holding the field, its name), or (None, why it cannot be edited here)."""
    section, _, name = key.partition(".")
    if section == "data" and name in ("path", "format"):
        if cfg.data.sources and len(cfg.data.sources) > 1:
            return None, "several datasets (data.sources): edit them in the config file"
        source = _single_source(cfg)
        if source is not None:
            return source, name
        if name == "format" and cfg.data.map_fn is not None:
            return None, "read by the config's own map_fn"
    target = getattr(cfg, section)
    if target is None:
        return None, f"this config has no {section} section"
    return target, name


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def form_of(name: str) -> dict:
    from typing import get_args, get_type_hints

    from tuner.config import DataConfig, load_config

    cfg = load_config(builtin_path(name))
    fields = []
    for f in FIELDS:
        target, attr = _target(cfg, f.key)
        entry = {"key": f.key, "label": f.label, "kind": f.kind, "editable": target is not None}
        if target is None:
            entry["why"] = attr
        else:
            value = getattr(target, attr)
            entry["value"] = "\n".join(value) if f.kind == "lines" else _shown(value)
        if f.key == "data.format":
            entry["choices"] = list(get_args(get_type_hints(DataConfig)["format"]))
        fields.append(entry)
    fields.append({"key": "deepspeed", "label": "DeepSpeed preset", "kind": "choice", "editable": True,
                   "value": "", "choices": DEEPSPEED_CHOICES})
    return {"name": name, "method": cfg.method, "fields": fields}


def _raw(value) -> str:
    """A form value as --cfg-options text: true/false for a checkbox, None for an emptied optional field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or (isinstance(value, str) and not value.strip()):
        return "None"
    if isinstance(value, (int, float, str)):
        return str(value).strip()
    raise TunerError(f"a form value must be text, a number or true/false, got {type(value).__name__}")


def edited_config(name: str, values: dict):
    """The built-in config `name` with the form's `values` ({section.field: value}) applied, each checked
    as --cfg-options checks it (its type, the section's rules, the config as a whole)."""
    import typing

    from tuner.config import check_types, load_config, parse_value

    if not isinstance(values, dict):
        raise TunerError("'values' must be an object of field: value")
    known = {f.key for f in FIELDS}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise TunerError(f"the form has no field {unknown[0]!r}; fields: {', '.join(sorted(known))}")
    cfg = load_config(builtin_path(name))
    kinds = {f.key: f.kind for f in FIELDS}
    for key, value in values.items():
        target, attr = _target(cfg, key)
        if kinds[key] == "lines":  # (one question per line: commas are part of a question)
            if not isinstance(value, str):
                raise TunerError(f"{key}: give the lines as one text")
            setattr(target, attr, [line.strip() for line in value.splitlines() if line.strip()])
            check_types(target)
            continue
        raw = _raw(value)
        if target is None:
            if raw == "None" or str(value) == "":
                continue
            raise TunerError(f"{key}: {attr}")
        try:
            parsed = parse_value(raw, typing.get_type_hints(type(target))[attr])
        except (ValueError, TunerError) as e:
            raise TunerError(f"{key}: {e}") from None
        if parsed == getattr(target, attr) or parsed == _shown(getattr(target, attr)):
            continue
        setattr(target, attr, parsed)
        try:
            check_types(target)
        except TunerError as e:
            raise TunerError(f"{key}: {e}") from None
    cfg.check_sections()
    if not cfg.data.path and not cfg.data.sources:
        raise TunerError("data.path: give the data to train on (a file, a folder or a hub dataset)")
    return cfg


def config_text(cfg, name: str, edits: list[str]) -> str:
    """The edited config as the built-in library writes configs (XTuner's shape), with a header saying
    where it came from and what was changed."""
    from tuner.config import SECTIONS
    from tuner.config_writer import xtuner_text

    header = [f"# Built-in config {name}, edited in tuner board on {time.strftime('%Y-%m-%d %H:%M')}."]
    header += [f"# Changed: {', '.join(edits)}"] if edits else ["# Nothing changed."]
    return xtuner_text(header, {s: getattr(cfg, s) for s in SECTIONS}, config_path=cfg.path,
                       hooks=cfg.custom_hooks)


def changes(name: str, cfg) -> list[str]:
    """'optim.lr 0.0002 -> 0.0001', ... : the form fields whose values differ from the built-in config's."""
    from tuner.config import load_config

    base = load_config(builtin_path(name))
    found = []
    for f in FIELDS:
        new_target, attr = _target(cfg, f.key)
        old_target, _ = _target(base, f.key)
        if new_target is None or old_target is None:
            continue
        old, new = getattr(old_target, attr), getattr(new_target, attr)
        if old != new:
            found.append(f"{f.key} {old!r} -> {new!r}")
    return found


class Launcher:
    """Runs started from the page: their processes, while the board serves (a run outlives the board:
    it is in its own session, and the board can resume it later from its checkpoint like any other)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.children: dict[Path, subprocess.Popen] = {}

    def new_work_dir(self, name: str) -> Path:
        for n in range(1, 1000):
            folder = self.root / (name if n == 1 else f"{name}-{n}")
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise TunerError(f"{self.root}: no free work dir name for {name}")

    def start(self, cfg, edits: list[str], deepspeed: str | None) -> Path:
        """Train `cfg` (edited_config's, its `edits` listed by changes()) in a new work dir."""
        from tuner.engine.checkpoint import atomic_write_text

        if deepspeed not in DEEPSPEED_CHOICES and deepspeed is not None:
            raise TunerError(f"deepspeed: {deepspeed!r} is not a preset ({', '.join(DEEPSPEED_CHOICES[1:])})")
        name = cfg.name
        text = config_text(cfg, name, edits)
        work_dir = self.new_work_dir(name)
        config_file = work_dir / f"{name}.py"
        atomic_write_text(config_file, text)
        command = ["train", str(config_file), "--work-dir", str(work_dir)] + (
            ["--deepspeed", deepspeed] if deepspeed else [])
        atomic_write_text(work_dir / LAUNCH_FILE, json.dumps({"command": command, "config": name}, indent=1) + "\n")
        self._spawn(work_dir, command)
        return work_dir

    def resume(self, work_dir: Path, config: str | None) -> None:
        """tuner train --resume auto with the command the run was started with (launch.json), or its config
        copy in the work dir (tuner train writes NAME.py there) for a run started elsewhere."""
        from tuner.engine.checkpoint import checkpoints_in

        if self.running(work_dir):
            raise TunerError("this run is still running")
        if not checkpoints_in(work_dir):
            raise TunerError(f"{work_dir} has no checkpoint to resume from")
        try:
            command = json.loads((work_dir / LAUNCH_FILE).read_text(encoding="utf-8"))["command"]
        except (OSError, ValueError, KeyError):
            copy = work_dir / f"{config}.py" if config else None
            if copy is None or not copy.is_file():
                raise TunerError(f"{work_dir}: neither {LAUNCH_FILE} nor the config copy {config}.py to resume "
                                 "with") from None
            command = ["train", str(copy), "--work-dir", str(work_dir)]
        if not (isinstance(command, list) and command[:1] == ["train"] and all(isinstance(c, str) for c in command)):
            raise TunerError(f"{work_dir / LAUNCH_FILE}: not a tuner train command")
        self._spawn(work_dir, [c for c in command if c != "--resume"] + ["--resume", "auto"])

    def _spawn(self, work_dir: Path, command: list[str]) -> None:
        with open(work_dir / LAUNCH_LOG, "ab") as log:
            log.write(f"$ tuner {' '.join(command)}\n".encode())
            log.flush()
            # Its own session: Ctrl-C on the board does not stop it, and Stop reaches all its processes.
            self.children[work_dir] = subprocess.Popen(
                [sys.executable, "-m", "tuner", *command], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def running(self, work_dir: Path) -> bool:
        child = self.children.get(work_dir)
        return child is not None and child.poll() is None

    def stop(self, work_dir: Path) -> None:
        child = self.children.get(work_dir)
        if child is None or child.poll() is not None:
            raise TunerError("this run is not running from this board (Stop reaches the runs it started)")
        os.killpg(child.pid, signal.SIGTERM)  # (tuner train saves a checkpoint and says "stopped")

    def exit_code(self, work_dir: Path) -> int | None:
        child = self.children.get(work_dir)
        return None if child is None else child.poll()


def read_log(work_dir: Path, offset: int) -> dict:
    """launch.log from `offset` (the page asks again from 'next')."""
    path = work_dir / LAUNCH_LOG
    try:
        with open(path, "rb") as f:
            f.seek(max(0, offset))
            data = f.read(MAX_LOG_BYTES)
    except OSError:
        return {"text": "", "next": 0, "exists": False}
    return {"text": data.decode("utf-8", errors="replace"), "next": max(0, offset) + len(data), "exists": True}
