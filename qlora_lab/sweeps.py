"""What a failed job does to its sweep: recorded as failed and the sweep goes on (default), or the whole sweep
stopped at it (``fail_fast=true``); and the memory a finished job frees before the next one of the same process."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from qlora_lab import rundir
from qlora_lab.errors import UserError
from qlora_lab.files import write_json_atomic

log = logging.getLogger(__name__)


def stop_sweep(cfg: DictConfig, error: Exception) -> None:
    """fail_fast: end the whole sweep at this job. Hydra's launchers catch a job's exceptions and the basic sweeper
    looks at them only after the whole batch has run, so the process exits here instead (SystemExit passes through
    Hydra's job runner); the job is recorded as failed first."""
    write_failed(cfg, error)
    if isinstance(error, UserError):
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        log.exception("Job failed", exc_info=error)
    print(f"fail_fast=true: the sweep stops at this job ({cfg.output_dir}).", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(error, UserError) else 1)


def write_failed(cfg: DictConfig, error: Exception) -> None:
    earlier = rundir.read_metrics(Path(cfg.output_dir))
    if earlier.get("status") != "completed":  # a refused rerun of a completed job leaves its results alone
        # what train() recorded (global_step, last checkpoint, the "before" scores) stays, with the error
        write_json_atomic(Path(cfg.output_dir) / "metrics.json",
                          {**earlier, "status": "failed", "error": f"{type(error).__name__}: {error}"})


def record_failed_job(cfg: DictConfig, error: Exception) -> float:
    """In a sweep, a failed job is recorded (metrics.json status=failed) instead of ending the sweep.

    Optuna's sweeper is told through an exception (it marks the trial FAIL and stops only past its
    max_failure_rate); the basic sweeper gets NaN, which the sweep report lists as failed.
    """
    from hydra.core.hydra_config import HydraConfig

    log.error("Job failed: %s: %s", type(error).__name__, error)
    write_failed(cfg, error)
    if "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower():
        raise error
    return float("nan")


def release_memory() -> None:
    """Free the finished job's model, optimizer and caches before the next job of a sweep starts."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
