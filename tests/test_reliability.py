"""Nothing lost under interruption or divergence: resume equivalence, SIGTERM preemption, non-finite loss."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from qlora_lab import train as train_mod
from qlora_lab.sft import EXIT_PREEMPTED, Diverged, QloraSFTTrainer
from tests.conftest import TINY, compose_train
from tests.test_cli import ROOT, TINY_CLI, assert_clean_failure, run_cli

pytestmark = pytest.mark.integration
RUN = [*TINY, "trainer.max_steps=4", "trainer.save_steps=2", "score_before=false", "data.task_eval_samples=0",
       "adapter.dropout=0.1"]  # dropout: the resumed run must also restore the RNG state


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tmp_path, monkeypatch):
    # the defaults that touch the data order stay on: length-grouped batches, and the before-training evaluation
    # (its data loader draws from the global RNG on a fresh run, not on a resume)
    run = [*TINY, "trainer.max_steps=4", "trainer.save_steps=2", "adapter.dropout=0.1"]
    straight = tmp_path / "straight"
    train_mod.train(compose_train(run, straight))

    interrupted = tmp_path / "interrupted"
    real_step = QloraSFTTrainer.training_step

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("simulated crash after checkpoint-2")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(QloraSFTTrainer, "training_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(compose_train(run, interrupted))
    assert not (interrupted / "metrics.json").exists() and not (interrupted / "adapter").exists()
    trained_steps = []  # the steps the resumed run really trains: 3 and 4, not a rerun from step 1

    def counting_step(self, *args, **kwargs):
        trained_steps.append(self.state.global_step)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(QloraSFTTrainer, "training_step", counting_step)
    resumed = train_mod.train(compose_train(run, interrupted))
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert trained_steps == [2, 3]

    a = load_file(straight / "adapter/adapter_model.safetensors")
    b = load_file(interrupted / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # optimizer, scheduler, RNG and data position all restored: the same weights
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = QloraSFTTrainer.compute_loss

    def nan_after_step_2(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(QloraSFTTrainer, "compute_loss", nan_after_step_2)
    with pytest.raises(Diverged, match="not finite for 2 consecutive steps"):
        train_mod.train(compose_train([*RUN, "trainer.max_steps=8", "max_nonfinite_steps=2", "score_before=true",
                                       "data.task_eval_samples=2"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["last_checkpoint"].endswith("checkpoint-2")
    assert metrics["eval_loss_before"] > 0 and "task_score_before" in metrics  # the "before" numbers are kept
    assert (tmp_path / "checkpoints/checkpoint-2/trainer_state.json").is_file()
    assert not (tmp_path / "adapter").exists()


def test_a_non_finite_step_is_skipped_and_the_weights_stay_finite(tmp_path, monkeypatch):
    real_loss = QloraSFTTrainer.compute_loss

    def nan_at_step_2(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 1 else loss

    monkeypatch.setattr(QloraSFTTrainer, "compute_loss", nan_at_step_2)
    metrics = train_mod.train(compose_train(RUN, tmp_path))  # 4 steps, one of them NaN: the run goes on
    assert metrics["status"] == "completed" and metrics["skipped_updates"] == 1
    for name, tensor in load_file(tmp_path / "adapter/adapter_model.safetensors").items():
        assert torch.isfinite(tensor).all(), name  # without the skip, AdamW turns every weight into NaN for good
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        for name, tensor in load_file(tmp_path / "checkpoints" / ckpt / "adapter_model.safetensors").items():
            assert torch.isfinite(tensor).all(), (ckpt, name)


class ChildOutput:
    """A child process's output, read on a thread: waiting for a line keeps its deadline whether the child prints
    a lot, nothing, or hangs (a loop over proc.stdout checks a deadline only when a line arrives)."""

    def __init__(self, proc: subprocess.Popen):
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        self._done = False
        self._reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)  # end of output

    def _next(self, timeout: float) -> str | None:
        line = self._lines.get(timeout=timeout)
        if line is None:
            self._done = True
        else:
            self._seen.append(line)
        return line

    def wait_for(self, needle: str, timeout: float) -> bool:
        """Whether a line containing ``needle`` arrives within ``timeout`` seconds (False at the end of output)."""
        deadline = time.monotonic() + timeout
        while not self._done and (left := deadline - time.monotonic()) > 0:
            try:
                line = self._next(left)
            except queue.Empty:
                return False
            if line is not None and needle in line:
                return True
        return False

    def text(self, timeout: float = 30) -> str:
        """Everything read so far, and the rest once the child has closed its output (up to ``timeout`` s)."""
        self._reader.join(timeout)
        while not self._done:
            try:
                self._next(0)
            except queue.Empty:
                break
        return "".join(self._seen)


def test_waiting_for_a_child_line_keeps_its_deadline_when_the_child_goes_silent():
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        output = ChildOutput(proc)
        assert output.wait_for("started", timeout=60)
        assert not output.wait_for("'loss'", timeout=2)
        assert time.monotonic() - started < 30  # not the child's 120 s
    finally:
        proc.kill()
        proc.wait()
    assert output.text() == "started\n"


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resumes(tmp_path):
    run = tmp_path / "run"
    common = [sys.executable, "-m", "qlora_lab", "train",
              *[o for o in TINY_CLI if not o.startswith(("trainer.max_steps", "data.max_train_samples",
                                                         "trainer.per_device_train_batch_size"))],
              "trainer.save_steps=1000", "trainer.logging_steps=1", "data.max_train_samples=64",
              "trainer.per_device_train_batch_size=1", f"hydra.run.dir={run}"]
    args = [*common, "trainer.max_steps=500"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ChildOutput(proc)
    try:
        if not output.wait_for("'loss'", timeout=300):  # training under way
            pytest.fail("no training step was logged within 300 s:\n" + output.text()[-2000:])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = output.text()
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "preempted" and metrics["signal"] == "SIGTERM"
    step = metrics["global_step"]
    assert 0 < step < 500 and metrics["last_checkpoint"].endswith(f"checkpoint-{step}")
    assert (run / f"checkpoints/checkpoint-{step}/trainer_state.json").is_file()
    # the requeued job (same command, same run dir) resumes there
    done = subprocess.run([*common, f"trainer.max_steps={step + 2}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads((run / "metrics.json").read_text())
    assert final["status"] == "completed" and final["resumed_from"].endswith(f"checkpoint-{step}")
    assert final["global_step"] == step + 2


def test_disk_full_while_saving_keeps_the_previous_results(tmp_path, monkeypatch):
    from qlora_lab import adapters
    from qlora_lab.errors import UserError

    first = train_mod.train(compose_train(RUN, tmp_path))
    before = {p: p.read_bytes() for p in [tmp_path / "metrics.json", tmp_path / "adapter/adapter_model.safetensors"]}

    def full_disk(cfg, model, folder, initial, state_dict=None):
        (folder / "adapter_model.safetensors").write_bytes(b"half-written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters, "save_adapter", full_disk)
    with pytest.raises(UserError, match="No space left on device.*Nothing earlier was replaced"):
        train_mod.train(compose_train([*RUN, "trainer.max_steps=6"], tmp_path))
    assert {p: p.read_bytes() for p in before} == before  # earlier adapter and metrics intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]  # no half-written folder left
    assert first["status"] == "completed"


# ---- damaged checkpoints (a full disk, or a machine crash before the page cache reached the disk)

CRASHED = [*RUN, "trainer.max_steps=6"]


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """A run that saved checkpoint-2 and checkpoint-4, then crashed in step 5. Tests damage a copy of it."""
    run = tmp_path_factory.mktemp("crashed") / "run"
    real_step = QloraSFTTrainer.training_step

    def crash_in_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated crash after checkpoint-4")
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QloraSFTTrainer, "training_step", crash_in_step_5)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(compose_train(CRASHED, run))
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return run


def cut_short(path) -> int:
    """Truncate ``path`` to half its size, as a save that ran out of disk leaves it; return the new size."""
    size = path.stat().st_size // 2
    os.truncate(path, size)
    return size


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt"])
def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(crashed_run, tmp_path, monkeypatch, caplog,
                                                                   damaged):
    run = tmp_path / "run"
    shutil.copytree(crashed_run, run)
    size = cut_short(run / "checkpoints/checkpoint-4" / damaged)
    real_step, trained_steps = QloraSFTTrainer.training_step, []

    def counting_step(self, *args, **kwargs):
        trained_steps.append(self.state.global_step)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(QloraSFTTrainer, "training_step", counting_step)
    with caplog.at_level(logging.WARNING, logger="qlora_lab.train"):
        metrics = train_mod.train(compose_train(CRASHED, run))  # the same command again: no traceback
    assert metrics["status"] == "completed" and metrics["resumed_from"].endswith("checkpoint-2")
    assert trained_steps == [2, 3, 4, 5] and metrics["global_step"] == 6
    warning = next(r.getMessage() for r in caplog.records if "cannot be resumed from" in r.getMessage())
    assert "checkpoint-4" in warning and f"{damaged} is damaged" in warning, warning
    # the damaged folder is kept, out of the Trainer's way; the resumed run wrote a sound checkpoint-4 of its own
    assert (run / "checkpoints/unusable/checkpoint-4" / damaged).stat().st_size == size
    from qlora_lab import checkpoints

    assert checkpoints.problem(run / "checkpoints/checkpoint-4") is None


def test_no_usable_checkpoint_is_one_error_and_nothing_is_changed(crashed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(crashed_run, run)
    cut_short(run / "checkpoints/checkpoint-4/adapter_model.safetensors")
    cut_short(run / "checkpoints/checkpoint-2/optimizer.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli("train", *TINY_CLI, f"hydra.run.dir={run}")
    assert_clean_failure(proc, f"error: no checkpoint in {run / 'checkpoints'} can be resumed from",
                         "checkpoint-4: adapter_model.safetensors is damaged", "checkpoint-2: optimizer.pt is damaged",
                         f"move {run / 'checkpoints'} away to train this run from the start")
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == proc.stderr.splitlines()[-1:]
    assert {p: p.read_bytes() for p in before} == before and not (run / "checkpoints/unusable").exists()


def test_checkpoint_files_are_on_disk_before_trainer_state_marks_them_complete(tmp_path, monkeypatch):
    synced = []  # (path, trainer_state.json of checkpoint-2 existed at that moment)
    state = tmp_path / "checkpoints/checkpoint-2/trainer_state.json"
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), state.exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    train_mod.train(compose_train([*RUN, "trainer.max_steps=2"], tmp_path))
    folder = state.parent
    files = {str(p) for p in folder.rglob("*") if p.is_file()}
    before_mark = {path for path, marked in synced if not marked}
    assert files - {str(state)} <= before_mark, files - before_mark  # every file synced before the mark exists
    after_mark = [path for path, marked in synced if marked]
    assert str(state) in after_mark and str(folder) in after_mark and str(folder.parent) in after_mark
