"""Preference objectives: TRL's DPOTrainer, KTOTrainer and (experimental) ORPOTrainer built on the same model,
quantization, adapter, trainer settings and run directory as SFT (trainer.py builds the SFT trainer).

- The model is built as the plan says (models.build_model); the adapter is the adapter group's peft config, which
  TRL applies, or with ``init_from=<run>`` that run's adapter, loaded trainable.
- The reference model (DPO, KTO) is no second model: ``ref_model=None`` with a peft model makes TRL compute the
  reference log-probs with the adapter disabled (a fresh adapter), or with a frozen copy of the loaded adapter
  named "ref" (``init_from``: the SFT model is the reference, as in the usual SFT -> DPO pipeline). ORPO has none.
- The trainer group's fields that the objective's TRL config has are passed on (learning rate, batch size, steps,
  evaluation, saving, precision ...); SFT-only fields (packing, completion_only_loss, ...) and SFT's loss_type are
  left out; the objective group sets beta, loss_type and KTO's weights.
- The divergence guard (skip a non-finite update, stop after ``max_nonfinite_steps`` in a row) and preemption are
  the SFT run's (sft.py DivergenceGuard, GuardCallback), around TRL's trainer class.
- The CPU levers (selective loss, lean kernels, fast dropout, length grouping) are SFTTrainer-side and not applied:
  TRL's preference trainers compute their own loss (disable_dropout=True turns dropout off).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from qlora_lab import adapters, measure, models
from qlora_lab.config import PREFERENCE_OBJECTIVES
from qlora_lab.errors import UserError
from qlora_lab.plan import Plan
from qlora_lab.sft import guarded
from qlora_lab.sftconfig import build_sft_config, overfitting_fields
from qlora_lab.trainer import add_early_stopping

log = logging.getLogger(__name__)

PREFERENCE = PREFERENCE_OBJECTIVES


def trainer_classes(objective: str) -> tuple[type, type]:
    """(TRL trainer, TRL config) of a preference objective."""
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if objective == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    if objective == "orpo":
        import warnings

        with warnings.catch_warnings():  # trl.experimental warns on import that its API may change
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        return ORPOTrainer, ORPOConfig
    raise UserError(f"objective={objective!r} is not one of sft, {', '.join(PREFERENCE)}.")


def objective_fields(objective: DictConfig) -> dict[str, Any]:
    """The objective group as fields of its TRL config."""
    fields: dict[str, Any] = {"beta": objective.beta}
    if objective.name in ("dpo", "kto") and objective.loss_type:
        fields["loss_type"] = [objective.loss_type] if objective.name == "dpo" else objective.loss_type
    if objective.name == "dpo" and objective.get("sft_weight"):
        # TRL 1.16 DPOConfig: several loss types are summed with loss_weights; "sft" is the chosen answers' NLL
        fields["loss_type"] = [objective.loss_type or "sigmoid", "sft"]
        fields["loss_weights"] = [1.0, float(objective.sft_weight)]
    if objective.name == "kto":
        fields.update(desirable_weight=objective.desirable_weight, undesirable_weight=objective.undesirable_weight)
        if objective.loss_type != "apo_zero_unpaired":
            # TRL 1.16 KTOConfig: the KL-estimating losses precompute each row's KL completion against its neighbours
            # in a fixed-order batch and refuse any sampler but "sequential" (our batching's default is random/grouped)
            fields["train_sampling_strategy"] = "sequential"
    return fields


def setup(cfg: DictConfig, plan: Plan, model_path: str, tokenizer, train_ds, eval_ds, run_dir: Path):
    """The base model (plan's dtypes and quantization), the adapter (fresh, or init_from's), and TRL's trainer of
    the objective around them."""
    trainer_cls, config_cls = trainer_classes(cfg.objective.name)
    measure.limit_cuda_memory(cfg.memory_budget_gb)  # as SFT's (trainer.setup)
    model = models.build_model(cfg.model, cfg.quant, model_path, plan.model_dtype, plan.compute_dtype,
                               list(plan.skip_modules))
    peft_config = None
    if cfg.init_from:
        from peft import PeftModel

        adapter_dir = Path(cfg.init_from) / "adapter"
        log.info("Continuing the adapter of %s", adapter_dir)
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    else:
        peft_config = adapters.build_peft_config(cfg.adapter, tokenizer_path=model.name_or_path,
                                                   rank=(plan.lora_r, plan.lora_alpha))
    args = build_sft_config(cfg.trainer, run_dir / "checkpoints", cuda=plan.machine.device == "cuda",
                            mixed_precision=plan.mixed_precision, config_class=config_cls,
                            extra={**overfitting_fields(plan.keep, cfg.early_stopping, cfg.trainer),
                                   **objective_fields(cfg.objective)})
    if plan.offload_activations:
        if not hasattr(args, "activation_offloading"):  # TRL 1.16's ORPOConfig has no such field
            raise UserError(f"offload_activations=true: TRL's {cfg.objective.name.upper()} trainer cannot offload "
                            "activations; set offload_activations=false.")
        args.activation_offloading = True  # TRL's own, as for SFT (trainer.py)
    if cfg.objective.name == "orpo" and peft_config is not None:
        # TRL 1.16's ORPOTrainer, given a peft_config and a 4/8-bit base, calls peft's prepare_model_for_kbit_training,
        # which casts every non-quantized weight (embeddings, norms, lm_head) to float32; generation outside autocast
        # then fails in lm_head (float32 weight, bf16 hidden states). Wrapped here, it gets a PeftModel as the other
        # objectives' bases stay: in the plan's dtypes.
        from peft import get_peft_model

        model, peft_config = get_peft_model(model, peft_config), None
    kwargs = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                  peft_config=peft_config)
    if cfg.objective.name != "orpo":
        kwargs["ref_model"] = None  # the adapter-disabled model (or the loaded adapter's frozen copy): see above
    trainer = guarded(trainer_cls)(**kwargs)  # the divergence guard, as SFT's (sft.py DivergenceGuard)
    trainer.init_guard(cfg.max_nonfinite_steps)
    adapters.fix_bnb_adapter_layers(trainer.model)
    add_early_stopping(trainer, cfg.early_stopping)
    return trainer


def starting_model(cfg: DictConfig, model):
    """The context in which ``model`` is what training starts from, for the "before" scores: the base alone for a
    fresh adapter (as SFT scores it), the loaded adapter with init_from."""
    if cfg.init_from:
        return nullcontext()
    return adapters.base_model_only(cfg.adapter, model)


BEFORE_KEYS = ("reward_accuracy_before", "reward_margin_before", "preference_accuracy_before")
# what each TRL trainer logs for the held-out pairs (evaluate(): "eval_" + its metric names)
REWARD_KEYS = {"reward_accuracy": "eval_rewards/accuracies", "reward_margin": "eval_rewards/margins"}


def reward_metrics(eval_metrics: dict[str, float], when: str) -> dict[str, float]:
    """reward_accuracy_<when> / reward_margin_<when> from an evaluation's metrics (those it has)."""
    return {f"{name}_{when}": eval_metrics[key] for name, key in REWARD_KEYS.items() if key in eval_metrics}


