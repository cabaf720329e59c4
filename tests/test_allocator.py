"""The C allocator a training process starts with (qlora_lab/cpu/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_lab.cpu import allocator

ROOT = Path(__file__).resolve().parent.parent
needs_mimalloc = pytest.mark.skipif(sys.platform != "linux" or allocator.library("mimalloc") is None,
                                    reason="mimalloc: the qlora-lab[mimalloc] extra, Linux x86_64 only")


def _child_allocator(env: dict[str, str]) -> str:
    code = "from qlora_lab.cpu import allocator; print(allocator.active())"
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
    monkeypatch.setattr(allocator, "_gpu_driver", lambda: False)
    assert allocator.resolve("auto") == "system"  # nothing installed: auto falls back, no error
    assert allocator.problem("auto") is None
    msg = allocator.problem("jemalloc")
    assert msg and "libjemalloc2" in msg and "allocator=auto" in msg
    assert "qlora-lab[mimalloc]" in allocator.problem("mimalloc")  # the extra that provides it
    assert allocator.auto_lacks_mimalloc() == (sys.platform == "linux")  # train logs that hint with auto


def test_mimalloc_is_an_extra_not_a_dependency():
    """Its `cmeel` dependency installs a start-up .pth that every interpreter of the environment runs."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("mimalloc" in d for d in project["dependencies"])
    assert any(d.startswith("cmeel-mimalloc") for d in project["optional-dependencies"]["mimalloc"])
    assert "'.[dev,mimalloc]'" in (ROOT / "Makefile").read_text()  # make install adds it where auto uses it


def test_auto_is_system_where_a_gpu_driver_is(monkeypatch):
    monkeypatch.setattr(allocator, "_gpu_driver", lambda: True)
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
@pytest.mark.integration  # CLI processes
def test_the_cli_reexecutes_its_command_line_once_and_hands_children_the_callers_environment():
    """exec_with replaces the process (same pid) by the same command line with the allocator; the re-executed process
    gets the caller's environment back (no preload for the processes it starts) and never re-executes again."""
    # argv[0] as the console script's: only the CLI itself re-executes (test below)
    code = ("import os, sys; from qlora_lab.cpu import allocator; print(os.getpid(), allocator.active(), flush=True); "
            "sys.argv[0] = '/venv/bin/qlora-lab'; allocator.exec_with(sys.argv[1:]); "
            "print('left', 'libmimalloc' in os.environ.get('LD_PRELOAD', ''), allocator.GUARD in os.environ)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.GUARD)}
    out = subprocess.run([sys.executable, "-c", code, "train", "allocator=mimalloc"],
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split() for line in out.stdout.splitlines()]
    assert len(lines) == 3, out.stdout
    (pid1, before), (pid2, after), left = lines
    assert pid1 == pid2 and (before, after) == ("system", "mimalloc")  # exec: the same process
    assert left == ["left", "False", "False"]


def test_only_the_cli_program_counts_as_the_cli():
    assert allocator.is_cli_program("/venv/bin/qlora-lab")
    assert allocator.is_cli_program("/work/main/qlora_lab/__main__.py")          # python -m qlora_lab
    assert not allocator.is_cli_program("/home/me/wrapper.py")
    assert not allocator.is_cli_program("-c")
    assert not allocator.is_cli_program("/venv/lib/python3.11/site-packages/pytest/__main__.py")


def test_preloaded_libraries_come_from_this_environment_or_the_system_only(tmp_path, monkeypatch):
    """A jemalloc in another environment (a CONDA_PREFIX that is not this interpreter's) is never picked."""
    other = tmp_path / "other-env" / "lib"
    other.mkdir(parents=True)
    (other / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setenv("CONDA_PREFIX", str(other.parent))
    allocator.library.cache_clear()
    try:
        found = allocator.library("jemalloc")
        assert found is None or not found.startswith(str(tmp_path))
        assert not allocator._in_allowed_dirs(other / "libjemalloc.so.2")
        assert allocator._in_allowed_dirs(Path(sys.prefix) / "lib" / "x.so")
    finally:
        allocator.library.cache_clear()


def test_no_reexec_when_called_from_python_or_when_the_user_preloaded_an_allocator(monkeypatch):
    def refuse(*a):
        raise AssertionError("re-executed")

    monkeypatch.setattr(os, "execve", refuse)
    monkeypatch.delenv(allocator.GUARD, raising=False)
    monkeypatch.setattr(allocator, "active", lambda: "system")
    monkeypatch.setattr(allocator, "resolve", lambda name: "mimalloc" if name == "auto" else name)
    monkeypatch.setattr(allocator, "problem", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["/home/me/wrapper.py"])
    allocator.exec_with(["train", "allocator=mimalloc"])         # a wrapper script calling cli.main(): never
    monkeypatch.setattr(sys, "argv", ["/venv/bin/qlora-lab", "train"])
    allocator.exec_with(["train"], entry_point=False)            # cli.main(["train", ...]) from other code
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libtcmalloc.so.4")
    allocator.exec_with(["train"])                               # auto: the user's own allocator stays
    with pytest.raises(AssertionError, match="re-executed"):
        allocator.exec_with(["train", "allocator=mimalloc"])     # asked for by name: honoured
