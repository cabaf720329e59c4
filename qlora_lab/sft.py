"""The SFTTrainer qlora_lab runs: TRL's, plus a loss-path switch, a divergence guard and preemption handling.

- ``native_loss``: compute the loss with the model's own cross-entropy instead of TRL 1.16's fused LM head.
  TRL routes every step through ``fused_lm_head=True`` (trl/trainer/sft_trainer.py compute_loss), which computes
  log-probs, entropy and top-1 accuracy over the full vocabulary in tiles; without Triton (CPU) those tiles run as
  plain torch ops, several full-vocabulary passes per step. The model's own loss (transformers ForCausalLMLoss) is
  the same mean over the same label tokens (``num_items_in_batch`` counts labels != -100 in both). Cost: no
  entropy / mean_token_accuracy in the logs, and the full logits are materialised.
- Divergence guard: ``max_nonfinite_steps`` consecutive optimizer steps with a non-finite loss stop the run with
  :class:`Diverged` (the checkpoints written before stay; the run is recorded as failed).
- Preemption: SIGTERM / SIGUSR1 set a flag; at the next step boundary the trainer saves a checkpoint and stops, and
  the caller exits with code 143 so SLURM/submitit can requeue it. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from qlora_lab.errors import UserError

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job stopped by SIGTERM


class Diverged(UserError):
    """The loss was not finite for too many consecutive steps."""


class Preempted(Exception):
    """Training stopped at a step boundary after SIGTERM/SIGUSR1, with a checkpoint saved."""


class QloraSFTTrainer(SFTTrainer):
    def __init__(self, *args, native_loss: bool = False, max_nonfinite_steps: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.native_loss = native_loss
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_steps = 0
        self._step_loss_finite = True
        # TRL keeps QLoRA adapters in bf16; remember each trainable tensor's dtype so a resume keeps it
        self._trainable_dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Resuming reloads the adapter through peft, which upcasts it to float32; training would then go on in
        # another precision than the uninterrupted run. Cast back before the optimizer state is loaded, so that
        # the optimizer state is cast to the same dtypes as in the uninterrupted run.
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in (model or self.model).named_parameters():
            want = self._trainable_dtypes.get(name)
            if want is not None and param.dtype != want:
                param.data = param.data.to(want)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.native_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            self._step_loss_finite = False
        return loss

    def check_step(self) -> None:
        """Called at each optimizer-step end (by :class:`GuardCallback`)."""
        self._nonfinite_steps = 0 if self._step_loss_finite else self._nonfinite_steps + 1
        self._step_loss_finite = True
        if self.max_nonfinite_steps and self._nonfinite_steps >= self.max_nonfinite_steps:
            raise Diverged(f"the training loss was not finite for {self._nonfinite_steps} consecutive steps (up to "
                           f"step {self.state.global_step}). Lower trainer.learning_rate, keep trainer.max_grad_norm "
                           "> 0, or use bf16 instead of fp16; the checkpoints saved before are kept.")


class GuardCallback(TrainerCallback):
    """Divergence checks and preemption at step boundaries."""

    def __init__(self, trainer: QloraSFTTrainer):
        self.trainer = trainer
        self.preempted_by: str | None = None
        self._previous: dict[int, object] = {}

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.preempted_by is not None:  # second signal: stop now
            log.error("Second %s: exiting at once", name)
            os._exit(EXIT_PREEMPTED)
        self.preempted_by = name
        log.warning("%s received: saving a checkpoint at the end of this step, then exiting (send it again to exit "
                    "at once)", name)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.check_step()
        if self.preempted_by is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
