"""`qlora-lab train`: data → plan → model → trainer → before → train → after → save, read top to bottom.

``train(cfg) -> dict`` is a plain function (tests call it with a composed config); :func:`main` is the thin Hydra
shell that returns the objective (held-out eval loss) for sweepers. The run directory's layout and its rerun and
resume rules are in rundir.py; the plan (what every ``auto`` becomes here) in plan.py; building the model and the
trainer in trainer.py; what a failed job does to a sweep in sweeps.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from qlora_lab import (
    adapters,
    distributed,
    estimate,
    measure,
    models,
    objectives,
    plan,
    preference,
    prepare,
    progress,
    report,
    rundir,
    sweeps,
    task,
)
from qlora_lab.config import CONF_DIR, register_configs
from qlora_lab.cpu import allocator
from qlora_lab.distributed import is_main_process, world_size
from qlora_lab.errors import UserError, exit_on_user_error, in_multirun
from qlora_lab.files import atomic_dir, write_json_atomic, write_text_atomic
from qlora_lab.sft import EXIT_PREEMPTED, Diverged, GuardCallback, Preempted
from qlora_lab.trainer import EvalBeforeTraining, setup
from qlora_lab.validate import validate

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune the adapter described by ``cfg``; write the run directory; return the metrics."""
    validate(cfg)
    run_dir = Path(cfg.output_dir)
    main_process = is_main_process()  # under torchrun/accelerate only rank 0 writes run artifacts

    # ---- the run directory: a rerun's rules checked before anything in it is written (rundir.py)
    rundir.check_writable(run_dir)
    resume, unusable = rundir.resume_point(run_dir / "checkpoints", cfg.trainer.save_only_model)
    rundir.check_rerun(cfg, run_dir, resume)
    if unusable and resume is None:
        raise rundir.no_usable_checkpoint(run_dir / "checkpoints", unusable)
    allocator.log_choice(cfg.allocator)
    started = time.time()
    measure.reset_peak()
    if main_process:
        rundir.set_aside(unusable)
        write_json_atomic(run_dir / "environment.json", rundir.environment(cfg))

    # ---- data: the tokenizer and the rows first, the most common source of user errors (cached: prepare.py)
    model_path = models.resolve_model_path(cfg.model.name_or_path)
    tokenizer = models.build_tokenizer(cfg.model, model_path)
    objective = cfg.objective.name  # sft: SFTTrainer (trainer.py); dpo/orpo/kto: TRL's own trainers (objectives.py)
    if objective == "sft":
        prepared = prepare.prepare(cfg, tokenizer, run_dir if main_process else None)
    else:
        prepared = preference.prepare(cfg, tokenizer, run_dir if main_process else None)
    train_ds, eval_ds = prepared.train, prepared.eval

    # ---- plan: every `auto` decided once for this machine, before any weight is loaded (plan.py). After the data,
    # because the memory estimate that picks the checkpointing needs the rows' lengths.
    the_plan = plan.make(cfg, plan.Machine.detect(), models.model_config(cfg.model, model_path),
                         estimate.shape_or_none(tokenizer, train_ds, cfg.trainer.max_length), prepared.stats,
                         len(prepared.task_rows))
    if main_process:
        log.info("%s", plan.describe(the_plan))
        rundir.record_plan(cfg, run_dir, the_plan, resume)
    metric = None if the_plan.task_metric == "none" else the_plan.task_metric
    task_rows = prepared.task_rows if metric else []

    # ---- model and trainer, as the plan says (trainer.py: the same chain the bench measures)
    build = setup if objective == "sft" else objectives.setup
    trainer = build(cfg, the_plan, model_path, tokenizer, train_ds, eval_ds, run_dir)
    distributed.warn_if_not_sharded(trainer)
    trainer.add_callback(progress.EvalSummary(len(eval_ds)))  # a line per held-out evaluation, with its time
    initial_adapter = adapters.save_initial_adapter(cfg.adapter, trainer.model, run_dir) if main_process else None
    trainable, total = adapters.check_only_adapter_trainable(cfg.adapter, trainer.model)
    log.info("Trainable parameters: %s of %s (%.3f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             "" if cfg.adapter.method == "full" else " — adapter only")

    # ---- before: the base model alone (adapter disabled)
    metrics: dict[str, Any] = {"status": "running"}
    if cfg.score_before and metric and resume is None:
        if main_process:  # generation is not collective: rank 0 scores alone
            with objectives.starting_model(cfg, trainer.model):
                before = task.task_score(trainer.model, tokenizer, task_rows, metric, cfg.data.max_new_tokens)
                if objective != "sft":
                    metrics["preference_accuracy_before"] = objectives.preference_accuracy(
                        trainer.model, tokenizer, prepared.pairs)
            metrics["task_score_before"] = before["score"]
            log.info("Held-out %s before training: %.3f (n=%d)", metric, before["score"], before["n"])
        trainer.add_callback(EvalBeforeTraining(trainer, cfg.adapter, metrics) if objective == "sft"
                             else objectives.EvalAtStart(trainer, metrics))
    elif resume is not None:
        metrics.update(rundir.previous_metrics(run_dir, ("task_score_before", "eval_loss_before",
                                                         *objectives.BEFORE_KEYS)))

    # ---- train (resuming from the newest complete checkpoint in this run dir, if any)
    if resume:
        log.info("Resuming from %s", resume)
    if main_process:
        rundir.write_config(cfg, run_dir, resume)
    tokens_at_start = rundir.tokens_seen(resume)
    guard = GuardCallback(trainer)
    trainer.add_callback(guard)
    guard.install_signal_handlers()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Diverged as e:
        if main_process:
            last = rundir.last_checkpoint(run_dir / "checkpoints", cfg.trainer.save_only_model)
            write_json_atomic(run_dir / "metrics.json", {**metrics, "status": "failed", "error": str(e),
                                                         "global_step": trainer.state.global_step,
                                                         "last_checkpoint": last})
        raise
    finally:
        guard.restore_signal_handlers()
    if guard.preempted_by:
        checkpoint = rundir.last_checkpoint(run_dir / "checkpoints", cfg.trainer.save_only_model)
        if main_process:
            write_json_atomic(run_dir / "metrics.json", {**metrics, "status": "preempted", "signal": guard.preempted_by,
                                                         "global_step": trainer.state.global_step,
                                                         "last_checkpoint": checkpoint})
        # no rank exits before rank 0 has recorded the stop: once one worker has exited with an error, torchrun (and
        # accelerate launch, which runs it) sends SIGTERM to the others (torch/distributed/elastic/agent/server/
        # api.py, SimpleElasticAgent.run → _shutdown)
        trainer.accelerator.wait_for_everyone()
        raise Preempted(f"stopped by {guard.preempted_by} at step {trainer.state.global_step}; checkpoint {checkpoint}. "
                        "Rerun the same command (same hydra.run.dir) to resume.")
    runtime = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen - tokens_at_start
    # the evaluations during training (the final one below is of the weights kept: the best with keep=best)
    curve = report.eval_curve(trainer.state.log_history, cfg.early_stopping.metric)
    stopped_early = bool(cfg.early_stopping.patience) and trainer.state.global_step < trainer.state.max_steps

    # ---- after
    eval_metrics = trainer.evaluate()
    # FSDP / ZeRO-3: every rank takes part in gathering the sharded weights; rank 0 saves them (distributed.py)
    gathered = distributed.gathered_state_dict(trainer)
    if not main_process:
        return {"status": "completed", "eval_loss": eval_metrics["eval_loss"], "rank": int(os.environ["RANK"])}
    after = task.task_score(trainer.model, tokenizer, task_rows, metric, cfg.data.max_new_tokens) if metric else None
    if objective != "sft":
        metrics.update(objectives.reward_metrics(eval_metrics, "after"), objective=objective, init_from=cfg.init_from)
        if "preference_accuracy_before" in metrics:
            metrics["preference_accuracy_after"] = objectives.preference_accuracy(trainer.model, tokenizer,
                                                                                  prepared.pairs)

    # ---- save: adapter first, metrics last (their presence marks a complete run)
    try:
        with atomic_dir(run_dir / "adapter") as tmp:
            adapters.save_adapter(cfg.adapter, trainer.model, tmp, initial_adapter, gathered)
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
        keep=the_plan.keep,
        best_step=trainer.state.best_global_step if the_plan.keep == "best" else None,
        best_metric=({cfg.early_stopping.metric: trainer.state.best_metric}
                     if trainer.state.best_metric is not None else None),
        stopped_early=stopped_early,
        eval_curve=curve,
        resumed_from=resume,
        skipped_updates=trainer.skipped_updates,  # optimizer steps skipped for non-finite gradients
        train_tokens=tokens,
        tokens_per_s=round(tokens / runtime, 2) if runtime > 0 else None,
        peak_mem_mb=measure.peak_mb(),
        estimated_mem_mb=round(the_plan.estimated_gb * 1024, 1) if the_plan.estimated_gb is not None else None,
        trainable_params=trainable,
        total_params=total,
        lora_r=the_plan.lora_r, lora_alpha=the_plan.lora_alpha,  # adapter.r / alpha as trained (auto resolved)
        train_rows=prepared.stats.get("train_rows"),  # absent when streamed
        eval_rows=len(eval_ds),
        data_from_cache=prepared.from_cache,
        device=models.device_type(),
        world_size=world_size(),
        distributed=distributed.strategy(trainer),  # FSDP2, DeepSpeed ZeRO-3, DDP, none: what ran
        examples=after["examples"] if after else [],
    )
    write_json_atomic(run_dir / "metrics.json", metrics)
    write_text_atomic(run_dir / "report.md", report.run_report(cfg, metrics))
    log.info("Run complete: %s", run_dir)
    _log_serving(cfg, run_dir)
    return metrics


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
        # Under torchrun, once one worker has exited non-zero the agent SIGTERMs the others
        # (torch/distributed/elastic/multiprocessing/api.py, "Sending process ... closing signal SIGTERM"); a worker
        # still on its way out — same step, checkpoint already written, seconds of interpreter shutdown left — died
        # of it (-15) in the 2-rank preemption test. Ignored from here: SIG_IGN is the one disposition CPython's
        # shutdown keeps (a Python handler is reset to the default there), so the worker ends with 143 as well.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(EXIT_PREEMPTED)  # requeue-able exit for SLURM / submitit
    except Exception as e:
        if not in_multirun():
            raise
        if cfg.fail_fast:
            sweeps.stop_sweep(cfg, e)
        return sweeps.record_failed_job(cfg, e)
    finally:
        sweeps.release_memory()
    if is_main_process():
        print((Path(cfg.output_dir) / "report.md").read_text(), file=sys.stdout, flush=True)
    return float(metrics["eval_loss"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
