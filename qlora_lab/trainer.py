"""Building the trainer: the model and TRL's SFTTrainer set up exactly as the run's plan says.

:func:`setup` is the one chain from a plan to a ready trainer, shared by ``qlora-lab train`` (train.py) and the
bench's worker (bench/worker.py), so a bench measures exactly what ``train`` runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import TrainerCallback

from qlora_lab import adapters, measure, models
from qlora_lab.cpu import kernels as lean
from qlora_lab.errors import UserError
from qlora_lab.plan import LIGER_KERNEL_CONFIG, Plan
from qlora_lab.sft import QloraSFTTrainer
from qlora_lab.sftconfig import build_sft_config, overfitting_fields

log = logging.getLogger(__name__)


def setup(cfg: DictConfig, plan: Plan, model_path: str, tokenizer, train_ds, eval_ds, run_dir: Path):
    """The base model (in the plan's dtypes and quantization), the trainer around it, and what needs the wrapped
    model (the plan's dropout, LoftQ, IA3 on a 4-bit base)."""
    fraction = measure.limit_cuda_memory(cfg.memory_budget_gb)
    if fraction is not None:
        log.info("memory_budget_gb=%g: this process may use %.1f%% of the GPU's memory", cfg.memory_budget_gb,
                 100 * fraction)
    model = models.build_model(cfg.model, cfg.quant, model_path, plan.model_dtype, plan.compute_dtype,
                               list(plan.skip_modules))
    trainer = build_trainer(cfg, plan, model, tokenizer, train_ds, eval_ds, run_dir)
    adapters.apply_post_init(cfg.adapter, trainer.model, model_path, plan.dropout_impl)
    return trainer


def build_trainer(cfg: DictConfig, plan: Plan, model, tokenizer, train_ds, eval_ds, run_dir: Path):
    """TRL's SFTTrainer (qlora_lab's subclass) for the model, as the plan says: precision, batching, checkpointing,
    kernels and loss path."""
    args = build_sft_config(cfg.trainer, run_dir / "checkpoints", cuda=plan.machine.device == "cuda",
                            mixed_precision=plan.mixed_precision,
                            extra=overfitting_fields(plan.keep, cfg.early_stopping, cfg.trainer))
    _setup_tracking(args, run_dir)
    if not args.packing:
        # the rows come tokenized, masked and truncated (prepare.py); TRL's preparation would map over every row
        # again to rebuild what is there. Packing is TRL's own step and still runs.
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    args.pad_to_multiple_of = plan.pad_to_multiple_of
    _apply_batching(args, plan.batching)
    _apply_checkpointing(args, plan)
    # TRL's own offloading (torchtune's OffloadActivations: a side CUDA stream, a forward stash, backward prefetch),
    # entered around every training_step; the plan turns it on only on CUDA
    args.activation_offloading = plan.offload_activations
    kernel_impl = plan.kernels
    if kernel_impl == "liger":
        # transformers' Trainer patches the model's RMSNorm, RoPE and MLP modules with Liger's when train() starts
        args.use_liger_kernel, args.liger_kernel_config = True, dict(LIGER_KERNEL_CONFIG)
    elif kernel_impl == "lean":
        lean.apply_lean(model)
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
            loss_impl=plan.loss,
            max_nonfinite_steps=cfg.max_nonfinite_steps,
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=adapters.build_peft_config(cfg.adapter, tokenizer_path=model.name_or_path,
                                                   rank=(plan.lora_r, plan.lora_alpha)),
        )
    trainer.kernels = kernel_impl
    add_early_stopping(trainer, cfg.early_stopping)
    if kernel_impl == "lean":
        lean.apply_lean_lora(trainer.model)  # the peft layers exist once SFTTrainer has wrapped the model
    if plan.compile == "layers":
        log.info("compile=layers: %d decoder layers compiled (torch.compile); the first steps include compiling",
                 compile_layers(trainer.model))
    return trainer


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (nn.Module.compile) — regional compilation: the layers share their
    code, so one graph (recompiled for new shapes) serves all; the loss, the LM head and the optimizer stay eager.
    The decoder layers are transformers' GradientCheckpointingLayer subclasses, whose checkpoint call is inside
    their forward (transformers 5.x), so with checkpointing on it is compiled with the layer (dynamo traces
    torch.utils.checkpoint; tests/test_compile.py runs both). Returns how many were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def add_early_stopping(trainer, early_stopping: DictConfig) -> None:
    """transformers' own EarlyStoppingCallback when early_stopping.patience is set (the SFTConfig fields it reads:
    sftconfig.overfitting_fields)."""
    if early_stopping.patience:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=early_stopping.patience,
                                                   early_stopping_threshold=early_stopping.threshold))


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


def _apply_checkpointing(args, plan: Plan) -> None:
    """Checkpoint every n-th decoder layer, as the plan decided (from trainer.activation_checkpointing, or the
    memory budget)."""
    if plan.checkpointing_by != "budget":
        return  # "trainer": SFTConfig has it from trainer.*; "none": off
    if plan.checkpoint_every == 1 and not hasattr(args, "activation_checkpointing_kwargs"):
        args.gradient_checkpointing = True  # transformers < 5.2x: all layers or none
        return
    args.activation_checkpointing = True
    args.activation_checkpointing_kwargs = {**(args.activation_checkpointing_kwargs or {}),
                                            "every_n_layers": plan.checkpoint_every}
    log.info("memory budget %.1f GiB: estimated %.2f GiB without checkpointing; checkpointing every %d layer(s)",
             plan.memory_budget_gb, plan.estimated_unchecked_gb, plan.checkpoint_every)


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
