"""The C allocator a training process starts with (qlora_lab/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_lab import allocator

ROOT = Path(__file__).resolve().parent.parent
needs_mimalloc = pytest.mark.skipif(sys.platform != "linux" or allocator.library("mimalloc") is None,
                                    reason="mimalloc (cmeel-mimalloc) is a dependency on Linux x86_64 only")


def _child_allocator(env: dict[str, str]) -> str:
    code = "from qlora_lab import allocator; print(allocator.active())"
    return subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, check=True, timeout=120).stdout.strip()


def test_requested_reads_the_last_allocator_override():
    assert allocator.requested(["model=tiny-random"]) == "auto"
    assert allocator.requested(["allocator=system", "x=1", "++allocator='jemalloc'"]) == "jemalloc"
    assert allocator.requested(["+allocator=mimalloc"]) == "mimalloc"
    assert allocator.requested(["bench.allocator=system"]) == "auto"  # another key


def test_unknown_or_missing_allocators_are_explained(monkeypatch):
    assert allocator.problem("system") is None
    assert allocator.problem("tcmalloc") is None  # not a choice: the validator names the choices
    monkeypatch.setattr(allocator, "library", lambda name: None)
    monkeypatch.setattr(allocator, "_cuda_driver", lambda: False)
    assert allocator.resolve("auto") == "system"  # nothing installed: auto falls back, no error
    assert allocator.problem("auto") is None
    msg = allocator.problem("jemalloc")
    assert msg and "libjemalloc2" in msg and "allocator=auto" in msg


def test_auto_is_system_where_a_cuda_driver_is(monkeypatch):
    monkeypatch.setattr(allocator, "_cuda_driver", lambda: True)
    assert allocator.resolve("auto") == "system"
    assert allocator.resolve("mimalloc") == "mimalloc"  # asked for by name: honoured


@needs_mimalloc
def test_preload_env_starts_a_process_with_the_allocator_and_system_clears_it():
    env = allocator.preload_env("mimalloc", dict(os.environ))
    assert env[allocator.GUARD] == "mimalloc" and allocator.library("mimalloc") in env["LD_PRELOAD"]
    assert _child_allocator(env) == "mimalloc"
    back = allocator.preload_env("system", {**env, "LD_PRELOAD": env["LD_PRELOAD"] + ":/other/lib.so"})
    assert back["LD_PRELOAD"] == "/other/lib.so"  # someone else's preload is kept, ours removed
    assert _child_allocator({k: v for k, v in back.items() if k != "LD_PRELOAD"}) == "system"


@needs_mimalloc
def test_the_cli_reexecutes_once_with_the_requested_allocator(tmp_path):
    """exec_with replaces the process (same pid) with one that has the allocator; the guard stops a second exec."""
    code = ("import os, sys; from qlora_lab import allocator; print(os.getpid(), allocator.active(), flush=True); "
            "allocator.exec_with(sys.argv[1:])")
    # the re-executed process runs `python -m qlora_lab ...`: stand in a module that prints the same line
    pkg = tmp_path / "qlora_lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"__path__.append({str(ROOT / 'qlora_lab')!r})\n")
    (pkg / "__main__.py").write_text(code.replace("; allocator.exec_with(sys.argv[1:])", "") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.GUARD)}
    out = subprocess.run([sys.executable, "-c", code, "train", "allocator=mimalloc"], cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    lines = out.stdout.split()
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(lines) == 4 and lines[0] == lines[2], out.stdout  # exec: same process
    assert lines[1] == "system" and lines[3] == "mimalloc"
