"""The run directory's lifecycle: what may be written when, and the rules of a rerun and a resume.

    config.yaml        the run's resolved config, written when its training first starts; a resume must match it
    plan.json          what every ``auto`` became on the machine that started it (qlora_lab/plan.py); a resume on
                       a machine that changes the numerics is refused unless resume.allow_plan_change=true
    .hydra/            the latest invocation's config and overrides (written by Hydra)
    environment.json   package versions, git commit, seed, hardware, allocator
    checkpoints/       trainer checkpoints; rerunning into the same dir resumes from the newest complete one whose
                       files all open (checkpoints/unusable/: the ones a resume passed over, kept)
    adapter/           adapter_model.safetensors, adapter_config.json, tokenizer (written atomically)
    metrics.json       the numbers (written last; "status" says completed or failed)
    report.md          the same, for people
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qlora_lab import checkpoints, models, plan
from qlora_lab.cpu import allocator
from qlora_lab.errors import UserError
from qlora_lab.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a unique probe: under torchrun every rank checks the same shared run dir at the same time
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output_dir={str(run_dir)!r} is not writable ({e.strerror}). Fix: choose another folder "
                        "with hydra.run.dir=...") from None


def checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoint-N folders in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_checkpoint(folder: Path, model_only: bool = False) -> str | None:
    """The newest checkpoint-N folder a resume can use, or None.

    A folder whose save was interrupted (no trainer_state.json: the Trainer writes it last) or that holds a missing
    or damaged file (checkpoints.problem: e.g. a weights file cut short by a full disk) is passed over.
    """
    return resume_point(folder, model_only)[0]


def resume_point(folder: Path, model_only: bool) -> tuple[str | None, dict[Path, str]]:
    """(the newest usable checkpoint or None, {each newer unusable checkpoint: what is wrong with it})."""
    unusable: dict[Path, str] = {}
    for ckpt in checkpoint_folders(folder):
        why = checkpoints.problem(ckpt, model_only)
        if why is None:
            return str(ckpt), unusable
        unusable[ckpt] = why
        log.warning("Checkpoint %s cannot be resumed from: %s. Trying the one before it.", ckpt, why)
    return None, unusable


def no_usable_checkpoint(folder: Path, unusable: dict[Path, str]) -> UserError:
    found = "; ".join(f"{ckpt.name}: {why}" for ckpt, why in unusable.items())
    return UserError(f"no checkpoint in {folder} can be resumed from ({found}). Nothing was changed. Fix: restore "
                     f"a checkpoint folder from a backup, or move {folder} away to train this run from the start, "
                     "or train into a new folder (another hydra.run.dir).")


UNUSABLE = "unusable"  # checkpoints/unusable/: checkpoints a resume passed over, kept for inspection


def set_aside(unusable: dict[Path, str]) -> None:
    """Move checkpoints a resume passed over into checkpoints/unusable/: the resumed run would otherwise save into
    the same checkpoint-N folder over their leftover files, and a save interrupted there could pass for complete.
    Nothing is deleted. (Outside the checkpoint-* names, so the Trainer's save_total_limit rotation ignores them.)"""
    for ckpt, why in unusable.items():
        target = ckpt.parent / UNUSABLE / ckpt.name
        n = 1
        while target.exists():
            target, n = ckpt.parent / UNUSABLE / f"{ckpt.name}.{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        os.replace(ckpt, target)
        log.warning("Moved %s (%s) to %s", ckpt, why, target)


def tokens_seen(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


RUN_CONFIG = "config.yaml"
# what a resume may change: where the run lives, how long it trains, how often it logs and saves, process settings
RESUME_MAY_CHANGE = ("output_dir", "allocator", "fail_fast", "max_nonfinite_steps", "score_before",
                     "trainer.max_steps", "trainer.num_train_epochs", "trainer.logging_steps", "trainer.save_steps",
                     "trainer.save_total_limit", "trainer.eval_steps", "trainer.report_to", "resume")


def check_rerun(cfg: DictConfig, run_dir: Path, resume: str | None) -> None:
    """Refuse to train a completed run again (unless asked to train it longer), or to resume a run with other
    settings than it started with."""
    done = previous_metrics(run_dir, ("status", "global_step"))
    if done.get("status") == "completed" and not trains_longer(cfg.trainer, resume, done.get("global_step", 0)):
        raise UserError(f"{run_dir} holds a completed run ({done.get('global_step')} steps; metrics.json); its "
                        "results are untouched. Train into a new folder (another hydra.run.dir), train this one "
                        "longer (a higher trainer.max_steps or trainer.num_train_epochs), or use it: "
                        f"qlora-lab merge run={run_dir} / qlora-lab chat run={run_dir}.")
    first_file = run_dir / RUN_CONFIG
    if resume is None or not first_file.is_file():
        return
    first = _flat(OmegaConf.to_container(OmegaConf.load(first_file)))
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = [f"{key}: {first.get(key, '(unset)')!r} at the start, {now.get(key, '(unset)')!r} now"
               for key in sorted(first.keys() | now.keys())
               if first.get(key) != now.get(key) and not key.startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise UserError(f"{run_dir} is a run started with other settings, and a resume from "
                        f"{Path(resume).name} must keep them:\n  " + "\n  ".join(changed) +
                        f"\nFix: rerun with the settings in {first_file}, or train into a new folder (another "
                        "hydra.run.dir). The run's checkpoints and results are untouched.")


def trains_longer(trainer_cfg: DictConfig, checkpoint: str | None, steps_done: int) -> bool:
    """Whether the trainer settings ask a completed run of ``steps_done`` steps for more (never without a
    checkpoint to go on from)."""
    if checkpoint is None:
        return False
    if trainer_cfg.max_steps > 0:
        return trainer_cfg.max_steps > steps_done
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return trainer_cfg.num_train_epochs > (state.get("epoch") or 0) + 1e-6


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} for a nested dict."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def previous_metrics(run_dir: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    old = read_metrics(run_dir)
    return {k: old[k] for k in keys if k in old}


def environment(cfg: DictConfig) -> dict[str, Any]:
    """What produced this run: package versions, the project's git commit, seed, hardware."""
    import importlib.metadata as md
    import platform
    import subprocess

    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "hydra-core",
                "qlora-lab"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=Path(__file__).parent,
                                    capture_output=True, text=True, timeout=5).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "python": platform.python_version(), "git_commit": commit, "git_dirty": dirty,
            "seed": cfg.trainer.seed, "device": models.device_type(), "gpus": gpu, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "bf16": models.bf16_supported(),
            "allocator": allocator.active()}


