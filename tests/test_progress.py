"""Long waits show a progress bar and end in one line that says what was done and how long it took: the built-in
model's one-time build, data preparation, the held-out evaluations and task scoring."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from qlora_lab import data, models, prepare, progress, task
from qlora_lab.train import train
from tests.conftest import TINY, compose_train


@pytest.fixture
def logs(monkeypatch):
    """What these modules log, recorded at the logger calls (other tests' logging setup may keep records from
    pytest's caplog; see tests/test_prepare.py)."""
    seen: list[str] = []
    for module in (data, models, prepare, progress, task):
        monkeypatch.setattr(module.log, "info", lambda msg, *args: seen.append(msg % args))
    return seen


def test_eval_summary_names_the_evaluation_its_loss_rows_and_seconds(logs):
    summary = progress.EvalSummary(rows=64)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    summary.on_evaluate(None, state, None, metrics={"before_loss": 2.5, "before_runtime": 3.14})
    state.global_step = 50
    summary.on_evaluate(None, state, None, metrics={"eval_loss": 0.0562, "eval_runtime": 2.0, "epoch": 1.0})
    assert logs == ["Held-out eval loss before training (adapter off): 2.5000 (64 rows, 3.1 s)",
                    "Held-out eval loss at step 50: 0.0562 (64 rows, 2.0 s)"]


def test_a_built_in_model_built_once_says_how_long_it_took(tmp_path, monkeypatch, logs):
    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path))
    models._cached("toy", lambda out: (out / "config.json").write_text("{}"))
    models._cached("toy", lambda out: pytest.fail("built twice"))
    assert len(logs) == 1 and re.fullmatch(rf"Built the toy model in [0-9.]+ s, once: later runs load it from "
                                           rf"{re.escape(str(tmp_path / 'toy'))}", logs[0])


def test_processes_building_the_same_model_at_once_build_it_once(tmp_path, monkeypatch):
    """Two ranks of a first torchrun on a fresh machine: one builds, the other waits and reads the finished folder
    (without the lock both built it and the second swapped the folder out from under the first's reader)."""
    import threading
    import time

    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path))
    builds, seen = [], []

    def build(out):
        builds.append(out)
        time.sleep(0.5)
        (out / "config.json").write_text("{}")

    def rank():
        folder = models._cached("toy", build)
        seen.append((folder / "config.json").read_text())

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and seen == ["{}", "{}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy.lock", "toy"]  # no temporary folder left


def test_hashing_a_large_data_file_draws_a_bar(tmp_path, monkeypatch):
    drawn = []
    real = progress.bar
    monkeypatch.setattr(progress, "bar", lambda **kw: drawn.append(kw) or real(**kw))
    small = tmp_path / "small.jsonl"
    small.write_text("{}\n")
    data.file_digest(small)
    assert drawn == []  # small files are hashed in a blink, without a bar
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        f.truncate((1 << 28) + 1)  # sparse: 256 MiB + 1 byte, the first size with a bar
    data.file_digest(big)
    assert drawn == [{"total": (1 << 28) + 1, "desc": "Hashing big.jsonl", "unit": "B"}]


@pytest.mark.integration
def test_a_run_reports_each_long_step_with_its_time(tmp_path, logs, capsys):
    train(compose_train([*TINY, "trainer.save_strategy=no"], tmp_path / "run"))
    lines = "\n".join(logs)
    for pattern in (r"Prepared data (in [0-9.]+ s: 32 train / 8 held-out rows|from cache)",
                    r"Scored 4 held-out answers: json_match [0-9.]+ \(\d+ right\) in [0-9.]+ s",  # before and after
                    r"Held-out eval loss before training \(adapter off\): [0-9.]+ \(8 rows, [0-9.]+ s\)",
                    r"Held-out eval loss at step 3: [0-9.]+ \(8 rows, [0-9.]+ s\)"):
        assert re.search(pattern, lines), (pattern, lines)
    assert len(re.findall("Scored 4 held-out answers", lines)) == 2
    assert "Scoring held-out answers (json_match)" in capsys.readouterr().err  # the bar while answers are generated
