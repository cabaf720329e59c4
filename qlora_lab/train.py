"""`qlora-lab train`: compose → validate → load base (4-bit) → SFTTrainer on the adapter → run directory.

``train(cfg) -> dict`` is a plain function (tests call it with a composed config); :func:`main` is the thin Hydra
shell that returns the objective (held-out eval loss) for sweepers.

Run directory (``cfg.output_dir``, Hydra's runtime output dir by default)::

    config.yaml        the run's resolved config, written when its training first starts; a resume must match it
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
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from qlora_lab import adapters, allocator, checkpoints, estimate, kernels, models, prepare, progress, report, task
from qlora_lab.config import CONF_DIR, register_configs, validate
from qlora_lab.distributed import is_main_process, world_size
from qlora_lab.errors import UserError, exit_on_user_error, in_multirun
from qlora_lab.files import atomic_dir, write_json_atomic, write_text_atomic
from qlora_lab.sft import (EXIT_PREEMPTED, Diverged, GuardCallback, Preempted, QloraSFTTrainer, build_sft_config,
                           needs_trl_loss, selective_loss_supported)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune the adapter described by ``cfg``; write the run directory; return the metrics."""
    validate(cfg)
    run_dir = Path(cfg.output_dir)
    _check_writable(run_dir)
    resume, unusable = _resume_point(run_dir / "checkpoints", cfg.trainer.save_only_model)
    _check_rerun(cfg, run_dir, resume)  # before anything in the run dir is written
    if unusable and resume is None:
        raise _no_usable_checkpoint(run_dir / "checkpoints", unusable)
    _log_allocator(cfg.allocator)
    started = time.time()
    _reset_peak_mem()
    main_process = is_main_process()  # under torchrun/accelerate only rank 0 writes run artifacts
    if main_process:
        _set_aside(unusable)
        write_json_atomic(run_dir / "environment.json", environment(cfg))

    # ---- setup: the tokenizer and the data first (the most common source of user errors), then the model
    model_path = models.resolve_model_path(cfg.model.name_or_path)
    tokenizer = models.build_tokenizer(cfg.model, model_path)
    prepared = prepare.prepare(cfg, tokenizer, run_dir if main_process else None)  # cached: see prepare.py
    train_ds, eval_ds = prepared.train, prepared.eval
    metric = _task_metric(cfg.data, prepared.task_rows)
    task_rows = prepared.task_rows if metric else []
    fit = estimate.for_run(cfg, model_path, tokenizer, train_ds)  # "will it fit?", before any weight is loaded
    if fit and main_process:
        log.info(estimate.describe(fit, *estimate.device_capacity()))
    model = models.build_model(cfg.model, cfg.quant, model_path)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, run_dir)
    trainer.add_callback(progress.EvalSummary(len(eval_ds)))  # a line per held-out evaluation, with its time
    adapters.apply_post_init(cfg.adapter, trainer.model, model_path)
    initial_adapter = adapters.save_initial_adapter(cfg.adapter, trainer.model, run_dir) if main_process else None
    trainable, total = adapters.check_only_adapter_trainable(cfg.adapter, trainer.model)
    log.info("Trainable parameters: %s of %s (%.3f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             "" if cfg.adapter.method == "full" else " — adapter only")

    # ---- before: the base model alone (adapter disabled)
    metrics: dict[str, Any] = {"status": "running"}
    before_eval = None
    if cfg.score_before and metric and resume is None:
        if main_process:  # generation is not collective: rank 0 scores alone
            with adapters.base_model_only(cfg.adapter, trainer.model):
                before = task.task_score(trainer.model, tokenizer, task_rows, metric, cfg.data.max_new_tokens)
            metrics["task_score_before"] = before["score"]
            log.info("Held-out %s before training: %.3f (n=%d)", metric, before["score"], before["n"])
        before_eval = EvalBeforeTraining(trainer, cfg.adapter, metrics)
        trainer.add_callback(before_eval)
    elif resume is not None:
        metrics.update(_previous_metrics(run_dir, ("task_score_before", "eval_loss_before")))

    # ---- train (resuming from the newest complete checkpoint in this run dir, if any)
    if resume:
        log.info("Resuming from %s", resume)
    if main_process and (resume is None or not (run_dir / RUN_CONFIG).is_file()):
        write_text_atomic(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    tokens_at_start = _tokens_seen(resume)
    guard = GuardCallback(trainer)
    trainer.add_callback(guard)
    guard.install_signal_handlers()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Diverged as e:
        if main_process:
            last = _last_checkpoint(run_dir / "checkpoints", cfg.trainer.save_only_model)
            write_json_atomic(run_dir / "metrics.json", {**metrics, "status": "failed", "error": str(e),
                                                         "global_step": trainer.state.global_step,
                                                         "last_checkpoint": last})
        raise
    finally:
        guard.restore_signal_handlers()
    if guard.preempted_by:
        checkpoint = _last_checkpoint(run_dir / "checkpoints", cfg.trainer.save_only_model)
        if main_process:
            write_json_atomic(run_dir / "metrics.json", {**metrics, "status": "preempted", "signal": guard.preempted_by,
                                                         "global_step": trainer.state.global_step,
                                                         "last_checkpoint": checkpoint})
        raise Preempted(f"stopped by {guard.preempted_by} at step {trainer.state.global_step}; checkpoint {checkpoint}. "
                        "Rerun the same command (same hydra.run.dir) to resume.")
    runtime = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen - tokens_at_start

    # ---- after
    eval_metrics = trainer.evaluate()
    if not main_process:
        return {"status": "completed", "eval_loss": eval_metrics["eval_loss"], "rank": int(os.environ["RANK"])}
    after = task.task_score(trainer.model, tokenizer, task_rows, metric, cfg.data.max_new_tokens) if metric else None

    # ---- save: adapter first, metrics last (their presence marks a complete run)
    try:
        with atomic_dir(run_dir / "adapter") as tmp:
            adapters.save_adapter(cfg.adapter, trainer.model, tmp, initial_adapter)
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"could not save the adapter into {run_dir / 'adapter'}: {e.strerror or e}. Nothing earlier "
                        "was replaced (the new adapter is written to a temporary folder first); free some space and "
                        "rerun the same command to resume from the last checkpoint.") from None
    history = trainer.state.log_history
    write_json_atomic(run_dir / "log_history.json", history)
    report.loss_curve_png(history, run_dir / "loss.png", title=f"{cfg.adapter.method} / {cfg.quant.method}")
    metrics.update(
        status="completed",
        eval_loss=eval_metrics["eval_loss"],
        train_loss=result.training_loss,
        task_metric=metric or "none",
        task_score_after=after["score"] if after else None,
        task_eval_samples=len(task_rows),
        train_runtime_s=round(runtime, 2),
        total_runtime_s=round(time.time() - started, 2),
        global_step=trainer.state.global_step,
        resumed_from=resume,
        skipped_updates=trainer.skipped_updates,  # optimizer steps skipped for non-finite gradients
        train_tokens=tokens,
        tokens_per_s=round(tokens / runtime, 2) if runtime > 0 else None,
        peak_mem_mb=_peak_mem_mb(),
        estimated_mem_mb=round(fit["total_bytes"] / 2**20, 1) if fit else None,
        trainable_params=trainable,
        total_params=total,
        train_rows=prepared.stats.get("train_rows"),  # absent when streamed
        eval_rows=len(eval_ds),
        data_from_cache=prepared.from_cache,
        device=models.device_type(),
        world_size=world_size(),
        examples=after["examples"] if after else [],
    )
    write_json_atomic(run_dir / "metrics.json", metrics)
    write_text_atomic(run_dir / "report.md", report.run_report(cfg, metrics))
    log.info("Run complete: %s", run_dir)
    _log_serving(cfg, run_dir)
    return metrics


# --------------------------------------------------------------------------------------------------------------
# pieces


def build_trainer(cfg: DictConfig, model, tokenizer, train_ds, eval_ds, run_dir: Path):
    args = build_sft_config(cfg.trainer, run_dir / "checkpoints")
    _setup_tracking(args, run_dir)
    if not args.packing:
        # the rows come tokenized, masked and truncated (prepare.py); TRL's preparation would map over every row
        # again to rebuild what is there. Packing is TRL's own step and still runs.
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    _apply_batching(args, cfg.batching)
    _apply_memory_budget(args, cfg, model, tokenizer, train_ds)
    kernel_impl = kernels.resolve(cfg.kernels, model.config)
    if kernel_impl == "liger":
        # transformers' Trainer patches the model's RMSNorm, RoPE and MLP modules with Liger's when train() starts
        args.use_liger_kernel, args.liger_kernel_config = True, dict(kernels.LIGER_KERNEL_CONFIG)
    elif kernel_impl == "lean":
        kernels.apply_lean(model)
    if kernel_impl != "liger" and any(type(m).__module__.startswith("liger_kernel") for m in model.modules()):
        log.warning("kernels=%s, but Liger's kernels were applied earlier in this process (Liger patches transformers' "
                    "modules process-wide), so this run uses them too; run it in a fresh process for the model's "
                    "own modules.", cfg.kernels)
    if cfg.adapter.method == "full":
        model.requires_grad_(True)  # from_pretrained leaves everything trainable; stated for clarity
    if args.n_gpu > 1:
        # The validator refuses this from the visible GPU count; TrainingArguments' own count decides here (our
        # device_map keeps the whole model on one device, so the Trainer does not reset it to 1 for model parallelism),
        # before TRL's SFTTrainer raises its ValueError about DataParallel.
        raise UserError(f"one process with {args.n_gpu} GPUs would train with torch.nn.DataParallel, which TRL's "
                        f"SFTTrainer and qlora_lab do not support. Launch torchrun --nproc_per_node={args.n_gpu} -m "
                        "qlora_lab train <the same overrides>, or set CUDA_VISIBLE_DEVICES to one GPU.")
    with warnings.catch_warnings():
        # TRL 1.16 deprecates use_liger_kernel for the Hub's `kernels`, which are downloaded at run time; Liger from
        # pip also works offline, so it stays the switch here.
        warnings.filterwarnings("ignore", message="`use_liger_kernel=True` is deprecated", category=FutureWarning)
        trainer = QloraSFTTrainer(
            loss_impl=loss_impl(cfg, model.config),
            max_nonfinite_steps=cfg.max_nonfinite_steps,
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=adapters.build_peft_config(cfg.adapter, tokenizer_path=model.name_or_path),
        )
    trainer.kernels = kernel_impl
    if kernel_impl == "lean":
        kernels.apply_lean_lora(trainer.model)  # the peft layers exist once SFTTrainer has wrapped the model
    return trainer


def _apply_batching(args, batching: str) -> None:
    """Set the SFTConfig fields for ``batching``."""
    if batching == "grouped":
        if hasattr(args, "train_sampling_strategy"):  # transformers >= 5.2x
            args.train_sampling_strategy = "group_by_length"
        else:
            args.group_by_length = True
    elif batching == "padding_free":
        args.padding_free = True
        # TRL 1.16 refuses padding_free with a max_length ("not enforced"); the rows are truncated to it already
        # (prepare.py), so TRL gets None.
        args.max_length = None


def _apply_memory_budget(args, cfg: DictConfig, model, tokenizer, train_ds) -> None:
    """Checkpoint every n-th decoder layer, with the largest n whose estimated step fits cfg.memory_budget_gb."""
    budget_gb = cfg.memory_budget_gb
    if budget_gb == "auto":
        if not torch.cuda.is_available():
            return  # CPU: the RAM is the limit and speed matters more; set a number to trade speed for memory
        budget_gb = 0.9 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    if budget_gb is None or args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
        return
    if cfg.adapter.method == "prefix":  # peft's prefix tuning breaks under activation checkpointing
        log.warning("memory_budget_gb is ignored for adapter=prefix (it cannot use activation checkpointing)")
        return
    plan = estimate.checkpoint_plan(cfg, model.name_or_path, tokenizer, train_ds, float(budget_gb) * 2**30)
    if plan is None:
        return
    full, every = plan
    if not hasattr(args, "activation_checkpointing_kwargs"):  # transformers < 5.2x: all layers or none
        log.warning("memory_budget_gb: this transformers version checkpoints all layers or none; all layers")
        args.gradient_checkpointing = True
        return
    args.activation_checkpointing = True
    args.activation_checkpointing_kwargs = {**(args.activation_checkpointing_kwargs or {}), "every_n_layers": every}
    log.info("memory budget %.1f GiB: estimated %.2f GiB without checkpointing; checkpointing every %d layer(s)",
             float(budget_gb), full / 2**30, every)


class EvalBeforeTraining(TrainerCallback):
    """The base model's eval loss (adapter off), evaluated when train() begins.

    Not before train(): Trainer.evaluate() on a model train() has not wrapped yet prepares it with accelerate's
    prepare_model(evaluation_mode=True), which marks the bare model as prepared, and train()'s prepare() then never
    wraps it in DDP (accelerate: "Ensure we can't double wrap a model") — gradients were not all-reduced (measured
    on 2 CPU ranks: first grad norm 0.828 instead of 0.802, different adapters per rank). At on_train_begin the
    model is already wrapped, as for the Trainer's own eval_on_start.
    """

    def __init__(self, trainer, adapter_cfg: DictConfig, metrics: dict[str, Any]):
        self.trainer, self.adapter_cfg, self.metrics = trainer, adapter_cfg, metrics

    def on_train_begin(self, args, state, control, **kwargs):
        with adapters.base_model_only(self.adapter_cfg, self.trainer.model):
            # into the run's metrics at once, so that a preempted or failed run's metrics.json keeps it too
            self.metrics["eval_loss_before"] = self.trainer.evaluate(metric_key_prefix="before")["before_loss"]


def loss_impl(cfg: DictConfig, model_config) -> str:
    """The loss path for ``cfg.loss`` on this model (see TrainRunConfig.loss)."""
    trl_only = needs_trl_loss(cfg.trainer, model_config)
    if trl_only and cfg.loss != "fused":
        if cfg.loss != "auto":
            log.warning("loss=%s does not compute %s: using TRL's loss (loss=fused)", cfg.loss, trl_only)
        return "fused"
    if cfg.loss in ("auto", "selective"):
        why_not = selective_loss_supported(model_config, cfg.adapter.method)
        if why_not is None:
            return "selective"
        if cfg.loss == "selective":
            log.warning("loss=selective does not apply here (%s): using loss=native", why_not)
        return "native"
    return cfg.loss


def _setup_tracking(args, run_dir: Path) -> None:
    """Point the trainer's report_to integrations at this run: TensorBoard logs in <run>/tensorboard; MLflow in
    $MLFLOW_TRACKING_URI, or a local file store ./mlruns shared by all runs and sweeps started here. Credentials
    (WANDB_API_KEY, HF_TOKEN, ...) stay in the environment: nothing secret is written to the run's config."""
    targets = set(args.report_to or [])
    if not args.run_name:
        args.run_name = f"{run_dir.parent.name}/{run_dir.name}"
    if targets & {"tensorboard", "all"}:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if targets & {"mlflow", "all"}:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (Path.cwd() / "mlruns").as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "qlora-lab")
        if os.environ["MLFLOW_TRACKING_URI"].startswith("file:"):
            # MLflow 3 refuses its file store unless allowed; it needs no server or database, so it is the offline
            # default here. Point MLFLOW_TRACKING_URI at sqlite:///... or a server to use those instead.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _log_serving(cfg: DictConfig, run_dir: Path) -> None:
    """How to use the run next: merge/export, and vLLM's command for serving the adapter as it is."""
    from qlora_lab.export import vllm_serving

    base = str(cfg.model.name_or_path)
    if base.startswith("builtin:"):
        base = models.resolve_model_path(base)
    command, why = vllm_serving(run_dir, base)
    log.info("Next: qlora-lab chat run=%s | qlora-lab merge run=%s | qlora-lab export run=%s format=gguf", run_dir,
             run_dir, run_dir)
    log.info("Serve with vLLM: %s", command or f"not as an adapter ({why})")


