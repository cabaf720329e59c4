"""TRL's ``SFTConfig`` in one place: the ``trainer`` group's schema mirrors it, and :func:`build_sft_config` turns
the group back into one.

``trainer`` mirrors SFTConfig field by field (generated from it, so ``trainer.X=`` is the SFTConfig field ``X`` and
the help text is TRL's own), minus the fields qlora_lab owns: ``output_dir`` comes from Hydra's run directory,
``resume_from_checkpoint`` from the run directory's checkpoints, and hub tokens from the environment (``HF_TOKEN``)
so that no secret is ever written into a saved config. The precision and device fields left unset (``bf16``) are
filled from the run's plan (qlora_lab/plan.py), never decided here.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from qlora_lab.errors import UserError

# Fields qlora_lab sets itself (see module docstring) or that hold secrets / runtime objects.
OWNED_TRAINER_FIELDS = frozenset(
    {"output_dir", "resume_from_checkpoint", "hub_token", "local_rank", "parallelism_config", "do_train",
     "do_eval", "do_predict"}
)
# transformers 5 renamed these to activation_checkpointing*; the old names still work when set.
DEPRECATED_TRAINER_ALIASES = {"gradient_checkpointing": "activation_checkpointing",
                              "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
_SIMPLE = (bool, int, float, str)


def _schema_type(tp: Any) -> Any:
    """Map an SFTConfig annotation to one OmegaConf can type-check (it has no Union/Literal/Enum-or-str)."""
    if tp in _SIMPLE:
        return tp
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        # "SchedulerType | str" and friends: a string, validated by SFTConfig itself.
        if len(rest) == 2 and str in rest and any(isinstance(a, type) and issubclass(a, enum.Enum) for a in rest):
            return Optional[str] if len(rest) < len(args) else str
        if len(rest) == 1 and rest[0] in _SIMPLE:
            return Optional[rest[0]] if len(rest) < len(args) else rest[0]
    if origin is list and args == (str,):
        return list[str]
    return Any


def _make_trainer_schema() -> type:
    from trl import SFTConfig  # heavy import, once

    hints = typing.get_type_hints(SFTConfig)
    fields = []
    for f in dataclasses.fields(SFTConfig):
        if f.name in OWNED_TRAINER_FIELDS or not f.init:
            continue
        tp = _schema_type(hints.get(f.name, Any))
        if f.name in DEPRECATED_TRAINER_ALIASES and DEPRECATED_TRAINER_ALIASES[f.name] in hints:
            # Deprecated aliases of activation_checkpointing*: None = not set, so the new name decides.
            fields.append((f.name, Optional[tp] if tp is bool else tp, field(default=None, metadata=f.metadata)))
            continue
        if f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory, metadata=f.metadata)
        else:
            default = f.default
            if isinstance(default, enum.Enum):
                default = default.value
            spec = field(default=default, metadata=f.metadata)
        fields.append((f.name, tp, spec))
    cls = dataclasses.make_dataclass("TrainerConfig", fields)
    cls.__doc__ = "TRL SFTConfig fields; see `qlora-lab train --help` and TRL's SFTConfig docs for each."
    return cls


TrainerConfig = _make_trainer_schema()


def trainer_field_help(name: str) -> str:
    """TRL's help text for one trainer field (empty if none)."""
    for f in dataclasses.fields(TrainerConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def resolve_keep(keep: str, trainer_cfg: DictConfig) -> str:
    """``keep`` ("best", "last" or "auto") as a run applies it: auto = best when the run evaluates and saves
    checkpoints (trainer.eval_strategy, trainer.save_strategy not "no"), else last."""
    if keep == "auto":
        off = [str(trainer_cfg.get(k)).lower() in ("no", "none") for k in ("eval_strategy", "save_strategy")]
        return "last" if any(off) else "best"
    return keep


def overfitting_fields(keep: str, early_stopping: DictConfig, trainer_cfg: DictConfig) -> dict[str, Any]:
    """The SFTConfig fields that carry the overfitting guard (``keep`` resolved: "best" or "last").

    transformers does the work: ``load_best_model_at_end`` + ``metric_for_best_model`` track the best evaluation in
    TrainerState and load that checkpoint when training ends, and EarlyStoppingCallback (built in trainer.py) reads
    the same ``metric_for_best_model``. Loading the best needs a checkpoint at every evaluation (TrainingArguments
    refuses save steps that are not a multiple of the eval steps), so keep=best saves when it evaluates; the
    trainer's save_total_limit rotation always keeps the best one. ``restore_callback_states_from_checkpoint`` makes
    a resume restore the early-stopping counter that trainer_state.json records (``stateful_callbacks``);
    transformers' default (False) would start it again from 0."""
    fields: dict[str, Any] = {}
    patience = early_stopping.patience or 0
    if keep == "best" or patience > 0:
        fields["metric_for_best_model"] = early_stopping.metric
        if early_stopping.greater_is_better is not None:
            fields["greater_is_better"] = early_stopping.greater_is_better
    if keep == "best":
        every = trainer_cfg.eval_steps if trainer_cfg.eval_steps is not None else trainer_cfg.logging_steps
        fields.update(load_best_model_at_end=True, save_strategy=trainer_cfg.eval_strategy, save_steps=every)
    if patience > 0:
        fields["restore_callback_states_from_checkpoint"] = True
    return fields


def build_sft_config(trainer_cfg: DictConfig, output_dir: Path, *, cuda: bool, mixed_precision: str,
                     extra: dict[str, Any] | None = None, config_class: type | None = None):
    """TRL's SFTConfig from the ``trainer`` group, with the fields qlora_lab owns filled in from the plan:
    ``cuda`` (the plan's device) and ``mixed_precision`` ("bf16", "fp16" or "no": what an unset trainer.bf16 /
    trainer.fp16 becomes); ``extra``: fields set over the group's (overfitting_fields, an objective's own).

    ``config_class``: another TRL config (DPOConfig, KTOConfig, ORPOConfig: qlora_lab/objectives.py) built from the
    same group: the fields it lacks (SFT's packing, completion_only_loss, ...) are left out, and so is SFT's
    ``loss_type`` (the same name means the objective's own loss there; ``extra`` sets it)."""
    from trl import SFTConfig

    kwargs = {**OmegaConf.to_container(trainer_cfg, resolve=True), **(extra or {})}
    if config_class is not None:
        own = {f.name for f in dataclasses.fields(config_class)}
        kwargs = {k: v for k, v in kwargs.items()
                  if k in own and (k != "loss_type" or "loss_type" in (extra or {}))}
    for old, new in DEPRECATED_TRAINER_ALIASES.items():
        # transformers >= 5.2x renamed gradient_checkpointing* to activation_checkpointing*: where the new name
        # exists, the old one fills it only when it is unset (transformers' own rule, minus its FutureWarning).
        if new in kwargs:
            value = kwargs.pop(old)
            if kwargs[new] is None and value is not None:
                kwargs[new] = value
    if kwargs.get("activation_checkpointing", False) is None:
        # both names unset: off, as conf/trainer/default.yaml says (TRL's SFTConfig would turn it on: its own
        # gradient_checkpointing default is True, and transformers copies that into activation_checkpointing)
        kwargs["activation_checkpointing"] = False
    if not cuda:
        kwargs["use_cpu"] = True  # transformers refuses bf16 on a machine without a GPU unless told it is CPU
        kwargs["dataloader_pin_memory"] = False  # nothing to copy to: pinning only warns
    if kwargs.get("bf16") is None and not kwargs.get("fp16"):
        kwargs["bf16"] = mixed_precision == "bf16"
        kwargs["fp16"] = mixed_precision == "fp16"
    try:
        return (config_class or SFTConfig)(output_dir=str(output_dir), **kwargs)
    except ValueError as e:  # transformers/TRL name the fields as command-line flags: --save_steps
        raise UserError("invalid trainer settings: " + re.sub(r"--(\w+)", r"trainer.\1", str(e))) from None


def check_sft_config(trainer_cfg: DictConfig, cuda: bool, extra: dict[str, Any] | None = None) -> str | None:
    """transformers' and TRL's own checks of the trainer settings (e.g. eval/save step multiples): the message, or
    None. Leaves the process as it found it: TrainingArguments.__post_init__ sets up accelerate's process state
    (``self.device``, unconditionally, transformers 5 training_args.py "Device Init") and may export ACCELERATE_*
    variables; both are undone here when they were not there before, so that validating a config initialises
    nothing (the run's own SFTConfig, built later, sets them up for real)."""
    import tempfile

    with _untouched_process_state():
        try:
            build_sft_config(trainer_cfg, Path(tempfile.gettempdir()) / "qlora-lab-validate", cuda=cuda,
                             mixed_precision="no", extra=extra)
        except UserError as e:
            return str(e)
    return None


@contextmanager
def _untouched_process_state():
    from accelerate.state import PartialState

    fresh = not PartialState._shared_state
    env = dict(os.environ)
    try:
        yield
    finally:
        if fresh and PartialState._shared_state:
            PartialState._reset_state()
        for key in set(os.environ) - set(env):
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
