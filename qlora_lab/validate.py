"""The one validator of a composed config: every problem at once, in one :class:`ConfigError`.

Types are checked by Hydra against the schemas (config.py); this checks the rest: keys the schema lacks (also when
appended with ``+``), choices, ranges, paths, and combinations the libraries cannot run. It decides nothing (the
plan, plan.py, does) and initialises nothing: no accelerate or CUDA state (tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qlora_lab.config import CONF_DIR, PREFERENCE_OBJECTIVES, SCHEMAS, PrepareRunConfig, TrainRunConfig
from qlora_lab.cpu import allocator
from qlora_lab.distributed import env_true, zero_stage
from qlora_lab.errors import ConfigError
from qlora_lab.sftconfig import check_sft_config, overfitting_fields, resolve_keep

QUANT_METHODS = ("nf4", "fp4", "int8", "none")
ADAPTER_METHODS = ("lora", "prefix", "prompt", "ptuning", "ia3", "full")
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
DATA_SOURCES = ("demo", "file", "hub", "mixture")
DATA_FORMATS = ("auto", "messages", "sharegpt", "instruction", "prompt_completion", "text")
TRAIN_ON = ("all_assistant", "last_assistant", "all")
BAD_ROWS = ("error", "skip")
SOURCE_KEYS = ("path", "weight", "split", "name", "eval_path", "source", "format", "columns", "roles", "message_keys")
TASK_METRICS = ("auto", "json_match", "exact_match", "none")
LOSS_IMPLS = ("auto", "selective", "native", "fused")
BATCHING = ("grouped", "shuffled", "padding_free")
KERNELS = ("auto", "lean", "liger", "none")
COMPILE = ("none", "layers")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# *-arch: random weights in a published architecture, for benchmarks (qlora_lab.models.ARCH_CONFIGS)
BUILTIN_MODELS = ("smollm2-135m-instruct", "tiny-random", "llama-3.2-1b-arch", "llama-3.1-8b-arch", "qwen2.5-7b-arch")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# --------------------------------------------------------------------------------------------------------------
# keys that are not in the schema
#
# Hydra applies an appending override (`+key=value`, `++key=value`) with OmegaConf.update(..., force_add=True)
# (hydra/_internal/config_loader_impl.py, _apply_overrides_to_config), which adds the key even to a struct-mode,
# dataclass-typed node: `+adapter.alhpa=64` composed into AdapterConfig as an extra key that nothing reads, and
# `+trainer.learning_rat=...` reached SFTConfig(**kwargs) as an unexpected keyword. Hydra cannot be told to refuse
# it, and its own error for the same key without `+` ("Could not override 'adapter.alhpa'. To append to your config
# use +adapter.alhpa=64") is what sends users to `+`. So the composed config is compared with its schema here, and
# the command line sends unknown keys through `+` (appendable_overrides) so that both spellings end in the same
# validator list.


def _schema_of(f: dataclasses.Field) -> type | None:
    """The dataclass a field holds (``trainer`` is typed Any but built from TrainerConfig), or None."""
    if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
        return f.type
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def unknown_key_problems(cfg: DictConfig, schema: type | None = None, prefix: str = "") -> list[str]:
    """One problem per key of ``cfg`` that its dataclass schema does not have, naming the closest field."""
    schema = schema or OmegaConf.get_type(cfg)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return []
    fields = _fields(schema)
    problems = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in fields:
            problems.append(_unknown_key(path, str(key), fields, cfg._get_node(key), prefix))
            continue
        sub = _schema_of(fields[key])
        node = cfg._get_node(key)
        if sub is not None and OmegaConf.is_dict(node):
            problems.extend(unknown_key_problems(node, sub, f"{path}."))
    return problems


def _unknown_key(path: str, key: str, fields: dict[str, dataclasses.Field], node: Any, prefix: str) -> str:
    group = prefix[:-1] or "the command's config"
    near = difflib.get_close_matches(key, list(fields), n=1)
    try:
        value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node._value()
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve: name the key without its value
        value = "..."
    value = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else value
    if near:
        fix = f"Did you mean {prefix}{near[0]}? Fix: {prefix}{near[0]}={value}"
    elif len(fields) <= 30:
        fix = f"Its settings are: {', '.join(fields)}"
    else:
        fix = "See `qlora-lab <command> --help` for its settings"
    return f"{path}: no such setting in {group} (nothing would read it). {fix}."


def appendable_overrides(command: str, overrides: list[str]) -> list[str]:
    """``overrides`` with every plain ``key=value`` whose key is not in the command's schema turned into
    ``+key=value``: Hydra then composes it, and the validator reports it with every other problem (Hydra would stop
    at the first such key with its own error, which suggests the `+`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    schema = SCHEMAS.get(command)
    if schema is None:
        return overrides
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    parser = OverridesParser.create()
    out = []
    for line in overrides:
        try:
            o = parser.parse_override(line)
        except HydraException:  # Hydra reports its own syntax errors
            out.append(line)
            continue
        key = o.key_or_group
        plain = not (o.is_add() or o.is_force_add() or o.is_delete()) and o.package is None
        if plain and not key.startswith("hydra") and "/" not in key and key not in groups \
                and not _in_schema(schema, key.split(".")):
            line = "+" + line
        out.append(line)
    return out


def _in_schema(schema: type, parts: list[str]) -> bool:
    fields = _fields(schema)
    if parts[0] not in fields:
        return False
    sub = _schema_of(fields[parts[0]])
    # below a field that is not a dataclass (a mapping typed Any, e.g. data.columns): not ours to check
    return len(parts) == 1 or sub is None or _in_schema(sub, parts[1:])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_choice(problems: list[str], key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        problems.append(f"{key}={value!r} is not one of {', '.join(choices)}.{hint}")


def _sharded_by(problems: list[str], t: DictConfig) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when the run shards its parameters across processes, else None.

    FSDP: ``accelerate launch`` with an FSDP config exports ACCELERATE_USE_FSDP=true; torchrun users set
    ``trainer.fsdp`` (TrainingArguments.fsdp).
    """
    if _fsdp_on(t):
        return "FSDP"
    return "DeepSpeed ZeRO-3" if zero_stage(t, problems) == 3 else None


def _fsdp_on(t: DictConfig) -> bool:
    return env_true("ACCELERATE_USE_FSDP") or str(t.get("fsdp") or "").strip().lower() not in ("", "false", "no")


def _dtype_name(name: str) -> str:
    if name != "auto":
        return name
    from qlora_lab.models import bf16_supported  # torch: only imported when a sharded run needs it

    return "bfloat16" if bf16_supported() else "float32"


def _sharding_problems(problems: list[str], cfg: DictConfig) -> None:
    """What FSDP / DeepSpeed ZeRO-3 cannot run: rank-0-only generation, and quantization they cannot shard.

    Both flatten and shard floating-point parameters only, and FSDP flattens a wrapped unit into one dtype. 4-bit
    bitsandbytes weights are packed into ``bnb_4bit_quant_storage`` (uint8 unless set); FSDP-QLoRA and ZeRO-3 +
    QLoRA store them in the model's float dtype instead (bitsandbytes docs "FSDP-QLoRA"; peft docs
    accelerate/fsdp.md and accelerate/deepspeed.md: ``bnb_4bit_quant_storage`` = the ``dtype`` the model is loaded
    in). That storage exists for 4-bit only: LLM.int8 weights stay int8 tensors.
    """
    m, q, d = cfg.model, cfg.quant, cfg.data
    sharded = _sharded_by(problems, cfg.trainer)
    if sharded is None:
        return
    if d.task_metric != "none" and d.task_eval_samples > 0:
        # train.py scores the held-out task after training on rank 0 alone (generation is not collective), but a
        # forward through a sharded model all-gathers its weights from every rank
        problems.append(f"data.task_eval_samples={d.task_eval_samples} under {sharded}: the held-out task score "
                        f"generates on rank 0 alone, but every forward of a {sharded}-sharded model gathers its "
                        "weights from all ranks, so rank 0 would wait for the others after training, before the "
                        "adapter is saved. Set data.task_eval_samples=0 (eval_loss is still computed on all ranks) "
                        "and score the saved adapter on one GPU.")
    if q.method == "none":
        return
    if q.method == "int8":
        problems.append(f"quant.method=int8 under {sharded}: LLM.int8 weights are int8 tensors, which {sharded} "
                        "cannot shard (bitsandbytes' float quant_storage exists for 4-bit only). Use quant=nf4 with "
                        "quant.quant_storage=bfloat16 (QLoRA), quant=none, or int8 under DDP / DeepSpeed ZeRO-2.")
        return
    storage, model_dtype = q.quant_storage, m.dtype
    if (storage is not None and storage not in DTYPES) or model_dtype not in DTYPES:
        return  # reported as a bad choice already
    if storage is None or _dtype_name(storage) != _dtype_name(model_dtype):
        problems.append(
            f"quant.quant_storage={storage or 'null (uint8)'} with quant.method={q.method} under {sharded}: the "
            f"4-bit weights must be stored in the dtype of the model's other weights (model.dtype={model_dtype}), "
            f"or {sharded} cannot shard them with the rest (it flattens each unit's floating-point weights into one "
            "dtype). Set quant.quant_storage=bfloat16 with model.dtype=bfloat16 (or auto on a bf16 GPU) and "
            "quant.compute_dtype=bfloat16.")


def _mapping(p: list[str], key: str, value: Any, example: str) -> None:
    if value is not None and not (OmegaConf.is_dict(value) and all(isinstance(v, str) for v in value.values())):
        p.append(f"{key}={value!r}: use a mapping of names, e.g. {key}={example}.")


def _data_file(p: list[str], key: str, val: Any) -> None:
    fp = Path(str(val)).expanduser()
    if not fp.is_file():
        p.append(f"{key}={val!r}: file not found (looked in {fp.resolve().parent}).")
    elif fp.suffix.lower() not in DATA_SUFFIXES:
        p.append(f"{key}={val!r}: unsupported file type {fp.suffix!r}; use {', '.join(DATA_SUFFIXES)}.")


def _data_problems(p: list[str], d: DictConfig, t: DictConfig) -> None:
    check_choice(p, "data.source", d.source, DATA_SOURCES)
    check_choice(p, "data.format", d.format, DATA_FORMATS)
    check_choice(p, "data.task_metric", d.task_metric, TASK_METRICS)
    check_choice(p, "data.train_on", d.train_on, TRAIN_ON)
    check_choice(p, "data.bad_rows", d.bad_rows, BAD_ROWS)
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        p.append(f"data.max_bad_fraction={d.max_bad_fraction}: must be between 0 and 1 (e.g. 0.1).")
    if d.num_proc is not None and d.num_proc < 1:
        p.append(f"data.num_proc={d.num_proc}: must be >= 1, or null for automatic.")
    if d.source in ("file", "hub") and not d.path:
        p.append(f"data.path is required with data.source={d.source}: e.g. data.path=my_data.jsonl"
                 + (" (jsonl, json, csv or parquet)." if d.source == "file" else " (a datasets hub id)."))
    if d.source == "file" and d.path:
        for key in ("path", "eval_path"):
            if d[key] is not None:
                _data_file(p, f"data.{key}", d[key])
    if d.columns is not None and not (OmegaConf.is_dict(d.columns)
                                      and all(isinstance(v, str) for v in d.columns.values())):
        p.append(f"data.columns={d.columns!r}: use a mapping of old to new column names, e.g. "
                 "data.columns={question:prompt,answer:completion}.")
    _mapping(p, "data.roles", d.roles, "{human:user,bot:assistant}")
    _mapping(p, "data.message_keys", d.message_keys, "{messages:dialog,role:from,content:value}")
    if OmegaConf.is_dict(d.message_keys):
        for k in d.message_keys:
            if k not in ("messages", "role", "content"):
                p.append(f"data.message_keys.{k}: unknown key; use messages, role and/or content.")
    if OmegaConf.is_dict(d.roles):
        for k, v in d.roles.items():
            if v not in ("system", "user", "assistant", "tool"):
                p.append(f"data.roles.{k}={v!r}: map to one of system, user, assistant, tool.")
    if d.source == "mixture":
        if not (OmegaConf.is_list(d.sources) and len(d.sources) > 0):
            p.append("data.source=mixture needs data.sources: a list such as "
                     "'data.sources=[{path: a.jsonl, weight: 0.7}, {path: org/ds, split: train, weight: 0.3}]'.")
        else:
            for i, s in enumerate(d.sources):
                where = f"data.sources[{i}]"
                if not OmegaConf.is_dict(s) or not s.get("path"):
                    p.append(f"{where}={s!r}: each source is a mapping with at least a path, e.g. "
                             "{path: a.jsonl, weight: 0.5}.")
                    continue
                for k in s:
                    if k not in SOURCE_KEYS:
                        close = difflib.get_close_matches(str(k), SOURCE_KEYS, n=1)
                        p.append(f"{where}.{k}: unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                                                f"; use {', '.join(SOURCE_KEYS)}."))
                weight = s.get("weight", 1.0)
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                    p.append(f"{where}.weight={weight!r}: must be a number > 0 (weights are normalised to shares).")
                if s.get("source", "file" if str(s.path).lower().endswith(DATA_SUFFIXES) else "hub") == "file":
                    for key in ("path", "eval_path"):
                        if s.get(key) is not None:
                            _data_file(p, f"{where}.{key}", s[key])
                if s.get("format") is not None:
                    check_choice(p, f"{where}.format", s.format, DATA_FORMATS)
    elif d.sources:
        p.append(f"data.sources is set but data.source={d.source}: use data=mixture (data.source=mixture) to mix "
                 "sources.")
    if d.streaming:
        if d.source == "demo":
            p.append("data.streaming=true with data.source=demo: the demo is generated in memory; streaming is for "
                     "data=file (.jsonl/.csv/.parquet) or data=hub.")
        if t.max_steps is None or t.max_steps <= 0:
            p.append("data.streaming=true needs trainer.max_steps (a streamed dataset has no length to count epochs "
                     "from), e.g. trainer.max_steps=1000.")


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()  # 0 without CUDA (it does not initialise CUDA)


def _data_parallel_problems(problems: list[str], cfg: DictConfig) -> None:
    """One process that sees several GPUs: refused, with the launch that works.

    transformers' TrainingArguments gives a process started without torchrun/accelerate (no LOCAL_RANK) n_gpu = every
    visible GPU, and Trainer._wrap_model would then wrap an unquantized model in ``nn.DataParallel`` (one replica per
    GPU on a slice of the batch: the selective loss's hook on the shared LM head holds the whole batch's label mask).
    TRL 1.16's SFTTrainer refuses any n_gpu > 1 right after Trainer.__init__ (trl/trainer/sft_trainer.py: "does not
    support `nn.DataParallel`"), for quantized models too, with a ValueError traceback after the model has loaded.
    DDP (one process per GPU) is what works, and is faster.
    """
    if "LOCAL_RANK" in os.environ:
        return
    n = _visible_gpus()
    if n > 1:
        problems.append(f"{n} GPUs are visible to this one process: transformers' Trainer would drive them all with "
                        "torch.nn.DataParallel, which TRL's SFTTrainer and qlora_lab's loss do not support. Launch one "
                        f"process per GPU: torchrun --nproc_per_node={n} -m qlora_lab train <the same overrides>; or "
                        "train on one GPU: CUDA_VISIBLE_DEVICES=0 qlora-lab train ...")


def validate(cfg: DictConfig) -> None:
    """Check a composed train config; raise one :class:`ConfigError` listing every problem found."""
    schema = OmegaConf.get_type(cfg)  # prepare / inspect validate the train fields plus their own `inspect`
    unknown = unknown_key_problems(cfg, schema if schema is PrepareRunConfig else TrainRunConfig)
    p: list[str] = list(unknown)
    m, q, a, d, t = cfg.model, cfg.quant, cfg.adapter, cfg.data, cfg.trainer

    check_choice(p, "loss", cfg.loss, LOSS_IMPLS)
    check_choice(p, "batching", cfg.batching, BATCHING)
    check_choice(p, "kernels", cfg.kernels, KERNELS)
    check_choice(p, "compile", cfg.compile, COMPILE)
    check_choice(p, "allocator", cfg.allocator, allocator.ALLOCATORS)
    why_not = allocator.problem(cfg.allocator)
    if why_not:
        p.append(why_not)
    if cfg.kernels == "liger":
        from qlora_lab.plan import liger_unavailable

        why_not = liger_unavailable()
        if why_not:
            p.append(f"kernels=liger: {why_not}. Use kernels=auto or kernels=none.")
    budget = cfg.memory_budget_gb
    if not (budget is None or budget == "auto" or (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                                                    and budget > 0)):
        p.append(f"memory_budget_gb={budget!r}: give a positive number of GiB, 'auto' (90% of the GPU) or null.")
    if not (isinstance(cfg.offload_activations, bool) or cfg.offload_activations == "auto"):
        p.append(f"offload_activations={cfg.offload_activations!r}: give true, false or auto (on only where the memory "
                 "budget is exceeded with every layer checkpointed).")
    if cfg.max_nonfinite_steps < 0:
        p.append(f"max_nonfinite_steps={cfg.max_nonfinite_steps}: must be >= 0 (0 disables the divergence check).")

    # model
    name = str(m.name_or_path)
    if name.startswith("builtin:"):
        check_choice(p, "model.name_or_path", name, tuple(f"builtin:{b}" for b in BUILTIN_MODELS))
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        p.append(f"model.name_or_path={name!r}: no such folder. Give a folder holding config.json and weights, "
                 "a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct', or a built-in such as 'builtin:smollm2-135m-instruct'.")
    check_choice(p, "model.dtype", m.dtype, DTYPES)

    # quant
    check_choice(p, "quant.method", q.method, QUANT_METHODS)
    check_choice(p, "quant.compute_dtype", q.compute_dtype, DTYPES)
    if q.quant_storage is not None:
        check_choice(p, "quant.quant_storage", q.quant_storage, DTYPES)
    skip = q.get("skip_modules", [])
    if skip != "auto" and not (OmegaConf.is_list(skip) and all(isinstance(x, str) and x for x in skip)):
        p.append(f"quant.skip_modules={skip!r}: give 'auto' (down_proj in 16-bit for 4-bit models under 1B parameters) "
                 "or a list of module names, e.g. [down_proj], or [] to quantize every linear layer.")
    _sharding_problems(p, cfg)  # FSDP / DeepSpeed ZeRO-3 (from the launcher's environment or trainer.*)
    _data_parallel_problems(p, cfg)

    # adapter
    check_choice(p, "adapter.method", a.method, ADAPTER_METHODS)
    quantized = q.method != "none"
    if a.method == "lora":
        if a.r != "auto" and not (isinstance(a.r, int) and not isinstance(a.r, bool) and a.r >= 1):
            p.append(f"adapter.r={a.r}: the rank must be an integer >= 1 (typical: 8-64), or auto (64 for models "
                     "under 1B parameters, 16 above).")
        if a.alpha != "auto" and not (isinstance(a.alpha, (int, float)) and not isinstance(a.alpha, bool)
                                      and a.alpha > 0):
            p.append(f"adapter.alpha={a.alpha}: must be a number > 0 (typical: 2 x adapter.r), or auto (2 x r).")
        if not 0.0 <= a.dropout < 1.0:
            p.append(f"adapter.dropout={a.dropout}: must be in [0, 1).")
        check_choice(p, "adapter.dropout_impl", a.dropout_impl, ("auto", "torch", "fast", "recompute"))
        if a.bias not in ("none", "all", "lora_only"):
            p.append(f"adapter.bias={a.bias!r}: use 'none', 'all' or 'lora_only'.")
        init = str(a.init)
        if not (init in LORA_INITS or init.startswith("pissa_niter_")):
            check_choice(p, "adapter.init", init, LORA_INITS)
        if init.startswith("pissa") and quantized:
            p.append(f"adapter.init={init} with quant.method={q.method}: PiSSA moves the principal components out of "
                     "the base weights, which it cannot do to quantized weights. Use quant=none, or "
                     "adapter.init=loftq for a quantization-aware start.")
        if init == "olora" and quantized:
            # peft can OLoRA-initialise a 4-bit layer, but only by re-quantizing the residual base; the adapter then
            # fits that residual, and no adapter file can carry it back to the original base (measured: max |Δlogit|
            # 0.1 after conversion on the tiny model), so the saved result would not be the trained model.
            p.append(f"adapter.init=olora with quant.method={q.method}: OLoRA rewrites the base weights as a residual, "
                     "which a quantized base can only hold re-quantized, so the saved adapter would not reproduce the "
                     "trained model on the original base. Use quant=none, or adapter.init=loftq.")
        if init == "loftq" and q.method not in ("nf4", "fp4"):
            p.append(f"adapter.init=loftq with quant.method={q.method}: LoftQ initialises LoRA to cancel the 4-bit "
                     "quantization error, so it needs quant=nf4 or quant=fp4 (and the base's full-precision "
                     "safetensors). Without quantization use adapter.init=default or pissa.")
        if init == "loftq" and a.loftq_iter != 1:
            p.append(f"adapter.loftq_iter={a.loftq_iter}: only 1 is supported. LoftQ's later steps re-quantize the "
                     "base as W - BA, a base no saved adapter can carry to merge or chat (they rebuild the 4-bit base "
                     "from the original weights); the first step already gives the rank-r optimum for that base.")
        if init in ("loftq", "pissa", "olora") and a.use_dora:
            p.append(f"adapter.init={init} with adapter.use_dora=true: peft does not combine them; pick one.")
    if a.method in ("lora", "ia3"):
        tm = a.target_modules
        if not (tm == "all-linear" or (OmegaConf.is_list(tm) and len(tm) > 0)):
            p.append(f"adapter.target_modules={tm!r}: use 'all-linear' or a non-empty list such as [q_proj,v_proj].")
        elif OmegaConf.is_list(tm) and "lm_head" in tm:
            # TRL 1.16's SFTTrainer raises for an adapter on the output layer (its loss reads lm_head.weight directly)
            p.append(f"adapter.target_modules={list(tm)}: TRL's SFTTrainer trains no adapter on lm_head. Remove it; to "
                     "train the output layer itself, add adapter.modules_to_save=[lm_head].")
    if a.method in ("prefix", "prompt", "ptuning") and a.num_virtual_tokens < 1:
        p.append(f"adapter.num_virtual_tokens={a.num_virtual_tokens}: must be >= 1 (typical: 8-32).")
    checkpointing = [f"trainer.{k}" for k in ("activation_checkpointing", "gradient_checkpointing") if t.get(k)]
    if a.method == "prefix" and checkpointing:
        p.append(f"adapter=prefix with {' and '.join(checkpointing)}=true: transformers' checkpointed decoder layers "
                 "drop the cache that carries peft's prefix while the attention mask still counts it (size mismatch "
                 f"by num_virtual_tokens). Set {' and '.join(c + '=false' for c in checkpointing)}, or use "
                 "adapter=prompt.")
    if a.method == "full" and quantized:
        p.append(f"adapter=full with quant.method={q.method}: quantized weights cannot be trained directly. Use "
                 "quant=none for full fine-tuning, or keep the quantization with adapter=lora (QLoRA).")

    # data
    _data_problems(p, d, t)
    if not 0.0 < d.eval_fraction < 1.0:
        p.append(f"data.eval_fraction={d.eval_fraction}: must be between 0 and 1 (e.g. 0.1).")
    for key in ("max_train_samples", "max_eval_samples"):
        if d[key] is not None and d[key] < 1:
            p.append(f"data.{key}={d[key]}: must be >= 1, or null for all rows.")
    if d.task_eval_samples < 0:
        p.append(f"data.task_eval_samples={d.task_eval_samples}: must be >= 0 (0 skips the task score).")
    if d.max_new_tokens < 1:
        p.append(f"data.max_new_tokens={d.max_new_tokens}: must be >= 1.")

    # trainer
    if t.learning_rate <= 0:
        p.append(f"trainer.learning_rate={t.learning_rate}: must be > 0 (QLoRA typical: 1e-4 to 3e-4).")
    if t.per_device_train_batch_size < 1:
        p.append(f"trainer.per_device_train_batch_size={t.per_device_train_batch_size}: must be >= 1.")
    if t.gradient_accumulation_steps < 1:
        p.append(f"trainer.gradient_accumulation_steps={t.gradient_accumulation_steps}: must be >= 1.")
    if t.max_steps == 0 or t.max_steps < -1:
        p.append(f"trainer.max_steps={t.max_steps}: use a positive number of steps, or -1 to train num_train_epochs.")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        p.append(f"trainer.num_train_epochs={t.num_train_epochs}: must be > 0 when trainer.max_steps=-1.")
    if t.max_length is not None and t.max_length < 8:
        p.append(f"trainer.max_length={t.max_length}: too short to hold a prompt and an answer; use e.g. 512.")
    if t.fp16 and t.bf16:
        p.append("trainer.fp16 and trainer.bf16 are both true: choose one.")
    if t.packing and t.padding_free:
        p.append("trainer.packing=true already implies padding-free batches; leave trainer.padding_free=false.")
    elif t.padding_free:
        p.append("trainer.padding_free=true: use batching=padding_free instead (it keeps trainer.max_length, which "
                 "TRL's padding_free refuses).")
    if cfg.loss in ("selective", "native") and (t.loss_type != "nll" or t.label_smoothing_factor):
        which = (f"loss_type={t.loss_type}" if t.loss_type != "nll"
                 else f"label_smoothing_factor={t.label_smoothing_factor}")
        p.append(f"loss={cfg.loss} with trainer.{which}: only TRL's own loss computes that. Use loss=auto (it picks "
                 "TRL's loss then) or loss=fused.")
    if t.packing and cfg.batching != "shuffled":
        p.append(f"trainer.packing=true with batching={cfg.batching}: packed sequences are already padding-free; "
                 "set batching=shuffled.")

    keep_ok = _overfitting_problems(p, cfg)
    _objective_problems(p, cfg)
    if not any(problem.startswith("trainer.") for problem in unknown):
        # SFTConfig(**trainer) would stop at the first unknown key with a TypeError
        extra = overfitting_fields(resolve_keep(cfg.keep, t), cfg.early_stopping, t) if keep_ok else {}
        _trainer_args_problems(p, t, extra)
    if p:
        raise ConfigError(p)


KEEP = ("auto", "best", "last")
OBJECTIVES = ("sft", *PREFERENCE_OBJECTIVES)


def _objective_problems(p: list[str], cfg: DictConfig) -> None:
    """What the preference objectives (TRL's DPO/ORPO/KTO trainers, qlora_lab/objectives.py) run on, and init_from."""
    o, a, d, t = cfg.objective, cfg.adapter, cfg.data, cfg.trainer
    check_choice(p, "objective.name", o.name, OBJECTIVES)
    if cfg.init_from:
        run = Path(str(cfg.init_from)).expanduser()
        if not (run / "adapter" / "adapter_config.json").is_file():
            p.append(f"init_from={cfg.init_from!r}: not a completed run directory (no adapter/adapter_config.json "
                     "in it). Give the folder of a `qlora-lab train` run, e.g. outputs/2026-12-01/10-00-00.")
        elif (run / "config.yaml").is_file():
            first = OmegaConf.load(run / "config.yaml")
            for key in ("model.name_or_path", "quant.method"):
                if OmegaConf.select(first, key) != OmegaConf.select(cfg, key):
                    p.append(f"init_from={cfg.init_from}: its adapter was trained with {key}="
                             f"{OmegaConf.select(first, key)}, this run has {key}={OmegaConf.select(cfg, key)}; "
                             "an adapter continues on the base it was trained on. Set the same.")
        if o.name == "sft":
            p.append("init_from with objective=sft: an SFT run goes on by rerunning into its own folder (same "
                     "hydra.run.dir, a higher trainer.max_steps); init_from continues an adapter with objective=dpo, "
                     "orpo or kto.")
    if o.name not in OBJECTIVES or o.name == "sft":
        return
    if o.beta <= 0:
        p.append(f"objective.beta={o.beta}: must be > 0 (typical: 0.05-0.5).")
    if a.method in ("prefix", "prompt", "ptuning"):
        p.append(f"adapter={a.method} with objective={o.name}: prompt-learning adapters prepend virtual tokens, and "
                 "qlora_lab has not verified TRL's preference trainers with them (only LoRA-family and IA3 "
                 "adapters). Use adapter=lora.")
    if a.method == "full" and o.name in ("dpo", "kto"):
        p.append(f"adapter=full with objective={o.name}: the reference model would be a second full copy of the "
                 "model in memory (qlora_lab keeps the reference as the adapter-disabled base). Use adapter=lora, or "
                 "objective=orpo, which needs no reference.")
    if d.source not in ("demo", "file"):
        p.append(f"data.source={d.source} with objective={o.name}: preference data is read from data=demo (the "
                 "embedded preference demo) or data=file (prompt/chosen/rejected or prompt/completion/label rows) "
                 "so far; mixtures and hub datasets are SFT-only.")
    if d.streaming:
        p.append(f"data.streaming=true with objective={o.name}: TRL's preference trainers tokenize the rows up "
                 "front; streaming is SFT-only.")
    if o.name == "kto" and t.per_device_train_batch_size < 2:
        p.append(f"objective=kto with trainer.per_device_train_batch_size={t.per_device_train_batch_size}: KTO "
                 "estimates its KL term from mismatched rows of a batch; use 2 or more.")
    if o.name != "kto" and (o.desirable_weight != 1.0 or o.undesirable_weight != 1.0):
        p.append(f"objective.desirable_weight / undesirable_weight are KTO's; objective={o.name} does not read them.")
    if o.name == "orpo" and o.loss_type:
        p.append("objective.loss_type with objective=orpo: ORPO has one loss; leave it null.")
    if o.get("sft_weight", 0) < 0 or (o.get("sft_weight") and o.name != "dpo"):
        p.append(f"objective.sft_weight={o.sft_weight} with objective={o.name}: a weight >= 0, for objective=dpo only "
                 "(ORPO has its SFT term built in; KTO has none in TRL).")


def _overfitting_problems(p: list[str], cfg: DictConfig) -> bool:
    """early_stopping.* and keep; False when they are too wrong to build the trainer settings from."""
    es, t = cfg.early_stopping, cfg.trainer
    before = len(p)
    check_choice(p, "keep", cfg.keep, KEEP)
    evaluates = str(t.eval_strategy).lower() not in ("no", "none")
    if es.patience is not None and es.patience < 0:
        p.append(f"early_stopping.patience={es.patience}: give a number of evaluations >= 1, or 0 / null for no early "
                 "stopping.")
    elif es.patience and not evaluates:
        p.append(f"early_stopping.patience={es.patience} with trainer.eval_strategy={t.eval_strategy}: early stopping "
                 "watches the held-out evaluations, and this run makes none. Set trainer.eval_strategy=steps (with "
                 "trainer.eval_steps) or epoch.")
    if cfg.keep == "best" and not evaluates:
        p.append(f"keep=best with trainer.eval_strategy={t.eval_strategy}: the best checkpoint is the best evaluated "
                 "one, and this run makes no evaluation. Set trainer.eval_strategy=steps or epoch, or keep=last.")
    if es.threshold < 0:
        p.append(f"early_stopping.threshold={es.threshold}: must be >= 0 (the improvement an evaluation must beat).")
    if not str(es.metric or "").strip() or str(es.metric).startswith("before_"):
        p.append(f"early_stopping.metric={es.metric!r}: name a held-out metric the evaluation logs, e.g. eval_loss.")
    return len(p) == before


def _trainer_args_problems(p: list[str], t: DictConfig, extra: dict[str, Any] | None = None) -> None:
    """transformers' and TRL's own checks of the trainer settings (e.g. eval/save step multiples), reported with
    the others before any data or weight is loaded."""
    if env_true("ACCELERATE_USE_DEEPSPEED") or t.get("deepspeed") or _fsdp_on(t):
        return  # their arguments set up DeepSpeed / FSDP state (and need the packages): checked when training starts
    problem = check_sft_config(t, cuda=_has_cuda(), extra=extra)
    if problem:
        p.append(problem)
