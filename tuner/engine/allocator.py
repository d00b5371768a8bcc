"""Train on a CPU with jemalloc or tcmalloc where one is installed, and with memory kept for reuse.

A training step frees and reallocates gigabytes of activations, and PyTorch has no cache of its
own for CPU memory: every tensor is a malloc and a free. Two costs follow.
- Pages handed back to the system are faulted in again, zeroed, by the next allocation: on the
  machine this was measured on, a fresh 190 MB tensor took 57 ms to fill and an existing one 10 ms.
  jemalloc purges allocations over 8 MB at once (its `oversize_threshold`) and glibc maps those
  over 32 MB afresh each time, so the logits, the MLP activations and their gradients paid it every
  step. Here jemalloc runs with MALLOC_CONF `oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1`
  (large allocations in the ordinary arenas, freed pages kept), and glibc, where no other library is
  installed, with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 4 GiB (everything from the
  heap, none of it returned). The peak memory stays what it was; the process keeps its peak.
- glibc's heap fragments: a freed chunk next to one held in its per-thread cache (tcache) or a fast
  bin is not merged with it, and the small allocations a step makes between its large ones keep the
  large holes apart, so a step's activations went above them: LoRA with checkpointing on SmolLM2
  spanned a 1.1 GiB heap for under 0.6 GiB in use. With both caches off (GLIBC_TUNABLES
  glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0) freed chunks merge at once: on an Intel AMX
  CPU, 2 rounds each, peak RSS 1.49-1.54 -> 1.28-1.29 GiB with checkpointing, 2.01-2.10 -> 1.87-1.88
  without, full fine-tuning 3.91-4.00 -> 3.77-3.83, QLoRA 3.32 -> 2.69, at the same tokens/s
  (QLoRA 385-395 -> 410-425). glibc.malloc.hugetlb=1 asks for transparent huge pages for the heap
  (where the kernel gives them on request, "madvise", as on the machine measured): after a slower
  first step (280-300 tokens/s instead of 480-500), 529 -> 558 and 575 -> 583 tokens/s without
  checkpointing, 433 -> 482 and 399 -> 436 with it, at the same peak. jemalloc peaks as low and ran
  8-10% faster than glibc without huge pages, so it stays preferred (with its own thp:always, no
  faster, 0.03-0.05 GiB higher).
LoRA on SmolLM2-135M, 1 x 1024 packed tokens, bf16, AVX-512 bf16 CPU, two rounds side by side
(tokens/s; peak RSS): glibc 552 / 522 (2.40 GiB), glibc kept 664 / 553 (2.44), jemalloc 636 / 579
(2.23), jemalloc kept 752 / 735 (2.24); in a later pair of rounds jemalloc 451 / 446 (2.11), kept
645 / 590 (2.28), glibc kept 535 (2.25). The opposite setting, glibc returning everything over
128 KB (MALLOC_MMAP_THRESHOLD_=131072), lowered the peak to 2.12 GiB at 239 / 249 tokens/s.
Full fine-tuning is the exception for jemalloc: kept, 324 tokens/s and 4.92 GiB against 362 and
3.54 as installed (glibc kept: 480, 3.72). With glibc's caches off and huge pages, side by side on
the Intel AMX machine (SmolLM2, 1 x 1024 tokens, bf16, two rounds): glibc 576 / 587 tokens/s at 3.75
GiB, jemalloc as installed 467 / 465 at 3.55 (kept: 416 at 6.46; 1 s decay: 431 at 3.52). So a full
fine-tune on a CPU takes glibc's settings even where jemalloc is installed: a quarter faster for 0.2
GiB more. (A jemalloc preloaded by the user is in use already and kept.)

A library can only be swapped, and glibc's settings only read, when the process starts, so
`tuner train` starts itself again with them, as `python -m torch.backends.xeon.run_cpu` does.
TUNER_MALLOC=glibc takes glibc with the settings above even where jemalloc is installed (what a
machine without it gets); TUNER_MALLOC=system keeps the process as started. A MALLOC_CONF or
glibc setting the user gave is kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# In order of preference; tcmalloc's "large alloc" reports are silenced below.
LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
             "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")}
SWITCHED = "TUNER_MALLOC_SWITCHED"  # set in the restarted process: never restart twice
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
                  "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0:glibc.malloc.hugetlb=1"}


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


def has_gpu() -> bool:
    """Whether an NVIDIA or AMD GPU is visible, without importing torch (this runs before the restart)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/kfd"))


def in_use() -> str:
    """The allocator this process runs with: 'jemalloc', 'tcmalloc' or 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return next((name for name in LIBRARIES if name in maps), "glibc")


def restart_with_faster_allocator(argv: list[str], lora: bool = True) -> None:
    """Replace this process by `python -m tuner argv` with the environment of restart_env, if any."""
    env = restart_env(lora)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "tuner", *argv], env)


def restart_env(lora: bool = True) -> dict | None:
    """The environment to start again with: jemalloc / tcmalloc preloaded, or glibc's settings above
    where none is installed (or TUNER_MALLOC=glibc); None when not on Linux, when the process does not
    run with glibc as started, or with TUNER_MALLOC=system. jemalloc keeps freed memory for LoRA and
    QLoRA runs; full fine-tuning on a CPU takes glibc's settings, faster than jemalloc either way (above)."""
    choice = os.environ.get("TUNER_MALLOC", "auto")
    if (not sys.platform.startswith("linux") or os.environ.get(SWITCHED) or choice == "system"
            or in_use() != "glibc"):
        return None
    library = find_library() if choice != "glibc" and (lora or has_gpu()) else None
    env = dict(os.environ)
    if library is None:
        if any(name in env for name in GLIBC_SETTINGS) or (has_gpu() and choice != "glibc"):
            return None  # the user's own settings; on a GPU machine, measured there first
        env.update(GLIBC_SETTINGS, **{SWITCHED: "glibc"})
        return env
    env[SWITCHED] = library[0]
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library[1]), os.environ.get("LD_PRELOAD")]))
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    if library[0] == "jemalloc" and lora and not has_gpu():  # (measured on CPU training only; a GPU machine's
        # full fine-tune keeps jemalloc as installed, as before: not measured there)
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def describe() -> str:
    name = in_use()
    if name == "jemalloc":
        kept = os.environ.get("MALLOC_CONF") == JEMALLOC_CONF
        return "memory allocator jemalloc" + (" (freed memory kept for reuse)" if kept else "")
    if name != "glibc":
        return f"memory allocator {name}"
    kept = all(os.environ.get(k) == v for k, v in GLIBC_SETTINGS.items())
    hint = "" if os.environ.get("TUNER_MALLOC") in ("system", "glibc") or find_library() else (
        "; install jemalloc, e.g. apt install libjemalloc2, for a lower peak memory on CPU")  # (installed: a full
    # fine-tune runs glibc on purpose)
    return "memory allocator glibc malloc" + (f" (freed memory kept for reuse, merged at once{hint})" if kept else
                                              f" ({hint[2:]})" if hint else "")
