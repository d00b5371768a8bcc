"""Train on a CPU with jemalloc or tcmalloc where one is installed, instead of glibc's malloc.

A training step frees and reallocates gigabytes of activations. glibc's malloc keeps them in
fragmented heaps it does not give back, so the process's memory grows far past what is in
use: LoRA on SmolLM2-135M at 1 x 1024 tokens peaked at 3.99 GiB with glibc and 2.53 GiB with
jemalloc at the same speed (making glibc return memory, MALLOC_MMAP_THRESHOLD_, cost 35% of
the speed). A library can only be swapped before the process starts, so `tuner train`
starts itself again with LD_PRELOAD, as `python -m torch.backends.xeon.run_cpu` does.
TUNER_MALLOC=system keeps glibc's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# In order of preference; tcmalloc's "large alloc" reports are silenced below.
LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
             "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")}
SWITCHED = "TUNER_MALLOC_SWITCHED"  # set in the restarted process: never restart twice


def folders() -> list[Path]:
    found = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        found.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    machine = os.uname().machine
    return found + [Path(p) for p in (f"/usr/lib/{machine}-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
                                      "/usr/local/lib64")]


def find_library() -> tuple[str, Path] | None:
    """(name, path) of the first allocator library installed, or None."""
    for name, files in LIBRARIES.items():
        for folder in folders():
            for file in files:
                if (folder / file).is_file():
                    return name, folder / file
    return None


def in_use() -> str:
    """The allocator this process runs with: 'jemalloc', 'tcmalloc' or 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return next((name for name in LIBRARIES if name in maps), "glibc")


def restart_with_faster_allocator(argv: list[str]) -> None:
    """Replace this process by `python -m tuner argv` with jemalloc / tcmalloc preloaded, when
    on Linux, one is installed, none is in use and TUNER_MALLOC is not 'system'. Returns
    only when nothing is to be done."""
    if (not sys.platform.startswith("linux") or os.environ.get(SWITCHED)
            or os.environ.get("TUNER_MALLOC", "auto") == "system" or in_use() != "glibc"):
        return
    library = find_library()
    if library is None:
        return
    env = dict(os.environ, **{SWITCHED: library[0]})
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library[1]), os.environ.get("LD_PRELOAD")]))
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tuner", *argv], env)


def describe() -> str:
    name = in_use()
    if name != "glibc":
        return f"memory allocator {name}"
    hint = "" if os.environ.get("TUNER_MALLOC") == "system" else (
        " (install jemalloc, e.g. apt install libjemalloc2, for a lower peak memory on CPU)")
    return f"memory allocator glibc malloc{hint}"
