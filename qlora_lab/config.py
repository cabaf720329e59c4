"""Typed config schemas (registered in Hydra's ConfigStore) and the one validator.

The YAML files under ``conf/`` fill these schemas; Hydra rejects unknown keys and values of the wrong type at
composition time, and :func:`validate` checks everything that types cannot express (choices, ranges, paths,
combinations) and reports every problem at once.

``trainer`` mirrors TRL's ``SFTConfig`` field by field (generated from it, so ``trainer.X=`` is the SFTConfig
field ``X`` and the help text is TRL's own), minus the fields qlora_lab owns: ``output_dir`` comes from Hydra's
run directory, ``resume_from_checkpoint`` from the run directory's checkpoints, and hub tokens from the
environment (``HF_TOKEN``) so that no secret is ever written into a saved config.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from qlora_lab import allocator
from qlora_lab.errors import ConfigError

# The Hydra configs of every command (conf/ at the project root; the package is installed editable).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# --------------------------------------------------------------------------------------------------------------
# model / quant / adapter / data


@dataclass
class ModelConfig:
    """The base model."""

    # Hub id (e.g. "Qwen/Qwen2.5-0.5B-Instruct"), local folder, or a built-in: "builtin:smollm2-135m-instruct"
    # (the embedded SmolLM2, offline) or "builtin:tiny-random" (2-layer random Llama for tests).
    name_or_path: str = MISSING
    # Hub revision (branch, tag or commit); ignored for local folders and built-ins.
    revision: Optional[str] = None
    # Run code shipped with a hub model. Off unless you set it: it executes the repository's Python.
    trust_remote_code: bool = False
    # Attention kernel passed to transformers: "sdpa", "eager", "flash_attention_2", or null for its default.
    attn_implementation: Optional[str] = "sdpa"
    # dtype of weights that are not quantized: "bfloat16", "float16", "float32", or "auto" (bf16 where supported).
    dtype: str = "auto"


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the frozen base model."""

    # "nf4" / "fp4" (4-bit, QLoRA), "int8" (LLM.int8), or "none" (base in `model.dtype`).
    method: str = "nf4"
    # 4-bit only: quantize the quantization constants too (saves ~0.4 bit/parameter).
    double_quant: bool = True
    # dtype the 4-bit matmuls run in: "bfloat16", "float16" or "float32"; "auto" = bfloat16 where supported.
    compute_dtype: str = "auto"
    # Module names kept in full precision (the LM head is always kept).
    skip_modules: list[str] = field(default_factory=list)
    # 4-bit storage dtype: null (uint8) for one process or DDP; under FSDP / DeepSpeed ZeRO-3 the model's dtype
    # ("bfloat16"), so that the packed 4-bit weights shard with the rest (the validator checks it).
    quant_storage: Optional[str] = None


