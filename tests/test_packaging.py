"""What `pip install tuner` (a wheel, not this editable checkout) puts on a user's machine: every module and
every file the package reads at run time. An editable install finds any folder, so only a built wheel shows a
package left out of pyproject.toml (tuner.board was, and `tuner board` would not have started)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_config_and_data_file(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("tuner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    files = [p for p in (ROOT / "tuner").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    modules = {str(p.relative_to(ROOT)) for p in files if p.suffix == ".py"}
    # Pages, the charting library and its licence, the identity questions: read at run time through
    # importlib.resources, so each must lie in the wheel beside its package's modules.
    data = {str(p.relative_to(ROOT)) for p in files if p.suffix != ".py"}
    configs = {"tuner/configs/" + str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.py")}
    assert len(modules) > 90 and len(configs) > 500
    assert sorted(modules - names) == []
    assert sorted(configs - names) == []
    assert len(data) >= 7 and sorted(data - names) == []
    # Nothing of the checkout's own (tests, tools, caches) goes to users.
    assert not [n for n in names if n.startswith(("tests/", "tools/")) or "__pycache__" in n]