def _task_metric(data_cfg: DictConfig, task_rows: list) -> str | None:
    metric = data_cfg.task_metric
    if metric == "none" or data_cfg.task_eval_samples == 0 or not task_rows:
        return None  # plain-text data has no prompt/answer pairs to score
    if metric == "auto":
        return "json_match" if data_cfg.source == "demo" else "exact_match"
    return metric


def _checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoint-N folders in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def _last_checkpoint(folder: Path, model_only: bool = False) -> str | None:
    """The newest checkpoint-N folder a resume can use, or None.

    A folder whose save was interrupted (no trainer_state.json: the Trainer writes it last) or that holds a missing
    or damaged file (checkpoints.problem: e.g. a weights file cut short by a full disk) is passed over.
    """
    return _resume_point(folder, model_only)[0]


def _resume_point(folder: Path, model_only: bool) -> tuple[str | None, dict[Path, str]]:
    """(the newest usable checkpoint or None, {each newer unusable checkpoint: what is wrong with it})."""
    unusable: dict[Path, str] = {}
    for ckpt in _checkpoint_folders(folder):
        why = checkpoints.problem(ckpt, model_only)
        if why is None:
            return str(ckpt), unusable
        unusable[ckpt] = why
        log.warning("Checkpoint %s cannot be resumed from: %s. Trying the one before it.", ckpt, why)
    return None, unusable


