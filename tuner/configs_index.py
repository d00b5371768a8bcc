"""The built-in configs: find them by name, list them, copy them out."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from tuner.errors import TunerError


def builtin_configs() -> dict[str, Path]:
    """{config name: file} for every built-in config, sorted by name."""
    root = Path(str(resources.files("tuner.configs")))
    found = {p.stem: p for p in root.rglob("*.py") if not p.name.startswith("_")}
    return dict(sorted(found.items()))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to an existing file, or the name of a built-in config."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    configs = builtin_configs()
    if str(name_or_path) in configs:
        return configs[str(name_or_path)]
    if path.suffix == ".py" or "/" in str(name_or_path):
        raise TunerError(f"config file not found: {name_or_path}")
    close = [n for n in configs if str(name_or_path).lower() in n.lower()]
    hint = f"did you mean: {', '.join(close[:5])}" if close else "see `tuner list-cfg`"
    raise TunerError(f"no config file or built-in config named {name_or_path!r}", hint=hint)


def copy_config(name: str, dest_dir: str | Path) -> Path:
    """Write DEST_DIR/NAME_copy.py; never overwrite a file the user already has."""
    configs = builtin_configs()
    if name not in configs:
        raise TunerError(f"no built-in config named {name!r}", hint="see `tuner list-cfg`")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}_copy.py"
    if dest.exists():
        raise TunerError(f"{dest} already exists; not overwriting it")
    shutil.copyfile(configs[name], dest)
    return dest
