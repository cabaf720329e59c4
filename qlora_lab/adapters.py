"""PEFT adapters: build the ``peft`` config for the ``adapter`` group and check what is trainable."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from qlora_lab.errors import UserError


def build_peft_config(cfg: DictConfig):
    """The peft config for ``cfg`` (the ``adapter`` group); SFTTrainer wraps the model with it."""
    from peft import LoraConfig, TaskType

    if cfg.method == "lora":
        target = cfg.target_modules
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=target if isinstance(target, str) else list(target),
            bias=cfg.bias,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
            modules_to_save=list(cfg.modules_to_save) or None,
        )
    raise UserError(f"adapter.method={cfg.method!r} is not supported.")


def check_only_adapter_trainable(model) -> tuple[int, int]:
    """Raise unless every trainable parameter belongs to the adapter; return peft's (trainable, total) counts."""
    stray = [n for n, p in model.named_parameters() if p.requires_grad and not _is_adapter_param(n, model)]
    if stray:
        raise RuntimeError(f"base-model parameters are trainable, which QLoRA must never do: {stray[:5]}")
    return model.get_nb_trainable_parameters()


def _is_adapter_param(name: str, model) -> bool:
    cfg = model.peft_config[model.active_adapter]
    keys = ["lora_", "modules_to_save", "prompt_encoder"]
    if getattr(cfg, "bias", "none") != "none":
        keys.append("bias")
    return any(k in name for k in keys)


def adapter_summary(cfg: DictConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in OmegaConf.to_container(cfg).items())