def _no_usable_checkpoint(folder: Path, unusable: dict[Path, str]) -> UserError:
    found = "; ".join(f"{ckpt.name}: {why}" for ckpt, why in unusable.items())
    return UserError(f"no checkpoint in {folder} can be resumed from ({found}). Nothing was changed. Fix: restore "
                     f"a checkpoint folder from a backup, or move {folder} away to train this run from the start, "
                     "or train into a new folder (another hydra.run.dir).")


UNUSABLE = "unusable"  # checkpoints/unusable/: checkpoints a resume passed over, kept for inspection


def _set_aside(unusable: dict[Path, str]) -> None:
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


def _tokens_seen(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


RUN_CONFIG = "config.yaml"
# what a resume may change: where the run lives, how long it trains, how often it logs and saves, process settings
RESUME_MAY_CHANGE = ("output_dir", "allocator", "fail_fast", "max_nonfinite_steps", "score_before",
                     "trainer.max_steps", "trainer.num_train_epochs", "trainer.logging_steps", "trainer.save_steps",
                     "trainer.save_total_limit", "trainer.eval_steps", "trainer.report_to")


def _check_rerun(cfg: DictConfig, run_dir: Path, resume: str | None) -> None:
    """Refuse to train a completed run again (unless asked to train it longer), or to resume a run with other
    settings than it started with."""
    done = _previous_metrics(run_dir, ("status", "global_step"))
    if done.get("status") == "completed" and not _trains_longer(cfg.trainer, resume, done.get("global_step", 0)):
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


def _trains_longer(trainer_cfg: DictConfig, checkpoint: str | None, steps_done: int) -> bool:
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


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _previous_metrics(run_dir: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    old = _read_metrics(run_dir)
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


def _log_allocator(requested: str) -> None:
    want, have = allocator.resolve(requested), allocator.active()
    if want == have:
        log.info("C allocator: %s (allocator=%s)%s", have, requested,
                 "; pip install 'qlora-lab[mimalloc]' for mimalloc, less peak memory on CPU"
                 if requested == "auto" and allocator.auto_lacks_mimalloc() else "")
    else:
        log.warning("allocator=%s asks for %s but this process runs with %s: an allocator is chosen when a process "
                    "starts. `qlora-lab train` re-executes itself with the one given on its command line (not one "
                    "set in a config file); processes started otherwise (train() called from Python, submitit/SLURM "
                    "jobs) keep their own; LD_PRELOAD=%s sets it by hand.", requested, want, have,
                    allocator.library(want) or want)


def _reset_peak_mem() -> None:
    """Start this run's peak-memory window (several multirun jobs share one process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mem_mb() -> float:
    """Peak memory since _reset_peak_mem: CUDA max allocated, else the process's peak RSS, in MiB."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # lifetime peak (KiB on Linux)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a unique probe: under torchrun every rank checks the same shared run dir at the same time
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output_dir={str(run_dir)!r} is not writable ({e.strerror}). Fix: choose another folder "
                        "with hydra.run.dir=...") from None


# --------------------------------------------------------------------------------------------------------------
# the Hydra shell

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
    except Preempted as e:
        log.warning("%s", e)
        sys.exit(EXIT_PREEMPTED)  # requeue-able exit for SLURM / submitit
    except Exception as e:
        if not in_multirun():
            raise
        if cfg.fail_fast:
            _stop_sweep(cfg, e)
        return _record_failed_job(cfg, e)
    finally:
        _release_memory()
    if is_main_process():
        print((Path(cfg.output_dir) / "report.md").read_text(), file=sys.stdout, flush=True)
    return float(metrics["eval_loss"])


def _stop_sweep(cfg: DictConfig, error: Exception) -> None:
    """fail_fast: end the whole sweep at this job. Hydra's launchers catch a job's exceptions and the basic sweeper
    looks at them only after the whole batch has run, so the process exits here instead (SystemExit passes through
    Hydra's job runner); the job is recorded as failed first."""
    _write_failed(cfg, error)
    if isinstance(error, UserError):
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        log.exception("Job failed", exc_info=error)
    print(f"fail_fast=true: the sweep stops at this job ({cfg.output_dir}).", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(error, UserError) else 1)


def _write_failed(cfg: DictConfig, error: Exception) -> None:
    earlier = _read_metrics(Path(cfg.output_dir))
    if earlier.get("status") != "completed":  # a refused rerun of a completed job leaves its results alone
        # what train() recorded (global_step, last checkpoint, the "before" scores) stays, with the error
        write_json_atomic(Path(cfg.output_dir) / "metrics.json",
                          {**earlier, "status": "failed", "error": f"{type(error).__name__}: {error}"})


def _record_failed_job(cfg: DictConfig, error: Exception) -> float:
    """In a sweep, a failed job is recorded (metrics.json status=failed) instead of ending the sweep.

    Optuna's sweeper is told through an exception (it marks the trial FAIL and stops only past its
    max_failure_rate); the basic sweeper gets NaN, which the sweep report lists as failed.
    """
    from hydra.core.hydra_config import HydraConfig

    log.error("Job failed: %s: %s", type(error).__name__, error)
    _write_failed(cfg, error)
    if "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower():
        raise error
    return float("nan")


def _release_memory() -> None:
    """Free the finished job's model, optimizer and caches before the next job of a sweep starts."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