@dataclass
class AdapterConfig:
    """The PEFT adapter; only its weights are trained (or, with method=full, every weight)."""

    # "lora" (LoRA family: see use_rslora, use_dora, init), "prefix" (prefix tuning), "prompt" (prompt tuning),
    # "ptuning" (p-tuning), "ia3", or "full" (no adapter: every weight trains; needs quant=none).
    method: str = "lora"
    # LoRA rank.
    r: int = 16
    # LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora).
    alpha: int = 32
    # Dropout on the LoRA input.
    dropout: float = 0.05
    # How LoRA dropout draws its masks: "torch" (nn.Dropout), "fast" (qlora_lab.adapters.FastDropout: the same
    # distribution from a quarter of the random draws, p rounded to 1/65536, a 1-byte mask kept for backward),
    # "recompute" (fast, and the dropped inputs of the LoRA A matmuls are not kept but recomputed in backward from
    # their input and mask: less memory), "auto" (recompute on CPU, where dropout's random draws were ~28% of a
    # QLoRA step; torch on CUDA).
    dropout_impl: str = "auto"
    # Modules to adapt (lora, ia3): "all-linear" (every linear layer but the LM head) or a list of module names.
    target_modules: Any = "all-linear"
    # Bias training (lora): "none", "all" or "lora_only".
    bias: str = "none"
    # Rank-stabilised LoRA: scale alpha / sqrt(r), so higher ranks keep learning.
    use_rslora: bool = False
    # Weight-decomposed LoRA (DoRA): trains a magnitude vector besides the low-rank direction.
    use_dora: bool = False
    # LoRA initialisation: "default" (B = 0), "gaussian", "pissa" / "pissa_niter_4" (principal singular vectors;
    # moves them out of the base, needs quant=none), "olora" (QR-based; needs quant=none, as pissa), "loftq" (LoRA
    # initialised to cancel the 4-bit quantization error; needs a 4-bit quant and the base's safetensors).
    init: str = "default"
    # LoftQ alternating steps (init=loftq).
    loftq_iter: int = 1
    # Extra modules trained in full and saved with the adapter (e.g. ["lm_head"]); empty for none.
    modules_to_save: list[str] = field(default_factory=list)
    # Prompt-learning methods (prefix, prompt, ptuning): number of virtual tokens.
    num_virtual_tokens: int = 16
    # Prompt tuning: initialise the virtual tokens from this text (null = random).
    prompt_init_text: Optional[str] = None
    # Prefix tuning: reparameterise the prefix through an MLP (more parameters, often more stable).
    prefix_projection: bool = False
    # P-tuning: hidden size of the prompt encoder MLP.
    encoder_hidden_size: int = 128
    # IA3: which of target_modules are feed-forward layers (scaled on their input); null = peft's per-model default.
    feedforward_modules: Any = None


@dataclass
class DataConfig:
    """Training data, the held-out split and the task metric (README "Your data")."""

    # "demo" (the embedded extraction task), "file" (jsonl/json/csv/parquet), "hub" (datasets.load_dataset) or
    # "mixture" (several files / hub datasets mixed by weight: data.sources).
    source: str = "demo"
    # File path (source=file) or dataset id (source=hub).
    path: Optional[str] = None
    # Hub dataset configuration name.
    name: Optional[str] = None
    # Split used for training (source=hub).
    split: str = "train"
    # Held-out data: a file path (source=file) or split name (source=hub); null = carve `eval_fraction` out.
    eval_path: Optional[str] = None
    # Fraction of the training data held out for evaluation when no eval_path is given (per source in a mixture).
    eval_fraction: float = 0.1
    # Row format: "auto" (detected from the columns), "messages", "sharegpt", "instruction", "prompt_completion" or
    # "text".
    format: str = "auto"
    # Rename columns before detection, e.g. data.columns={question:prompt,answer:completion}. Typed Any (a mapping
    # of old to new names, checked by the validator): Hydra can neither add keys to a typed dict from the command
    # line nor merge a dict into a typed null.
    columns: Any = None
    # Role names of chat rows mapped to system/user/assistant/tool, e.g. data.roles={human:user,bot:assistant}
    # (ShareGPT's human/gpt/system/function_call/observation are mapped already).
    roles: Any = None
    # Key names of chat rows, e.g. data.message_keys={messages:dialog,role:speaker,content:text} (defaults: messages,
    # role, content; for ShareGPT: conversations, from, value).
    message_keys: Any = None
    # Mixture (source=mixture): a list of sources, each {path, weight (default 1), split, name, eval_path, source
    # (file|hub; default: file for a .jsonl/.json/.csv/.parquet path), format, columns, roles, message_keys}; rows
    # are drawn by weight until the first source runs out; each source holds out its own eval rows.
    sources: Any = None
    # What the loss is computed on in chat rows: "all_assistant" (every assistant turn, with its end-of-turn token;
    # system/user/tool turns masked), "last_assistant" (the final answer only), "all" (every token).
    # Prompt/completion rows train the completion in every mode but "all".
    train_on: str = "all_assistant"
    # A row that cannot be used: "error" (stop, naming file, row and field) or "skip" (drop it, log the first few,
    # write all of them to <run>/skipped_rows.jsonl).
    bad_rows: str = "error"
    # With bad_rows=skip: stop anyway when more than this share of a source's rows is bad (a wrong format).
    max_bad_fraction: float = 0.1
    # Optional system message prepended to conversational rows.
    system_prompt: Optional[str] = None
    # Cap on training rows (null = all). For source=demo: how many rows to generate.
    max_train_samples: Optional[int] = None
    # Cap on held-out rows (null = all). For source=demo: how many rows to generate. With streaming: the rows held
    # out from the start of the stream (null = 256) unless eval_path is given.
    max_eval_samples: Optional[int] = None
    # Held-out task score: "auto" (json_match for the demo, exact_match otherwise), "json_match", "exact_match",
    # or "none". Scored on greedy generations for held-out prompt/completion rows.
    task_metric: str = "auto"
    # How many held-out rows the task score generates for (before and after training).
    task_eval_samples: int = 64
    # Generation budget per task-score answer.
    max_new_tokens: int = 64
    # Seed for the split, the mixture and the demo data.
    seed: int = 0
    # Reuse data prepared (converted + tokenized) by an earlier run with the same inputs, from the cache dir;
    # false rebuilds it (e.g. after a hub dataset changed: hub sources are keyed by id, config and split).
    cache: bool = True
    # Worker processes for conversion and tokenization; null = 1 under 20,000 rows, else the core count (<= 8).
    num_proc: Optional[int] = None
    # Stream rows instead of preparing them first (hub datasets too large to download, huge files): nothing is
    # cached, rows are read in order (no length grouping), and trainer.max_steps is required.
    streaming: bool = False


