"""The C allocator of a CPU training process: glibc's malloc, mimalloc or jemalloc, preloaded when it starts.

Why: on CPU, torch takes every activation and gradient from the C library's malloc. glibc's malloc serves the
1-5 MB tensors of a training step from its heap and keeps what they free there, fragmented. Measured with
`qlora-lab bench` on the 2-core machine (SmolLM2-135M QLoRA, batch 8; benchmarks/README.md): 2,953 MiB peak RSS
with glibc vs 2,547 MiB with mimalloc, and mimalloc 12% faster; glibc with every tensor mmapped comes close to the
live peak (1.07x the estimate) but runs 1.5x slower (page faults). mimalloc and jemalloc reuse freed blocks by
size class.

An allocator must be in place before the process allocates anything, so ``qlora-lab train`` re-executes its own
command line once with ``LD_PRELOAD`` (:func:`exec_with`; only when the CLI is the program, not when called from
Python; processes it starts get the caller's environment back), the way torch's own CPU launcher does
(``python -m torch.backends.xeon.run_cpu --enable_jemalloc``). Not that launcher itself: it looks for
``libjemalloc.so``/``libtcmalloc.so`` under a fixed list of prefixes only (not pip packages, not Debian's multiarch
folder) and exists to pin cores for multi-instance inference.

``auto``: mimalloc (from the `cmeel-mimalloc` wheel: the ``mimalloc`` extra, which ``make install`` adds on machines
without a GPU driver) on Linux without a GPU driver; the system allocator elsewhere, and where it is not installed
(not measured on GPU machines, where the host allocator is not on the hot path).
"""

from __future__ import annotations

import ctypes.util
import functools
import json
import logging
import os
import re
import sys
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

ALLOCATORS = ("auto", "mimalloc", "jemalloc", "system")
_PRELOADABLE = ("mimalloc", "jemalloc")
# Set in the environment of the re-executed process (and its children): never re-execute twice.
GUARD = "QLORA_LAB_ALLOCATOR_PRELOADED"
_OVERRIDE = re.compile(r"^\+{0,2}allocator=(.*)$")
_MALLOC_LIB = re.compile(r"lib(tc|je|mi|hoard|sn)malloc")
# the caller's values of the variables the re-execution sets, restored in the re-executed process
_ORIGINAL = "QLORA_LAB_ALLOCATOR_ORIGINAL_ENV"
_INSTALL = {"mimalloc": "pip install 'qlora-lab[mimalloc]' (the cmeel-mimalloc wheel)",
            "jemalloc": "install your system's jemalloc package (Debian/Ubuntu: apt install libjemalloc2)"}


# Where a preloaded library may come from: this environment (sys.prefix: the venv, or a conda env when that is the
# interpreter's) and the dynamic loader's system folders. Nothing else (a CONDA_PREFIX or LD_LIBRARY_PATH of another
# environment, a user's folders): a library preloaded into every process of a run must be one this install chose.
SYSTEM_LIB_DIRS = (Path("/usr/local/lib"), Path("/usr/lib64"), Path("/usr/lib"), Path("/lib64"), Path("/lib"))


def _in_allowed_dirs(path: Path) -> bool:
    real = path.resolve()
    return any(real.is_relative_to(d.resolve()) for d in (Path(sys.prefix), *SYSTEM_LIB_DIRS))


def is_cli_program(argv0: str | None = None) -> bool:
    """Whether this process is the qlora-lab CLI itself (the console script, or ``python -m qlora_lab``), not a
    wrapper script or another program that calls qlora_lab's functions: only the CLI may re-execute itself."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    path = Path(argv0)
    return path.name == "qlora-lab" or (path.name == "__main__.py" and path.parent.name == "qlora_lab")


@functools.lru_cache(maxsize=None)  # package metadata and folder scans: once per process
def library(name: str) -> str | None:
    """Path of the shared library of allocator ``name``, or None when it is not installed."""
    if name == "mimalloc":
        try:
            dist = metadata.distribution("cmeel-mimalloc")
        except metadata.PackageNotFoundError:
            return None
        files = sorted(str(dist.locate_file(f)) for f in dist.files or () if f.name.startswith("libmimalloc.so"))
        return next((f for f in files if Path(f).is_file() and _in_allowed_dirs(Path(f))), None)
    if name == "jemalloc":
        dirs = [Path(sys.prefix) / "lib", *SYSTEM_LIB_DIRS, *Path("/usr/lib").glob("*-linux-gnu")]
        for d in dirs:
            for lib in sorted(d.glob("libjemalloc.so*")):
                if lib.is_file():
                    return str(lib)
        return ctypes.util.find_library("jemalloc")  # a soname the dynamic loader resolves itself
    return None


def _gpu_driver() -> bool:
    """A cheap check for a GPU driver, NVIDIA or ROCm (no torch import: this runs before the re-execution)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists()