class EvalAtStart(TrainerCallback):
    """The held-out evaluation when train() begins, with the adapter as training starts (as SFT's
    EvalBeforeTraining, at on_train_begin so that the model is already wrapped). For DPO and KTO the policy then is
    the reference, so the rewards are 0 by construction; the loss is log 2 for DPO's sigmoid loss."""

    def __init__(self, trainer, metrics: dict[str, Any]):
        self.trainer, self.metrics = trainer, metrics

    def on_train_begin(self, args, state, control, **kwargs):
        out = self.trainer.evaluate(metric_key_prefix="before")
        self.metrics["eval_loss_before"] = out["before_loss"]
        self.metrics.update(reward_metrics(out, "before"))


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs: list[dict[str, Any]]) -> float | None:
    """The share of held-out pairs whose chosen completion ``model`` gives a higher log-probability than the rejected
    one (summed over the completion's tokens, through the chat template) — the model's own preference, comparable
    before and after training (the DPO rewards are relative to the reference, 0 at the start)."""
    pairs = [p for p in pairs if "chosen" in p]
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    for p in pairs:
        prompt = tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
        scores = []
        for key in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(p["prompt"] + p[key], tokenize=False)
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]], device=device)
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            scores.append(logps[start - 1:].gather(1, targets[start - 1:, None]).sum().item())
        wins += scores[0] > scores[1]
    if was_training:
        model.train()
    return wins / len(pairs)
