"""Multirun sweeps as users launch them: grid, Optuna, submitit_local, failed jobs, and the sweep report."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from qlora_lab.report import write_report
from tests.test_cli import DATA, TINY_CLI, run_cli

pytestmark = pytest.mark.integration


def jobs(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]


def test_grid_2x2_writes_four_runs_and_a_report_naming_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", *TINY_CLI, "data.task_eval_samples=0", "adapter.r=4,8",
                   "trainer.learning_rate=1e-3,5e-3", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = jobs(sweep)
    assert len(results) == 4 and all(m["status"] == "completed" for m in results)
    for job in sweep.glob("[0-9]"):
        assert (job / "adapter/adapter_model.safetensors").is_file() and (job / "loss.png").is_file()
    rows = list(csv.DictReader((sweep / "sweep_report.csv").open()))
    assert sorted((int(r["param:adapter.r"]), float(r["param:trainer.learning_rate"])) for r in rows) == [
        (4, 1e-3), (4, 5e-3), (8, 1e-3), (8, 5e-3)]
    best = min(rows, key=lambda r: float(r["eval_loss"]))
    assert f"job `{best['job']}`" in (sweep / "sweep_report.md").read_text()
    assert (sweep / "sweep_report.png").stat().st_size > 1000
    assert all(m["peak_mem_mb"] > 0 for m in results)  # each job's own window: test_peak_memory_is_reset_per_job


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset through Linux's /proc")
def test_peak_memory_is_reset_per_job(monkeypatch):
    """Jobs of a sweep share one process (basic launcher): each job's peak_mem_mb starts at its own reset."""
    from qlora_lab import measure

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the CPU path: peak RSS (VmHWM)
    measure.reset_peak()
    start = measure.peak_mb()
    big = b"\x01" * (600 * 2**20)  # 600 MiB, every page written (resident)
    first_job = measure.peak_mb()
    assert first_job > start + 500, (start, first_job)
    del big  # returned to the OS (a block this large is its own mmap)
    measure.reset_peak()
    second_job = measure.peak_mb()
    assert second_job < first_job - 400, (first_job, second_job)


def test_a_failing_job_is_recorded_and_the_others_complete(tmp_path):
    sweep = tmp_path / "sweep"
    good, bad = DATA / "prompt_completion.jsonl", DATA / "malformed.jsonl"
    proc = run_cli("train", "-m", *TINY_CLI, "data=file", f"data.path={good},{bad}", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")}
    assert status == {"0": "completed", "1": "failed"}
    report = (sweep / "sweep_report.md").read_text()
    assert "1 completed, 1 failed" in report and "malformed.jsonl:3" in report


@pytest.fixture(scope="module")
def fail_fast_sweep(tmp_path_factory):
    """A 2-job sweep with fail_fast=true whose first job fails on malformed data and whose second job is good."""
    sweep = tmp_path_factory.mktemp("fail_fast") / "sweep"
    bad, good = DATA / "malformed.jsonl", DATA / "prompt_completion.jsonl"
    proc = run_cli("train", "-m", *TINY_CLI, "data=file", f"data.path={bad},{good}", "fail_fast=true",
                   f"hydra.sweep.dir={sweep}")
    return sweep, proc.returncode, proc.stdout + proc.stderr


def test_fail_fast_fails_the_sweep_with_the_jobs_message(fail_fast_sweep):
    _, returncode, out = fail_fast_sweep  # without fail_fast the sweep records the job as failed and exits 0
    assert returncode != 0, out[-3000:]
    assert "malformed.jsonl:3: malformed JSON" in out, out[-3000:]  # the failed job's own message: file:line


def test_fail_fast_stops_the_sweep_at_the_failed_job_with_one_clean_message(fail_fast_sweep):
    sweep, _, out = fail_fast_sweep
    assert "malformed.jsonl:3: malformed JSON" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not (sweep / "1" / "metrics.json").exists(), "the job after the failed one still ran"


def test_optuna_sweep_of_three_trials_returns_a_best_value(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", "sweep=optuna_lr_rank", "hydra.sweeper.n_trials=3", *TINY_CLI,
                   "data.task_eval_samples=0", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert isinstance(result["best_value"], float) and "trainer.learning_rate" in result["best_params"]
    assert len(jobs(sweep)) == 3
    assert write_report(sweep)["best"]["eval_loss"] == pytest.approx(result["best_value"])


# every log line of the sweep's own process (hydra_logging) and of each job (job_logging) names its process id
PID_LOGGING = [f'hydra.{which}.formatters.simple.format="[pid %(process)d] %(message)s"'
               for which in ("hydra_logging", "job_logging")]


def logged_pids(text: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"^\[pid (\d+)\] ", text, re.MULTILINE)}


def test_submitit_local_runs_each_job_in_its_own_process(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", "launcher=local", *TINY_CLI, "data.task_eval_samples=0", "adapter.r=4,8",
                   *PID_LOGGING, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["status"] for m in jobs(sweep)] == ["completed", "completed"]
    assert (sweep / ".submitit").is_dir() and (sweep / "sweep_report.md").is_file()
    launcher = logged_pids(proc.stdout + proc.stderr)
    job_pids = [logged_pids(next((sweep / str(n)).glob("*.log")).read_text()) for n in (0, 1)]
    assert len(launcher) == 1 and all(len(p) == 1 for p in job_pids), (launcher, job_pids)
    first, second = (p.pop() for p in job_pids)
    assert first != second and not {first, second} & launcher, (launcher, first, second)


def test_report_command_on_a_folder_without_jobs_fails_clearly(tmp_path):
    from tests.test_cli import assert_clean_failure

    assert_clean_failure(run_cli("report", str(tmp_path)), "no job directories")


def test_tracking_to_tensorboard_and_mlflow_offline(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_SENTINEL_123")  # credentials live in the environment only
    proc = run_cli("train", *TINY_CLI, "trainer.report_to=[tensorboard,mlflow]", "trainer.logging_steps=1",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    losses = list((tmp_path / "mlruns").glob("*/*/metrics/loss"))
    assert losses and len(losses[0].read_text().splitlines()) == 2  # one value per step (2 steps)
    for f in [*run.rglob("*"), *(tmp_path / "mlruns").rglob("*")]:
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert b"SECRET_SENTINEL" not in f.read_bytes(), f


def test_slurm_multigpu_preset_submits_one_process_per_gpu_and_makes_them_ranks(tmp_path, monkeypatch):
    """launcher=slurm_multigpu composes into the sbatch submitit would write, and adds the callback that turns the
    tasks into torch.distributed ranks (exercised on a fake allocation in tests/test_distributed.py)."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from qlora_lab.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["launcher=slurm_multigpu", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                                 f"hydra.sweep.dir={tmp_path}"])
    assert cfg.hydra.callbacks.slurm_ranks._target_ == "qlora_lab.distributed.SlurmTasksAsRanks"
    assert "sweep_report" in cfg.hydra.callbacks  # added to, not replaced
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher" and launcher.params["tasks_per_node"] == 4

    # the executor parameters exactly as the launcher passes them (hydra_submitit_launcher's launch())
    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit insists on finding srun
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / ".submitit")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    sbatch = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "0")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"):
        assert line in sbatch, sbatch