@dataclass
class InspectConfig:
    """What `qlora-lab inspect` shows."""

    # Training rows printed through the chat template, with the trained tokens marked.
    rows: int = 3
    # Also write the summary and the shown rows (each with `trained`: the decoded trained spans, in order) here.
    json: Optional[str] = None


# --------------------------------------------------------------------------------------------------------------
# trainer: generated from TRL's SFTConfig

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


# --------------------------------------------------------------------------------------------------------------
# the train command


@dataclass
class TrainRunConfig:
    """Primary config of `qlora-lab train` (conf/train.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: Any = field(default_factory=TrainerConfig)
    # Run directory: every artifact of the run goes here. Defaults to Hydra's runtime output dir.
    output_dir: str = MISSING
    # Score the held-out task before training too (the "before" in before → after).
    score_before: bool = True
    # A step with non-finite gradients is always skipped (weights unchanged; counted in metrics.json
    # "skipped_updates"). Stop the run (status failed, earlier checkpoints kept) after this many consecutive such
    # steps; 0 never stops. Under fp16, the GradScaler's normal overflow skips do not count (sft.counts_as_divergent).
    max_nonfinite_steps: int = 3
    # In a sweep: stop the whole sweep at the first failed job (default: record it as failed and go on).
    fail_fast: bool = False
    # How rows become batches:
    #   "grouped"      — rows of similar length share a batch (the Trainer's length-grouped sampler: shuffled
    #                    groups of 50 batches, sorted by length inside), so little padding is computed: fastest,
    #   "shuffled"     — uniformly shuffled batches, padded to their longest row (the Trainer's default),
    #   "padding_free" — shuffled rows concatenated without padding, attention kept inside each row (position_ids):
    #                    least memory; attention then spans the whole batch's length, slower on CPU.
    batching: str = "grouped"
    # Memory budget in GiB for a training step (weights + adapter + activations + logits, as the "will it fit?"
    # estimate computes them). Over budget, every n-th decoder layer is checkpointed (recomputed in backward), with
    # the largest n that fits. "auto" = 90% of the GPU's memory on CUDA, no budget on CPU; null = no budget
    # (trainer.gradient_checkpointing alone decides).
    memory_budget_gb: Any = "auto"
    # How the training loss is computed (same value in every case):
    #   "selective" — logits only for labelled positions, in chunks of <=256 MiB (fastest, least memory; falls back
    #                 to "native" for prompt/p-tuning and for models that rescale their logits),
    #   "native"    — the model's own cross-entropy over the full logits,
    #   "fused"     — TRL's fused LM head, which also logs entropy and token accuracy (slow without Triton),
    #   "auto"      — selective where it applies, else native; "fused" (TRL's compute_loss, the only path that
    #                 applies them) with trainer.loss_type other than nll, label smoothing, or an MoE model's router
    #                 auxiliary loss.
    loss: str = "auto"
    # Decoder-layer kernels (qlora_lab/kernels.py):
    #   "lean"  — PyTorch RMSNorm and SwiGLU computing the same values as transformers' modules but keeping less
    #             for backward (bf16 norm inputs instead of float32 copies; SiLU recomputed); Llama/Mistral/Qwen2/3,
    #   "liger" — Liger Kernel's Triton RMSNorm, RoPE and SwiGLU (transformers' `use_liger_kernel`; needs a CUDA GPU
    #             and `pip install liger-kernel`); its fused loss stays off, the loss is `loss` above. Measured on
    #             an H200 (8B, seq 2048): -11.6 GiB and the same median step, but occasional slow steps (1.2-2.2 s
    #             vs 0.4 s; not profiled) that had not stopped after 15 steps; +12% tokens/s with every layer
    #             checkpointed,
    #   "none"  — the model's own modules,
    #   "auto"  — lean on CPU (measured: less memory, same speed); none on CUDA (lean not measured there yet).
    kernels: str = "auto"
    # The C allocator of the training process (qlora_lab/allocator.py): "mimalloc", "jemalloc", "system" (the C
    # library's malloc), or "auto" = mimalloc on Linux without a GPU driver, else system. On CPU, glibc's malloc
    # keeps freed activation memory fragmented: mimalloc measured -0.4 to -0.65 GiB peak RSS
    # (benchmarks/results/levers-allocator-*, mimalloc-purge-*). Applied when
    # `qlora-lab train` starts, from its command line (it re-executes itself once with LD_PRELOAD; auto leaves an
    # allocator you preloaded yourself); train() called from Python, a value set in a config file, and
    # submitit/SLURM jobs keep the process's own allocator (train logs which).
    allocator: str = "auto"


@dataclass
class BenchConfig:
    """What `qlora-lab bench` measures: every (seq_len, batch_size, method, recipe), each in a fresh process."""

    # Methods: "qlora" (NF4 base + LoRA), "lora" (bf16 base + LoRA), "full" (bf16, every weight), "prefix" (bf16 base
    # + prefix tuning). LoRA settings are the adapter/lora defaults (r 16, alpha 32, dropout 0.05, all-linear).
    methods: list[str] = field(default_factory=lambda: ["qlora", "lora", "full", "prefix"])
    # "qlora_lab" (this tool's default recipe: `qlora-lab train`'s own builders) and "plain" (the hand-written TRL +
    # peft + bitsandbytes script with library defaults, qlora_lab/bench/plain_recipe.py).
    recipes: list[str] = field(default_factory=lambda: ["qlora_lab", "plain"])
    # Longest row in tokens (trainer.max_length); rows are drawn with lengths uniform in [seq_len/4, seq_len].
    seq_lens: list[int] = field(default_factory=lambda: [256])
    # Rows per step (per_device_train_batch_size; no gradient accumulation).
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    # Optimizer steps measured, after `warmup_steps` steps that are not (allocation, kernel selection, caches).
    steps: int = 6
    warmup_steps: int = 2
    # Steps profiled with torch.profiler after the measured ones (not in the timings); 0 = none. The results then
    # list, per configuration, the ops with the most self time (GPU time on CUDA, CPU time otherwise).
    profile_steps: int = 0
    # Extra `qlora-lab train` overrides for the qlora_lab recipe: the levers, e.g. ["loss=native"].
    overrides: list[str] = field(default_factory=list)
    # More qlora_lab recipes to measure in the same run, name -> overrides (on top of `overrides`), e.g.
    # {shuffled: [batching=shuffled], torch_dropout: [adapter.dropout_impl=torch]}; each is the recipe
    # "qlora_lab:<name>" in the results.
    variants: dict[str, list[str]] = field(default_factory=dict)
    # Where results go: <results_dir>/<name>.{json,md,png}; name null = <machine>-<date>.
    results_dir: str = "benchmarks/results"
    name: Optional[str] = None
    # Peak bf16 FLOP/s for MFU, in TFLOP/s; null = 989 on H100/H200, else a matmul measured at start.
    peak_tflops: Optional[float] = None
    # Seconds before a configuration's process is stopped (recorded as failed).
    timeout_s: int = 1800


@dataclass
class BenchRunConfig:
    """Primary config of `qlora-lab bench` (conf/bench.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass
class MergeRunConfig:
    """Primary config of `qlora-lab merge` (conf/merge.yaml)."""

    # The run directory of a completed `qlora-lab train` (holds config.yaml, adapter/, metrics.json).
    run: str = MISSING
    # Where to write the merged model; null = <run>/merged. Written to a temp folder and renamed when complete.
    out: Optional[str] = None
    # Base weights the adapter is merged into: "original" (the checkpoint's own weights), "nf4_roundtrip" (the
    # base quantized and dequantized exactly as in training — what the adapter actually saw), or "auto"
    # (nf4_roundtrip for 4-bit runs, original otherwise; README "Merge" shows how to compare them on a run).
    # "original" is refused for adapter.init=loftq runs: their adapter already holds the original − 4-bit difference.
    base: str = "auto"
    # dtype of the saved weights: "bfloat16", "float16" or "float32". The merge itself runs in float32.
    dtype: str = "bfloat16"
    # Held-out prompts for the after-merge check (merged vs base-in-training-precision + adapter).
    check_prompts: int = 4


@dataclass
class ChatRunConfig:
    """Primary config of `qlora-lab chat` (conf/chat.yaml)."""

    # A run directory (adapter on its base, in the training quantization) or a merged model folder.
    run: str = MISSING
    # One prompt to answer and exit; null = interactive (empty line or Ctrl-D quits).
    prompt: Optional[str] = None
    # Optional system message.
    system_prompt: Optional[str] = None
    # Longest answer, in tokens.
    max_new_tokens: int = 256
    # false = greedy decoding (deterministic); true = sample with temperature / top_p / top_k.
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    # Seed for sampling.
    seed: int = 0
    # Print tokens as they are generated.
    stream: bool = True

    # ---- prompts from a file (issue #21, "the first hour"). Without prompt and prompt_file, a prompt piped into
    # standard input (echo ... | qlora-lab chat run=R) is answered once; a terminal gets the interactive chat.
    # A file of prompts answered one after another: one prompt per line, or a .jsonl file with one JSON value a line
    # (a list of chat messages, {"messages": [...]}, or {"prompt": ..., "completion": ...}; a conversation's final
    # assistant message is kept as the reference, not sent). "-" reads standard input.
    prompt_file: Optional[str] = None
    # Where prompt_file's answers go, as JSONL (each input line with its "answer"): null = next to prompt_file as
    # <name>.answers.jsonl (standard output for prompt_file=-); "-" = standard output.
    answers: Optional[str] = None


@dataclass
class HubConfig:
    """Where `qlora-lab export format=hub` uploads (the token comes from $HF_TOKEN only)."""

    # The repository, user/name or org/name; created when missing.
    repo: Optional[str] = None
    # Create the repository private.
    private: bool = False
    # What to upload: "adapter" (the adapter folder, at the top), "merged" (the merged model, in merged/), "gguf"
    # (the .gguf files of an earlier `export format=gguf`, in gguf/).
    include: list[str] = field(default_factory=lambda: ["adapter"])


@dataclass
class ExportRunConfig:
    """Primary config of `qlora-lab export` (conf/export.yaml)."""

    # A completed run directory (its adapter is merged first, as `qlora-lab merge` does; an earlier <run>/merged with
    # the same base is reused) — or `merged`, a merged model folder. Exactly one of the two.
    run: Optional[str] = None
    merged: Optional[str] = None
    # "gguf" (llama.cpp / LM Studio), "ollama" (GGUF + Modelfile) or "hub" (upload to the Hugging Face Hub).
    format: str = "gguf"
    # GGUF types to write: "f16", "bf16", "q8_0", "f32".
    types: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    # Output folder; null = <run>/export (or export/ next to the merged folder).
    out: Optional[str] = None
    # File name stem (<name>-<type>.gguf); null = the run folder's name.
    name: Optional[str] = None
    # Merge base when a run is merged first: "auto", "original" or "nf4_roundtrip" (see MergeRunConfig.base).
    base: str = "auto"
    # Held-out prompts of the run on which each GGUF read back is compared with the merged model.
    check_prompts: int = 8
    # Tokens of each greedy answer compared side by side.
    max_new_tokens: int = 32
    hub: HubConfig = field(default_factory=HubConfig)


# `qlora-lab prepare` / `inspect`: the train config (same groups and overrides) plus what inspect shows. Built from
# TrainRunConfig's fields rather than subclassing it, so the commands share fields, not behaviour.
PrepareRunConfig = dataclasses.make_dataclass(
    "PrepareRunConfig",
    [(f.name, typing.get_type_hints(TrainRunConfig)[f.name], field(default=f.default)
      if f.default is not dataclasses.MISSING else field(default_factory=f.default_factory))
     for f in dataclasses.fields(TrainRunConfig)]
    + [("inspect", InspectConfig, field(default_factory=InspectConfig))])
PrepareRunConfig.__doc__ = "Primary config of `qlora-lab prepare` and `qlora-lab inspect` (conf/prepare.yaml)."
# each command's schema, for the unknown-key checks (prepare and inspect share one config)
SCHEMAS = {"train": TrainRunConfig, "merge": MergeRunConfig, "chat": ChatRunConfig, "bench": BenchRunConfig,
           "prepare": PrepareRunConfig, "inspect": PrepareRunConfig, "export": ExportRunConfig}


def register_configs() -> None:
    """Register the schemas; YAML files name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="prepare_schema", node=PrepareRunConfig)
    cs.store(name="merge_schema", node=MergeRunConfig)
    cs.store(name="export_schema", node=ExportRunConfig)
    cs.store(name="chat_schema", node=ChatRunConfig)
    cs.store(name="bench_schema", node=BenchRunConfig)


# --------------------------------------------------------------------------------------------------------------
# validation

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


def _choice(problems: list[str], key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        problems.append(f"{key}={value!r} is not one of {', '.join(choices)}.{hint}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _zero_stage(problems: list[str], t: DictConfig) -> int | None:
    """The DeepSpeed ZeRO stage of this run, or None without DeepSpeed.

    ``trainer.deepspeed`` (a JSON file or a mapping, as for TrainingArguments) wins over what ``accelerate launch``
    exports: ACCELERATE_USE_DEEPSPEED=true with ACCELERATE_DEEPSPEED_ZERO_STAGE, or ACCELERATE_DEEPSPEED_CONFIG_FILE
    (accelerate/utils/launch.py, prepare_deepspeed_cmd_env). Without a stage, accelerate's DeepSpeedPlugin uses 2.
    """
    ds = t.get("deepspeed")
    if not ds and not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    if not ds and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    source = ds or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if OmegaConf.is_dict(source):
        conf = OmegaConf.to_container(source)
    elif source:
        key = "trainer.deepspeed" if ds else "ACCELERATE_DEEPSPEED_CONFIG_FILE"
        try:
            conf = json.loads(Path(str(source)).expanduser().read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{key}={str(source)!r}: not a readable DeepSpeed JSON config ({e}).")
            return None
    else:
        return 2
    stage = (conf.get("zero_optimization") or {}).get("stage", 0)
    return stage if isinstance(stage, int) else None


def _sharded_by(problems: list[str], t: DictConfig) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when the run shards its parameters across processes, else None.

    FSDP: ``accelerate launch`` with an FSDP config exports ACCELERATE_USE_FSDP=true; torchrun users set
    ``trainer.fsdp`` (TrainingArguments.fsdp).
    """
    if _fsdp_on(t):
        return "FSDP"
    return "DeepSpeed ZeRO-3" if _zero_stage(problems, t) == 3 else None


def _fsdp_on(t: DictConfig) -> bool:
    return _env_true("ACCELERATE_USE_FSDP") or str(t.get("fsdp") or "").strip().lower() not in ("", "false", "no")


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
    _choice(p, "data.source", d.source, DATA_SOURCES)
    _choice(p, "data.format", d.format, DATA_FORMATS)
    _choice(p, "data.task_metric", d.task_metric, TASK_METRICS)
    _choice(p, "data.train_on", d.train_on, TRAIN_ON)
    _choice(p, "data.bad_rows", d.bad_rows, BAD_ROWS)
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
                    _choice(p, f"{where}.format", s.format, DATA_FORMATS)
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

    _choice(p, "loss", cfg.loss, LOSS_IMPLS)
    _choice(p, "batching", cfg.batching, BATCHING)
    _choice(p, "kernels", cfg.kernels, KERNELS)
    _choice(p, "allocator", cfg.allocator, allocator.ALLOCATORS)
    why_not = allocator.problem(cfg.allocator)
    if why_not:
        p.append(why_not)
    if cfg.kernels == "liger":
        from qlora_lab.kernels import liger_unavailable

        why_not = liger_unavailable()
        if why_not:
            p.append(f"kernels=liger: {why_not}. Use kernels=auto or kernels=none.")
    budget = cfg.memory_budget_gb
    if not (budget is None or budget == "auto" or (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                                                    and budget > 0)):
        p.append(f"memory_budget_gb={budget!r}: give a positive number of GiB, 'auto' (90% of the GPU) or null.")
    if cfg.max_nonfinite_steps < 0:
        p.append(f"max_nonfinite_steps={cfg.max_nonfinite_steps}: must be >= 0 (0 disables the divergence check).")

    # model
    name = str(m.name_or_path)
    if name.startswith("builtin:"):
        _choice(p, "model.name_or_path", name, tuple(f"builtin:{b}" for b in BUILTIN_MODELS))
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        p.append(f"model.name_or_path={name!r}: no such folder. Give a folder holding config.json and weights, "
                 "a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct', or a built-in such as 'builtin:smollm2-135m-instruct'.")
    _choice(p, "model.dtype", m.dtype, DTYPES)

    # quant
    _choice(p, "quant.method", q.method, QUANT_METHODS)
    _choice(p, "quant.compute_dtype", q.compute_dtype, DTYPES)
    if q.quant_storage is not None:
        _choice(p, "quant.quant_storage", q.quant_storage, DTYPES)
    _sharding_problems(p, cfg)  # FSDP / DeepSpeed ZeRO-3 (from the launcher's environment or trainer.*)
    _data_parallel_problems(p, cfg)

    # adapter
    _choice(p, "adapter.method", a.method, ADAPTER_METHODS)
    quantized = q.method != "none"
    if a.method == "lora":
        if a.r < 1:
            p.append(f"adapter.r={a.r}: the rank must be >= 1 (typical: 8-64).")
        if a.alpha <= 0:
            p.append(f"adapter.alpha={a.alpha}: must be > 0 (typical: 2 x adapter.r).")
        if not 0.0 <= a.dropout < 1.0:
            p.append(f"adapter.dropout={a.dropout}: must be in [0, 1).")
        _choice(p, "adapter.dropout_impl", a.dropout_impl, ("auto", "torch", "fast", "recompute"))
        if a.bias not in ("none", "all", "lora_only"):
            p.append(f"adapter.bias={a.bias!r}: use 'none', 'all' or 'lora_only'.")
        init = str(a.init)
        if not (init in LORA_INITS or init.startswith("pissa_niter_")):
            _choice(p, "adapter.init", init, LORA_INITS)
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
        elif init == "loftq" and not _has_cuda():
            p.append("adapter.init=loftq needs a CUDA (or XPU) device: peft's LoftQ computes its SVDs there "
                     "(peft/utils/loftq_utils.py hard-codes the compute device). On CPU use adapter.init=default.")
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

    if not any(problem.startswith("trainer.") for problem in unknown):
        _trainer_args_problems(p, t)  # SFTConfig(**trainer) would stop at the first unknown key with a TypeError
    if p:
        raise ConfigError(p)


def _trainer_args_problems(p: list[str], t: DictConfig) -> None:
    """transformers' and TRL's own checks of the trainer settings (e.g. eval/save step multiples), reported with
    the others before any data or weight is loaded."""
    import tempfile

    from qlora_lab.errors import UserError
    from qlora_lab.sft import build_sft_config  # imports this module: here, not at the top

    if _env_true("ACCELERATE_USE_DEEPSPEED") or t.get("deepspeed") or _fsdp_on(t):
        return  # their arguments set up DeepSpeed / FSDP state (and need the packages): checked when training starts
    try:
        build_sft_config(t, Path(tempfile.gettempdir()) / "qlora-lab-validate")
    except UserError as e:
        p.append(str(e))