def record_plan(cfg: DictConfig, run_dir: Path, new: plan.Plan, resume: str | None) -> None:
    """Write plan.json; on a resume, first compare it with the recorded one (NUMERIC fields): refused when they
    differ, unless resume.allow_plan_change=true (then logged, and the new plan recorded)."""
    recorded = plan.read(run_dir) if resume is not None else None
    if recorded is not None:
        changed = plan.numeric_differences(recorded, new)
        if changed and not cfg.resume.allow_plan_change:
            raise UserError(f"{run_dir} was started on a machine where the run's plan differs from this one's, and "
                            "resuming here would train on with other numerics:\n  " + "\n  ".join(changed) +
                            f"\nFix: resume where it started, set the differing settings explicitly to the recorded "
                            f"values (see {run_dir / plan.PLAN_FILE}; e.g. model.dtype=, quant.compute_dtype=, "
                            "trainer.bf16=), or accept the change with resume.allow_plan_change=true. The run's "
                            "checkpoints and results are untouched.")
        if changed:
            log.warning("resume.allow_plan_change=true: resuming with another plan than the run started with: %s",
                        "; ".join(changed))
    write_json_atomic(run_dir / plan.PLAN_FILE, new.to_json())


def write_config(cfg: DictConfig, run_dir: Path, resume: str | None) -> None:
    """config.yaml: written when the run's training first starts (a resume keeps the first one)."""
    if resume is None or not (run_dir / RUN_CONFIG).is_file():
        write_text_atomic(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
