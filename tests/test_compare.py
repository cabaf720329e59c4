"""`qlora-lab compare` and `qlora-lab runs` on run directories as train() leaves them (config.yaml, metrics.json,
log_history.json): exactly the differing settings, the numbers, the overlaid curves, the listing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qlora_lab import compare
from qlora_lab.errors import UserError
from tests.conftest import compose_train
from tests.test_cli import assert_clean_failure, run_cli


def history(before: float, losses: list[float], after: float) -> list[dict]:
    return [{"before_loss": before, "step": 0}, *({"loss": x, "step": s + 1} for s, x in enumerate(losses)),
            {"eval_loss": after, "step": len(losses)}]


def make_run(folder: Path, overrides: list[str], metrics: dict | None = None, hist: list[dict] | None = None) -> Path:
    """A run directory with the files train() writes: the config it composed (resolved), metrics, log history."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(compose_train(overrides, folder), resolve=True))
    (folder / "environment.json").write_text("{}")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if hist is not None:
        (folder / "log_history.json").write_text(json.dumps(hist))
    return folder


DONE = {"status": "completed", "task_metric": "json_match", "task_score_before": 0.0, "task_score_after": 0.646,
        "eval_loss_before": 0.5235, "eval_loss": 0.0562, "train_loss": 0.3, "tokens_per_s": 302.5,
        "peak_mem_mb": 3481.0, "train_runtime_s": 159.0, "total_runtime_s": 200.0, "global_step": 50}


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path / "runs" / "a", ["adapter.r=8", "trainer.learning_rate=1e-3"], DONE,
                 history(2.5, [2.0, 1.2, 0.9], 0.8))
    b = make_run(tmp_path / "runs" / "b", ["adapter.r=32", "trainer.learning_rate=1e-3", "quant.double_quant=false"],
                 {**DONE, "task_score_after": 0.833, "eval_loss": 0.0364, "peak_mem_mb": 2900.0},
                 history(2.4, [1.9], 0.7))
    return a, b


def test_compare_names_exactly_the_settings_that_differ(two_runs, tmp_path):
    runs = [compare.read_run(p) for p in two_runs]
    assert compare.differing_settings(runs) == ["adapter.r", "quant.double_quant"]  # not output_dir
    table = compare.compare_table(runs)
    assert "| `adapter.r` | 8 | 32 |" in table and "| `quant.double_quant` | True | False |" in table
    assert "learning_rate" not in table and "output_dir" not in table
    assert "| task score (json_match) before → after | 0.000 → 0.646 | 0.000 → 0.833 |" in table
    assert "| held-out eval loss before → after | 0.5235 → 0.0562 | 0.5235 → 0.0364 |" in table
    assert "| peak memory (MiB) | 3481 | 2900 |" in table and "| tokens/s (non-padding) | 302.5 | 302.5 |" in table


def test_a_setting_one_run_lacks_counts_as_different(two_runs):
    b = two_runs[1]
    cfg = OmegaConf.load(b / "config.yaml")
    del cfg.adapter["dropout_impl"]  # e.g. a run from before the field existed
    OmegaConf.save(cfg, b / "config.yaml")
    runs = [compare.read_run(p) for p in two_runs]
    assert compare.differing_settings(runs) == ["adapter.dropout_impl", "adapter.r", "quant.double_quant"]
    assert "| `adapter.dropout_impl` | auto | (unset) |" in compare.compare_table(runs)


def test_compare_figure_overlays_the_curves_with_eval_points_from_step_0(two_runs):
    runs = [compare.read_run(p, label) for p, label in zip(two_runs, ("a", "b"))]
    fig = compare.compare_figure(runs)
    lines = {ln.get_label(): [tuple(p) for p in ln.get_xydata()] for ln in fig.axes[0].get_lines()}
    assert lines["a train loss"] == [(1, 2.0), (2, 1.2), (3, 0.9)]
    assert lines["a held-out eval loss"] == [(0, 2.5), (3, 0.8)]
    assert lines["b train loss"] == [(1, 1.9)]  # one point: drawn with a marker
    assert next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "b train loss").get_marker() == "o"
    assert lines["b held-out eval loss"] == [(0, 2.4), (1, 0.7)]
    colors = {ln.get_label(): ln.get_color() for ln in fig.axes[0].get_lines()}
    assert colors["a train loss"] == colors["a held-out eval loss"] != colors["b train loss"]


def test_compare_refuses_fewer_than_two_runs_and_folders_that_are_not_runs(two_runs, tmp_path):
    with pytest.raises(UserError, match="two or more"):
        compare.compare([str(two_runs[0])])
    with pytest.raises(UserError, match="no such run directory"):
        compare.compare([str(two_runs[0]), str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        compare.compare([str(two_runs[0]), str(tmp_path / "empty")])


def test_runs_lists_runs_newest_first_with_status_and_scores(tmp_path, two_runs):
    a, b = two_runs
    failed = make_run(tmp_path / "runs" / "sweep" / "0", ["quant=none"], {"status": "failed", "error": "boom"})
    running = make_run(tmp_path / "runs" / "c", ["adapter=dora"])  # started: config.yaml, no metrics.json yet
    (a / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # nothing inside a run is listed
    (tmp_path / "runs" / "notes").mkdir()
    now = time.time()
    for age_s, run in zip((7200, 3600, 60, 5), (a, b, failed, running)):
        for f in run.iterdir():
            os.utime(f, (now - age_s, now - age_s))
    found = compare.find_runs(tmp_path / "runs")
    assert [r.label for r in found] == ["c", "sweep/0", "b", "a"]
    table = compare.runs_table(found, now=now).splitlines()
    assert table[0].split() == ["run", "status", "age", "model", "quant", "adapter", "lr", "steps", "eval", "loss",
                                "score"]
    assert table[1].split()[:7] == ["c", "incomplete", "5", "s", "smollm2-135m-instruct", "nf4", "lora"]
    assert table[2].split()[:6] == ["sweep/0", "failed", "1", "min", "smollm2-135m-instruct", "none"]
    assert "0.523 → 0.056" in table[4] and "0.000 → 0.646" in table[4] and "2 h" in table[4] and "r=8" in table[4]


@pytest.mark.integration  # CLI processes
def test_compare_and_runs_commands(two_runs, tmp_path):
    a, b = two_runs
    proc = run_cli("compare", str(a), str(b), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "| `adapter.r` | 8 | 32 |" in proc.stdout
    assert (tmp_path / "out" / "compare.md").read_text() == proc.stdout.rstrip("\n") + "\n"
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5000
    listing = run_cli("runs", str(tmp_path / "runs"))
    assert listing.returncode == 0 and listing.stdout.splitlines()[0].startswith("run ")
    assert {line.split()[0] for line in listing.stdout.splitlines()[1:]} == {"a", "b"}
    assert_clean_failure(run_cli("compare", str(a)), "compare needs two or more run directories")
    assert_clean_failure(run_cli("runs", str(tmp_path / "nope")), "no such folder")
