"""The SFTTrainer qlora_lab runs: TRL's, plus a loss-path switch, a divergence guard and preemption handling.

- ``loss_impl`` "native": the model's own cross-entropy instead of TRL 1.16's fused LM head.
  TRL routes every step through ``fused_lm_head=True`` (trl/trainer/sft_trainer.py compute_loss), which computes
  log-probs, entropy and top-1 accuracy over the full vocabulary in tiles; without Triton (CPU) those tiles run as
  plain torch ops, several full-vocabulary passes per step. The model's own loss (transformers ForCausalLMLoss) is
  the same mean over the same label tokens (``num_items_in_batch`` counts labels != -100 in both). Cost: no
  entropy / mean_token_accuracy in the logs, and the full logits are materialised.
- ``loss_impl`` "selective" (the default where it applies): logits only where there is a label, in chunks. The
  LM head is the widest matmul of a small model and the float32 logits are the largest tensor of any model
  (batch x seq x vocab x 4 bytes); with completion-only loss most positions have no label. A forward pre-hook on the output layer takes the final hidden
  states of the labelled positions and hands the layer an empty input, then the loss is computed here from those
  states chunk by chunk (each chunk's logits recomputed in backward, so at most one chunk of logits exists). The
  hook runs inside the model's own forward, so DDP/FSDP wrappers see an ordinary call. Same value and gradients as
  the model's own loss (same sum over the same label tokens divided by ``num_items_in_batch``). Liger's fused
  linear cross-entropy does the same in Triton kernels; it needs CUDA, this needs nothing.
- Divergence guard: an optimizer step whose gradients are not finite is skipped (the weights stay as they were);
  ``max_nonfinite_steps`` consecutive such steps stop the run with :class:`Diverged` (the checkpoints written
  before stay, and hold finite weights; the run is recorded as failed). Under fp16 a GradScaler skips overflowing
  steps itself and backs its scale off; those are how it works, not divergence, so only what it cannot recover from
  counts (:func:`counts_as_divergent`).
- Length-grouped batches in an order drawn from (seed, epoch) alone, so that a resumed run skips exactly the batches
  it trained (:class:`SeededLengthGroupedSampler`).
- Preemption: SIGTERM / SIGUSR1 set a flag; at the next step boundary the trainer saves a checkpoint and stops, and
  the caller exits with code 143 so SLURM/submitit can requeue it. A second signal exits at once. Under several
  ranks the flag is all-reduced at every step boundary, so all ranks stop at the same step even when one alone was
  signalled.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from qlora_lab import checkpoints
from qlora_lab.cpu.dropout import FastDropout, recompute_dropout_outputs
from qlora_lab.distributed import stop_signal_on_any_rank
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job stopped by SIGTERM


class Diverged(UserError):
    """The loss was not finite for too many consecutive steps."""


class Preempted(Exception):
    """Training stopped at a step boundary after SIGTERM/SIGUSR1, with a checkpoint saved."""


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler with its order drawn from (seed, epoch) instead of the global RNG.

    transformers 5.24 builds LengthGroupedSampler with ``generator=None`` (Trainer._get_train_sampler), so its order
    depends on whatever drew from the global RNG before the epoch began: the before-training evaluation's data
    loader on a fresh run, nothing on a resume, whose skipped batches were then other batches than the ones it had
    trained. accelerate makes the uniform RandomSampler seedable the same way (SeedableRandomSampler); the
    Trainer's epoch loop calls ``set_epoch`` through accelerate's DataLoaderShard.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class DivergenceGuard:
    """The divergence guard, for any transformers Trainer (SFT here; TRL's preference trainers, objectives.py):
    placed before the Trainer class in the bases, so that its ``training_step`` and ``_get_grad_norm`` wrap the
    Trainer's; :class:`GuardCallback` calls ``drop_nonfinite_update`` and ``check_step`` at the step's hooks. The
    module docstring says what it does."""

    def init_guard(self, max_nonfinite_steps: int) -> None:
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_steps = 0
        self._step_loss_finite = True
        self._step_grads_finite = True
        self._step_scale = None  # the fp16 loss scale the step in progress ran with (None without a GradScaler)
        self._streak_scale = None  # the loss scale at the first step of the current run of non-finite steps
        self.skipped_updates = 0  # optimizer steps skipped for non-finite gradients
        self._grad_norm = None  # the Trainer's own gradient norm of the step in progress

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.note_step_loss(loss)
        return loss

    def note_step_loss(self, loss: torch.Tensor) -> None:
        """Record whether a micro-batch's loss was finite (for the optimizer step it belongs to)."""
        if not torch.isfinite(loss.detach()).all():
            self._step_loss_finite = False

    def _get_grad_norm(self, model, grad_norm=None):
        # transformers 5.24's step computes the total gradient norm here (clipping or not), before the
        # on_pre_optimizer_step callbacks: kept for drop_nonfinite_update instead of computing it twice
        self._grad_norm = super()._get_grad_norm(model, grad_norm)
        return self._grad_norm

    def drop_nonfinite_update(self) -> None:
        """Before each optimizer step: with a non-finite gradient anywhere, skip the update (the optimizer skips
        parameters without a gradient), so that one bad batch cannot turn every weight into NaN for good — which
        AdamW would do, and the checkpoints after it would keep. Decided on the step's total gradient norm; under
        DDP the gradients are all-reduced first, so every rank decides alike."""
        norm, self._grad_norm = self._grad_norm, None
        if norm is None:  # a Trainer that did not compute it: the same norm here
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else 0.0
        self._step_scale = self._loss_scale()
        if math.isfinite(float(norm)):
            return
        for p in self.model.parameters():
            p.grad = None
        self.skipped_updates += 1
        self._step_grads_finite = False
        if self._step_scale is not None and self._step_loss_finite:
            log.info("step %d: fp16 gradients overflowed at loss scale %g; the update is skipped and the scale backs "
                     "off (%d skipped so far)", self.state.global_step + 1, self._step_scale, self.skipped_updates)
        else:
            log.warning("step %d: non-finite gradients; this update is skipped (%d so far)",
                        self.state.global_step + 1, self.skipped_updates)

    def _loss_scale(self) -> float | None:
        """The fp16 GradScaler's current scale (accelerate's ``Accelerator.scaler``), or None without one."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return float(scaler.get_scale())

    def check_step(self) -> None:
        """Called at each optimizer-step end (by :class:`GuardCallback`)."""
        loss_finite, grads_finite, scale = self._step_loss_finite, self._step_grads_finite, self._step_scale
        self._step_loss_finite, self._step_grads_finite, self._step_scale = True, True, None
        if loss_finite and grads_finite:
            self._nonfinite_steps, self._streak_scale = 0, None
        else:
            if self._streak_scale is None:
                self._streak_scale = scale
            backed_off = scale is not None and self._streak_scale is not None and scale < self._streak_scale
            if counts_as_divergent(loss_finite, grads_finite, scale, backed_off):
                self._nonfinite_steps += 1
        if self.max_nonfinite_steps and self._nonfinite_steps >= self.max_nonfinite_steps:
            raise Diverged(f"the training loss was not finite for {self._nonfinite_steps} consecutive steps (up to "
                           f"step {self.state.global_step}). Lower trainer.learning_rate, keep trainer.max_grad_norm "
                           "> 0, or use bf16 instead of fp16; the checkpoints saved before are kept.")


def guarded(trainer_cls: type) -> type:
    """``trainer_cls`` with the divergence guard (a subclass named Guarded<name>)."""
    return type(f"Guarded{trainer_cls.__name__}", (DivergenceGuard, trainer_cls), {})


class QloraSFTTrainer(DivergenceGuard, SFTTrainer):
    def __init__(self, *args, loss_impl: str = "fused", max_nonfinite_steps: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_impl = loss_impl  # "fused" (TRL's), "native" (the model's), "selective" (labelled positions)
        self.init_guard(max_nonfinite_steps)
        self._recompute_dropout = None
        # TRL keeps QLoRA adapters in bf16; remember each trainable tensor's dtype so a resume keeps it
        self._trainable_dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Resuming reloads the adapter through peft, which upcasts it to float32; training would then go on in
        # another precision than the uninterrupted run. Cast back before the optimizer state is loaded, so that
        # the optimizer state is cast to the same dtypes as in the uninterrupted run.
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._restore_trainable_dtypes(model or self.model)

    def _load_best_model(self):
        # keep=best (load_best_model_at_end): transformers reloads the best checkpoint's adapter through peft's
        # load_adapter, which upcasts it to float32 too; back to the dtypes it trained and was saved in, so that
        # <run>/adapter/ holds exactly the best checkpoint's weights
        super()._load_best_model()
        self._restore_trainable_dtypes(self.model)

    def _restore_trainable_dtypes(self, model) -> None:
        for name, param in model.named_parameters():
            want = self._trainable_dtypes.get(name)
            if want is not None and param.dtype != want:
                param.data = param.data.to(want)

    def _save_checkpoint(self, model, trial):
        # Trainer._save_checkpoint (transformers 5.24) writes weights, optimizer, scheduler, scaler and RNG state,
        # then trainer_state.json (what marks a checkpoint complete), then deletes checkpoints beyond
        # save_total_limit; it fsyncs none of it. So trainer_state.json is written only once the files before it
        # are on disk, and it and the folder are synced before an older checkpoint can be deleted
        # (qlora_lab/checkpoints.py).
        state, write_state = self.state, self.state.save_to_json

        def write_state_after_the_files(json_path: str) -> None:
            folder = Path(json_path).parent
            checkpoints.fsync_tree(folder)
            write_state(json_path)
            checkpoints.fsync_path(Path(json_path))
            checkpoints.fsync_path(folder)
            checkpoints.fsync_path(folder.parent)  # the checkpoint-N entry itself

        state.save_to_json = write_state_after_the_files
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del state.save_to_json  # back to TrainerState's own method
        rng_state = (Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                     / f"rng_state_{self.args.process_index}.pth")
        if not self.args.should_save and rng_state.is_file():  # another rank's own file, maybe written after the sync
            checkpoints.fsync_path(rng_state)

    def _get_train_sampler(self, train_dataset=None):
        lengths = None
        if "length" in (getattr(self.train_dataset, "column_names", None) or ()):
            # prepare.py stores each row's token count: read as one Arrow column instead of the Trainer's loop
            # over every row's input_ids (seconds per million rows), and hidden from the dataset the Trainer passes
            # here, whose unused columns it has removed
            from qlora_lab.data import column

            lengths = column(self.train_dataset, "length").tolist()
        if lengths is not None and self._grouped_by_length():
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return SeededLengthGroupedSampler(batch, lengths, seed)
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def _grouped_by_length(self) -> bool:
        strategy = getattr(self.args, "train_sampling_strategy", None)
        return strategy == "group_by_length" or bool(getattr(self.args, "group_by_length", False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._recompute_dropout is None:  # known once cpu.dropout.use_dropout_impl has run (after __init__)
            # not under TRL's activation offloading: these saved-tensor hooks, entered inside its own, would take every
            # saved tensor from it (only the innermost hooks run); FastDropout then keeps its output (as "fast")
            self._recompute_dropout = not self.args.torch_compile and not getattr(
                self.args, "activation_offloading", False) and any(
                isinstance(m, FastDropout) and m.recompute for m in model.modules())
        with recompute_dropout_outputs() if self._recompute_dropout else nullcontext():
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        if self.loss_impl == "fused":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        # return_outputs: the caller wants the logits, which only the model's own forward gives. TRL 1.16's
        # prediction_step asks for them only when the evaluation needs more than the loss (compute_metrics set;
        # transformers' evaluate() passes prediction_loss_only=True otherwise), so a default evaluation takes the
        # selective path like training (test_evaluation_takes_the_lean_loss_path_and_gives_the_models_own_loss).
        if self.loss_impl == "native" or return_outputs:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return self._selective_loss(model, inputs, num_items_in_batch)

    def _selective_loss(self, model, inputs, num_items_in_batch):
        labels = inputs.pop("labels")
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:]  # position t predicts token t+1
        keep = targets != -100
        head = output_layer(self.accelerator.unwrap_model(model))
        kept: list[torch.Tensor] = []

        def take_labelled_positions(module, args):
            kept.append(args[0][keep])          # (labelled tokens, hidden)
            return (args[0][:, :0],)            # the model's own logits: empty

        handle = head.register_forward_pre_hook(take_labelled_positions)
        try:
            model(**inputs)
        finally:
            handle.remove()
        loss = chunked_lm_loss(kept[0], head, targets[keep])
        if num_items_in_batch is None:
            return loss / keep.sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
            # as Trainer.compute_loss does for the model's own loss: num_items_in_batch counts every rank's tokens,
            # and DDP averages the gradients over ranks
            loss = loss * self.accelerator.num_processes
        return loss


# At or below this fp16 loss scale a GradScaler no longer amplifies the gradients, so an overflow there is the
# gradients' own and backing off further cannot help.
MIN_LOSS_SCALE = 1.0


def counts_as_divergent(loss_finite: bool, grads_finite: bool, scale: float | None, backed_off: bool) -> bool:
    """Whether a step counts toward ``max_nonfinite_steps``.

    ``scale``: the fp16 GradScaler's scale this step ran with, None without a scaler (bf16, fp32); ``backed_off``:
    whether the scale has come down since the current run of non-finite steps began. Without a scaler every
    non-finite loss or gradient counts. With one, gradients that overflow under a finite loss are the scaler's
    normal skip-and-back-off (torch.amp.GradScaler skips the step and halves the scale; a fresh scaler starts at
    2**16 and may do it several steps in a row): they count only once the scale is at its floor. A non-finite loss
    comes from the forward, which the scale does not touch: it counts once the scale has backed off and the loss is
    still not finite (or at the floor).
    """
    if loss_finite and grads_finite:
        return False
    if scale is None or scale <= MIN_LOSS_SCALE:
        return True
    return not loss_finite and backed_off


# logits per chunk: 2**26 float32 values (256 MiB) whatever the vocabulary
CHUNK_LOGITS = 2**26
# Without gradients (evaluation) no chunk is recomputed, so smaller chunks cost only more, smaller matmuls. Each chunk
# lives as bf16 logits, their float32 copy and the log-softmax (~10 bytes per logit), and evaluation batches are
# twice the training ones by default (conf/trainer/default.yaml). Peak RSS in evaluate() vs the highest training step,
# 256 MiB -> 16 MiB chunks: tiny model, mimalloc: 1188 vs 1086 -> 998 vs 1078; embedded SmolLM2, 6 default steps,
# glibc's malloc (allocator=system, or train() called from Python): 2534 vs 2454 -> 2397 vs 2459; with mimalloc
# training set the peak either way (1555 -> 1447 vs ~2215).
EVAL_CHUNK_LOGITS = 2**22


def output_layer(model):
    """The LM head of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    # the head's dtype, as autocast would give it (the final hidden states can be float32, e.g. with a float32 adapter
    # output added to the residual stream)
    return F.cross_entropy(F.linear(hidden.to(weight.dtype), weight, bias).float(), targets, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of ``head(hidden)`` against ``targets``, one chunk of logits at a time (smaller
    chunks without gradients: evaluation)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    chunk = max(128, (CHUNK_LOGITS if torch.is_grad_enabled() else EVAL_CHUNK_LOGITS) // weight.shape[0])
    if hidden.shape[0] <= chunk:
        return _chunk_loss(hidden, weight, bias, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        # recomputed in backward: only one chunk of logits is ever alive
        total = total + checkpoint(_chunk_loss, h, weight, bias, t, use_reentrant=False)
    return total


class GuardCallback(TrainerCallback):
    """Divergence checks and preemption at step boundaries."""

    def __init__(self, trainer):
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

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if isinstance(self.trainer, DivergenceGuard):
            self.trainer.drop_nonfinite_update()

    def on_step_end(self, args, state, control, **kwargs):
        if isinstance(self.trainer, DivergenceGuard):
            self.trainer.check_step()
        # every rank stops at the same step, whichever of them was signalled (distributed.py)
        signum = stop_signal_on_any_rank(int(signal.Signals[self.preempted_by]) if self.preempted_by else 0)
        if signum and self.preempted_by is None:
            self.preempted_by = signal.Signals(signum).name
            log.warning("%s received by another rank: saving a checkpoint at the end of this step, then exiting",
                        self.preempted_by)
        if self.preempted_by is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