def auto_lacks_mimalloc() -> bool:
    """Whether ``auto`` would pick mimalloc here but the extra is not installed."""
    return sys.platform == "linux" and not _gpu_driver() and library("mimalloc") is None


def resolve(name: str) -> str:
    """The allocator ``name`` stands for on this machine ("auto" -> mimalloc / system)."""
    if name != "auto":
        return name
    if sys.platform != "linux" or _gpu_driver() or library("mimalloc") is None:
        return "system"
    return "mimalloc"


def active() -> str:
    """The allocator this process runs with, read from its mapped libraries (Linux); "system" otherwise."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in (*_PRELOADABLE, "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def requested(overrides: list[str]) -> str:
    """The allocator asked for on a command line of Hydra overrides (the last `allocator=` wins), else "auto"."""
    found = [m.group(1).strip("'\"") for m in map(_OVERRIDE.match, overrides) if m]
    return found[-1] if found else "auto"


def problem(name: str) -> str | None:
    """Why allocator ``name`` cannot be used here, as a message naming the fix; None when it can."""
    if name not in ALLOCATORS:
        return None  # the validator reports a bad choice
    resolved = resolve(name)
    if resolved == "system":
        return None
    if sys.platform != "linux":
        return f"allocator={name}: preloading an allocator needs Linux. Use allocator=system."
    if library(resolved) is None:
        return f"allocator={name}: {resolved} is not installed; {_INSTALL[resolved]}, or use allocator=auto."
    return None


def preload_env(name: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a new process that should run with allocator ``name`` (LD_PRELOAD set or cleared of ours)."""
    resolved = resolve(name)
    ours = {p for a in _PRELOADABLE if (p := library(a))}
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p not in ours]
    lib = library(resolved) if resolved != "system" else None
    out = {k: v for k, v in env.items() if k not in ("LD_PRELOAD", GUARD)}
    preload = ":".join([lib, *kept] if lib else kept)
    if preload:
        out["LD_PRELOAD"] = preload
    out[GUARD] = resolved
    if resolved == "mimalloc":
        # never hand freed pages back to the OS (a training step frees and reallocates the same sizes every step):
        # tokens/s of mimalloc over glibc in paired bench runs 1.22x and 1.04x with it, 0.85x and 0.92x with the
        # default 10 ms purge delay; +0.1 GiB peak RSS (benchmarks/README.md). A value the user set wins.
        out.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    return out


def _user_malloc(env: dict[str, str]) -> bool:
    """Whether LD_PRELOAD already names a malloc library (tcmalloc, jemalloc, mimalloc...): auto then leaves it."""
    return bool(_MALLOC_LIB.search(env.get("LD_PRELOAD", "")))


def exec_with(argv: list[str], entry_point: bool = True) -> None:
    """Re-execute this process's own command line with the allocator ``argv``'s overrides ask for, unless it runs
    with it already, was re-executed once already (then the caller's environment is restored, so that processes it
    starts — submitit/SLURM jobs, tools — do not inherit the preload), the allocator cannot be used (train's
    validator says why), ``auto`` meets an allocator the user preloaded, or the CLI was called from other Python
    code (``entry_point=False``: re-executing would replace the caller's process)."""
    if os.environ.get(GUARD):
        for key, value in json.loads(os.environ.pop(_ORIGINAL, "{}")).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return
    name = requested(argv)
    if (not entry_point or not is_cli_program() or name not in ALLOCATORS or problem(name) or resolve(name) == active()
            or (name == "auto" and _user_malloc(os.environ))):
        return
    env = preload_env(name, dict(os.environ))
    env[_ORIGINAL] = json.dumps({k: os.environ.get(k) for k in ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY", GUARD)})
    # the same command line, interpreter options and wrappers (python -X ..., -m cProfile ...) included
    command = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, "-m", "qlora_lab", *argv])[1:]]
    try:
        os.execve(sys.executable, command, env)
    except OSError:  # could not re-execute: go on with the allocator this process has (train logs which)
        return


def log_choice(requested: str) -> None:
    """Log the allocator this process runs with, and warn when it is not the one asked for."""
    want, have = resolve(requested), active()
    if want == have:
        log.info("C allocator: %s (allocator=%s)%s", have, requested,
                 "; pip install 'qlora-lab[mimalloc]' for mimalloc, less peak memory on CPU"
                 if requested == "auto" and auto_lacks_mimalloc() else "")
    else:
        log.warning("allocator=%s asks for %s but this process runs with %s: an allocator is chosen when a process "
                    "starts. `qlora-lab train` re-executes itself with the one given on its command line (not one "
                    "set in a config file); processes started otherwise (train() called from Python, submitit/SLURM "
                    "jobs) keep their own; LD_PRELOAD=%s sets it by hand.", requested, want, have,
                    library(want) or want)
