"""What the pictures and report.md show, read back from the figures' artists and the text: step 0 on loss.png,
single-point series, log axes, the best job, and held-out prompts shown whole or cut in the middle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from qlora_lab import report
from qlora_lab.task import demo_rows

HISTORY = [
    {"before_loss": 2.5, "before_runtime": 1.0, "epoch": 0, "step": 0},  # train(): EvalBeforeTraining
    {"loss": 2.2, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.1, "step": 1},
    {"loss": 1.4, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.2, "step": 2},
    {"eval_loss": 1.1, "epoch": 0.2, "step": 2},
    {"train_runtime": 3.0, "train_loss": 1.8, "epoch": 0.2, "step": 2},
]


def lines_by_label(ax) -> dict[str, list[tuple[float, float]]]:
    return {line.get_label(): [tuple(p) for p in line.get_xydata()] for line in ax.get_lines()}


def test_loss_png_starts_its_eval_curve_at_step_0_before_training():
    fig = report.loss_figure(HISTORY)
    lines = lines_by_label(fig.axes[0])
    assert lines["held-out eval loss"] == [(0, 2.5), (2, 1.1)]  # the base model's loss, then after training
    assert lines["train loss"] == [(1, 2.2), (2, 1.4)]
    assert fig.axes[0].texts[0].get_text() == "before training"
    report._plt().close(fig)


def test_a_single_logged_point_is_drawn_with_a_marker():
    fig = report.loss_figure([{"loss": 3.0, "step": 1}])
    (line,) = fig.axes[0].get_lines()
    assert [tuple(p) for p in line.get_xydata()] == [(1, 3.0)] and line.get_marker() == "o"
    report._plt().close(fig)
    fig = report.loss_figure(HISTORY)  # longer series stay plain lines
    assert fig.axes[0].get_lines()[0].get_marker() == "None"
    report._plt().close(fig)


def make_sweep(root: Path, jobs: list[dict], swept: dict | None = None) -> Path:
    """A multirun folder as Hydra and train() leave it: per job .hydra/overrides.yaml, metrics.json, log_history.json."""
    for n, job in enumerate(jobs):
        folder = root / str(n)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in job["params"].items()]))
        (folder / "metrics.json").write_text(json.dumps({"status": "completed", "eval_loss": job["eval_loss"]}))
        (folder / "log_history.json").write_text(json.dumps([{"loss": x, "step": s + 1}
                                                             for s, x in enumerate(job["losses"])]))
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"params": swept}}}))
    return root


JOBS = [
    {"params": {"trainer.learning_rate": "1e-4", "adapter.r": 8}, "eval_loss": 0.9, "losses": [2.0, 1.5, 1.2]},
    {"params": {"trainer.learning_rate": "1e-3", "adapter.r": 16}, "eval_loss": 0.4, "losses": [2.0]},  # one point
    {"params": {"trainer.learning_rate": "1e-2", "adapter.r": 8}, "eval_loss": 0.7, "losses": [2.0, 0.9, 0.8]},
]


def sweep_axes(sweep: Path):
    rows = report.collect_jobs(sweep)
    params = [c for c in rows[0] if c.startswith("param:")]
    best = min(rows, key=lambda r: r["eval_loss"])
    fig = report.sweep_figure(sweep, rows, params, "eval_loss", best)
    return fig, dict(zip([p.removeprefix("param:") for p in params], fig.axes)), fig.axes[-1]


def test_sweep_report_draws_every_job_the_best_marked_and_learning_rate_on_a_log_axis(tmp_path):
    fig, by_param, curves = sweep_axes(make_sweep(tmp_path, JOBS))
    lr, rank = by_param["trainer.learning_rate"], by_param["adapter.r"]
    assert lr.get_xscale() == "log" and rank.get_xscale() == "linear"  # 1e-4..1e-2 spans 100x; 8..16 only 2x
    jobs, star = lr.collections  # the jobs, then the best one
    assert sorted(map(tuple, jobs.get_offsets())) == [(1e-4, 0.9), (1e-3, 0.4), (1e-2, 0.7)]
    assert [tuple(p) for p in star.get_offsets()] == [(1e-3, 0.4)] and star.get_label() == "best: job 1"
    lines = lines_by_label(curves)
    assert lines["job 1 (best)"] == [(1, 2.0)]  # the job that logged one point is drawn, with a marker
    assert next(ln for ln in curves.get_lines() if ln.get_label() == "job 1 (best)").get_marker() == "o"
    assert lines["job 0"] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    widths = {ln.get_label(): ln.get_linewidth() for ln in curves.get_lines()}
    assert widths["job 1 (best)"] > widths["job 0"]
    report._plt().close(fig)


def test_parameters_the_sweeper_samples_on_a_log_scale_get_a_log_axis(tmp_path):
    jobs = [{"params": {"trainer.learning_rate": v, "adapter.dropout": d}, "eval_loss": e, "losses": [1.0, 0.5]}
            for v, d, e in (("5e-5", 0.01, 0.5), ("2e-4", 0.05, 0.4))]  # 4x apart: log only because tagged so
    swept = {"trainer.learning_rate": "tag(log, interval(5e-5, 1e-3))", "adapter.dropout": "interval(0.0, 0.1)"}
    sweep = make_sweep(tmp_path, jobs, swept)
    rows = report.collect_jobs(sweep)
    assert report.log_scale_params(sweep, rows, ["param:trainer.learning_rate", "param:adapter.dropout"]) == {
        "param:trainer.learning_rate"}


def test_write_report_saves_the_picture(tmp_path):
    out = report.write_report(make_sweep(tmp_path, JOBS))
    assert out["best"]["job"] == "1" and (tmp_path / "sweep_report.png").stat().st_size > 5000


def run_cfg():
    return OmegaConf.create({"model": {"name_or_path": "builtin:tiny-random"}, "quant": {"method": "nf4"},
                             "adapter": {"method": "lora", "r": 8, "alpha": 16}, "data": {"source": "demo", "path": None}})


METRICS = {"trainable_params": 10, "total_params": 100, "global_step": 3, "train_rows": 32, "eval_rows": 8,
           "task_metric": "json_match", "task_eval_samples": 2, "task_score_before": 0.0, "task_score_after": 0.5,
           "eval_loss_before": 2.0, "eval_loss": 1.0, "train_loss": 1.5, "train_runtime_s": 3.0, "total_runtime_s": 9.0,
           "tokens_per_s": 100.0, "device": "cpu", "peak_mem_mb": 1000.0}


def test_held_out_examples_show_the_users_message_whole_with_answer_and_reference():
    row = demo_rows(1, "eval")[0]
    long = "Summarize: " + "word " * 200 + "THE END."
    examples = [{"prompt": row["prompt"], "answer": "{}", "reference": row["completion"], "ok": False},
                {"prompt": long, "answer": "ok", "reference": "ok", "ok": True}]
    md = report.run_report(run_cfg(), {**METRICS, "examples": examples})
    assert json.dumps(row["prompt"]) in md  # the demo prompt (instruction + text), whole
    assert "Extract the person's name" in md and row["prompt"].split("Text: ")[1] in md
    assert f"reference: `{row['completion']}`" in md and "answer: `{}` (wrong)" in md
    shown = next(line for line in md.splitlines() if "Summarize" in line)
    assert "Summarize: word" in shown and "THE END." in shown and " … " in shown  # cut in the middle
    assert len(json.loads(shown.split(": ", 1)[1])) <= report.PROMPT_CHARS
    assert "answer: `ok` (correct)" in md and "reference: `ok`" in md


@pytest.mark.parametrize("n", [0, 10, 320, 321, 5000])
def test_middle_cut_keeps_short_texts_and_both_ends_of_long_ones(n):
    text = "".join(chr(97 + i % 26) for i in range(n))
    cut = report.middle_cut(text)
    if n <= report.PROMPT_CHARS:
        assert cut == text
    else:
        head, tail = cut.split(" … ")
        assert text.startswith(head) and text.endswith(tail) and len(cut) <= report.PROMPT_CHARS
