"""Typed config schemas of every command, registered in Hydra's ConfigStore. A leaf: it imports nothing of
qlora_lab but the trainer group's schema (sftconfig.py, TRL's SFTConfig mirrored field by field).

The YAML files under ``conf/`` fill these schemas; Hydra rejects values of the wrong type at composition time, and
qlora_lab/validate.py checks everything that types cannot express (unknown keys, choices, ranges, paths,
combinations) and reports every problem at once. Each field's docstring (the string under it) is its help: IDEs
show it, and :func:`field_help` reads it for ``--help``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from qlora_lab.sftconfig import TrainerConfig

# The Hydra configs of every command (conf/ at the project root; the package is installed editable).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# --------------------------------------------------------------------------------------------------------------
# model / quant / adapter / data


@dataclass
class ModelConfig:
    """The base model."""

    name_or_path: str = MISSING
    """Hub id (e.g. "Qwen/Qwen2.5-0.5B-Instruct"), local folder, or a built-in: "builtin:smollm2-135m-instruct"
    (the embedded SmolLM2, offline) or "builtin:tiny-random" (2-layer random Llama for tests)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit); ignored for local folders and built-ins."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you set it: it executes the repository's Python."""
    attn_implementation: Optional[str] = "sdpa"
    """Attention kernel passed to transformers: "sdpa", "eager", "flash_attention_2", or null for its default."""
    dtype: str = "auto"
    """dtype of weights that are not quantized: "bfloat16", "float16", "float32", or "auto" (bf16 where supported)."""


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the frozen base model."""

    method: str = "nf4"
    """"nf4" / "fp4" (4-bit, QLoRA), "int8" (LLM.int8), or "none" (base in `model.dtype`)."""
    double_quant: bool = True
    """4-bit only: quantize the quantization constants too (saves ~0.4 bit/parameter)."""
    compute_dtype: str = "auto"
    """dtype the 4-bit matmuls run in: "bfloat16", "float16" or "float32"; "auto" = bfloat16 where supported."""
    skip_modules: Any = "auto"
    """Linear layers kept in 16-bit besides the LM head: a list of module names (e.g. [down_proj]; [] = quantize every
    other linear layer), or "auto" = [down_proj] for a 4-bit model under 1B parameters (its most 4-bit-sensitive
    layer, for tens of MiB: README "4-bit quality"), none for larger models and int8."""
    quant_storage: Optional[str] = None
    """4-bit storage dtype: null (uint8) for one process or DDP; under FSDP / DeepSpeed ZeRO-3 the model's dtype
    ("bfloat16"), so that the packed 4-bit weights shard with the rest (the validator checks it)."""


@dataclass
class AdapterConfig:
    """The PEFT adapter; only its weights are trained (or, with method=full, every weight)."""

    method: str = "lora"
    """"lora" (LoRA family: see use_rslora, use_dora, init), "prefix" (prefix tuning), "prompt" (prompt tuning),
    "ptuning" (p-tuning), "ia3", or "full" (no adapter: every weight trains; needs quant=none)."""
    r: Any = "auto"
    """LoRA rank: a number, or "auto" = 64 for models under 1B parameters (adapters are cheap there; on the demo rank
    64 bought back most of the 4-bit error and was neutral on a 16-bit base: README "4-bit quality"), 16 above."""
    alpha: Any = "auto"
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora): a number, or "auto" = 2 x r
    (scale 2 at every rank)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    dropout_impl: str = "auto"
    """How LoRA dropout draws its masks: "torch" (nn.Dropout), "fast" (qlora_lab.cpu.dropout.FastDropout: the same
    distribution from a quarter of the random draws, p rounded to 1/65536, a 1-byte mask kept for backward),
    "recompute" (fast, and the dropped inputs of the LoRA A matmuls are not kept but recomputed in backward from
    their input and mask: less memory), "auto" (recompute on CPU, where dropout's random draws were ~28% of a
    QLoRA step; torch on CUDA)."""
    target_modules: Any = "all-linear"
    """Modules to adapt (lora, ia3): "all-linear" (every linear layer but the LM head) or a list of module names."""
    bias: str = "none"
    """Bias training (lora): "none", "all" or "lora_only"."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale alpha / sqrt(r), so higher ranks keep learning."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): trains a magnitude vector besides the low-rank direction."""
    init: str = "default"
    """LoRA initialisation: "default" (B = 0), "gaussian", "pissa" / "pissa_niter_4" (principal singular vectors;
    moves them out of the base, needs quant=none), "olora" (QR-based; needs quant=none, as pissa), "loftq" (LoRA
    initialised to cancel the 4-bit quantization error; needs a 4-bit quant and the base's safetensors)."""
    loftq_iter: int = 1
    """LoftQ steps (init=loftq): 1, the only value accepted (the 4-bit base must stay what merge and chat rebuild
    from the original weights, so LoftQ's later re-quantizing steps cannot be used)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. ["lm_head"]); empty for none."""
    num_virtual_tokens: int = 16
    """Prompt-learning methods (prefix, prompt, ptuning): number of virtual tokens."""
    prompt_init_text: Optional[str] = None
    """Prompt tuning: initialise the virtual tokens from this text (null = random)."""
    prefix_projection: bool = False
    """Prefix tuning: reparameterise the prefix through an MLP (more parameters, often more stable)."""
    encoder_hidden_size: int = 128
    """P-tuning: hidden size of the prompt encoder MLP."""
    feedforward_modules: Any = None
    """IA3: which of target_modules are feed-forward layers (scaled on their input); null = peft's per-model default."""


@dataclass
class DataConfig:
    """Training data, the held-out split and the task metric (README "Your data")."""

    source: str = "demo"
    """"demo" (the embedded extraction task), "file" (jsonl/json/csv/parquet), "hub" (datasets.load_dataset) or
    "mixture" (several files / hub datasets mixed by weight: data.sources)."""
    path: Optional[str] = None
    """File path (source=file) or dataset id (source=hub)."""
    name: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split used for training (source=hub)."""
    eval_path: Optional[str] = None
    """Held-out data: a file path (source=file) or split name (source=hub); null = carve `eval_fraction` out."""
    eval_fraction: float = 0.1
    """Fraction of the training data held out for evaluation when no eval_path is given (per source in a mixture)."""
    format: str = "auto"
    """Row format: "auto" (detected from the columns), "messages", "sharegpt", "instruction", "prompt_completion" or
    "text"."""
    columns: Any = None
    """Rename columns before detection, e.g. data.columns={question:prompt,answer:completion}. Typed Any (a mapping
    of old to new names, checked by the validator): Hydra can neither add keys to a typed dict from the command
    line nor merge a dict into a typed null."""
    roles: Any = None
    """Role names of chat rows mapped to system/user/assistant/tool, e.g. data.roles={human:user,bot:assistant}
    (ShareGPT's human/gpt/system/function_call/observation are mapped already)."""
    message_keys: Any = None
    """Key names of chat rows, e.g. data.message_keys={messages:dialog,role:speaker,content:text} (defaults: messages,
    role, content; for ShareGPT: conversations, from, value)."""
    sources: Any = None
    """Mixture (source=mixture): a list of sources, each {path, weight (default 1), split, name, eval_path, source
    (file|hub; default: file for a .jsonl/.json/.csv/.parquet path), format, columns, roles, message_keys}; rows
    are drawn by weight until the first source runs out; each source holds out its own eval rows."""
    train_on: str = "all_assistant"
    """What the loss is computed on in chat rows: "all_assistant" (every assistant turn, with its end-of-turn token;
    system/user/tool turns masked), "last_assistant" (the final answer only), "all" (every token).
    Prompt/completion rows train the completion in every mode but "all"."""
    bad_rows: str = "error"
    """A row that cannot be used: "error" (stop, naming file, row and field) or "skip" (drop it, log the first few,
    write all of them to <run>/skipped_rows.jsonl)."""
    max_bad_fraction: float = 0.1
    """With bad_rows=skip: stop anyway when more than this share of a source's rows is bad (a wrong format)."""
    system_prompt: Optional[str] = None
    """Optional system message prepended to conversational rows."""
    max_train_samples: Optional[int] = None
    """Cap on training rows (null = all). For source=demo: how many rows to generate."""
    max_eval_samples: Optional[int] = None
    """Cap on held-out rows (null = all). For source=demo: how many rows to generate. With streaming: the rows held
    out from the start of the stream (null = 256) unless eval_path is given."""
    task_metric: str = "auto"
    """Held-out task score: "auto" (json_match for the demo, exact_match otherwise), "json_match", "exact_match",
    or "none". Scored on greedy generations for held-out prompt/completion rows."""
    task_eval_samples: int = 64
    """How many held-out rows the task score generates for (before and after training)."""
    max_new_tokens: int = 64
    """Generation budget per task-score answer."""
    seed: int = 0
    """Seed for the split, the mixture and the demo data."""
    cache: bool = True
    """Reuse data prepared (converted + tokenized) by an earlier run with the same inputs, from the cache dir;
    false rebuilds it (e.g. after a hub dataset changed: hub sources are keyed by id, config and split)."""
    num_proc: Optional[int] = None
    """Worker processes for conversion and tokenization; null = 1 under 20,000 rows, else the core count (<= 8)."""
    streaming: bool = False
    """Stream rows instead of preparing them first (hub datasets too large to download, huge files): nothing is
    cached, rows are read in order (no length grouping), and trainer.max_steps is required."""


@dataclass
class InspectConfig:
    """What `qlora-lab inspect` shows."""

    rows: int = 3
    """Training rows printed through the chat template, with the trained tokens marked."""
    json: Optional[str] = None
    """Also write the summary and the shown rows (each with `trained`: the decoded trained spans, in order) here."""


# --------------------------------------------------------------------------------------------------------------
# the train command


@dataclass
class ResumeConfig:
    """How a rerun into an existing run directory resumes."""

    allow_plan_change: bool = False
    """A resume on a machine whose plan (qlora_lab/plan.py: dtypes, mixed precision, loss path, kernels, dropout,
    device, world size) differs from the one the run started on is refused, naming the fields; true resumes
    anyway, with the new plan (logged and recorded in plan.json)."""


PREFERENCE_OBJECTIVES = ("dpo", "orpo", "kto")  # objective.name values run by TRL's preference trainers


@dataclass
class ObjectiveConfig:
    """What the run optimises (conf/objective/): supervised fine-tuning, or preference tuning with TRL's trainers."""

    name: str = "sft"
    """"sft" (TRL's SFTTrainer on prompt/completion or chat rows), "dpo" (TRL's DPOTrainer on prompt/chosen/rejected
    pairs), "orpo" (TRL's experimental ORPOTrainer on the same pairs: no reference model), "kto" (TRL's KTOTrainer on
    prompt/completion/label rows; pairs are split into a desirable and an undesirable row)."""
    beta: float = 0.1
    """dpo/kto: how far the policy may move from the reference (higher = closer); orpo: the weight of the
    odds-ratio term (TRL's lambda)."""
    loss_type: Optional[str] = None
    """dpo: TRL's DPOConfig loss_type ("sigmoid", "ipo", "hinge", ...); kto: "kto" or "apo_zero_unpaired"; null =
    TRL's default."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable rows' loss."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable rows' loss."""
    sft_weight: float = 0.0
    """dpo: weight of an added SFT loss (negative log-likelihood) on the chosen answers, TRL's multi-loss
    ``loss_type=[<loss_type>, "sft"]`` with ``loss_weights=[1, sft_weight]`` (RPO). It keeps the chosen answers
    likely: plain DPO only widens the chosen-rejected gap, and on the demo after SFT it broke the JSON format
    (README "Preference tuning"). 0 = plain DPO."""


@dataclass
class EarlyStoppingConfig:
    """The overfitting guard: stop when the held-out metric stops improving (transformers' EarlyStoppingCallback)."""

    patience: Optional[int] = None
    """Stop after this many evaluations in a row without an improvement of `metric`; 0 or null = never stop early.
    Needs evaluation (trainer.eval_strategy steps or epoch)."""
    metric: str = "eval_loss"
    """The held-out metric watched, and the one that picks the best checkpoint with keep=best (transformers'
    metric_for_best_model): "eval_loss", or another key the evaluation logs (with or without "eval_")."""
    threshold: float = 0.0
    """An evaluation improves on the best so far only by more than this (absolute, in the metric's units)."""
    greater_is_better: Optional[bool] = None
    """Whether a higher `metric` is better; null = transformers' rule: lower is better for names ending in "loss",
    higher otherwise."""


@dataclass
class TrainRunConfig:
    """Primary config of `qlora-lab train` (conf/train.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: Any = field(default_factory=TrainerConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Resuming a run started elsewhere."""
    output_dir: str = MISSING
    """Run directory: every artifact of the run goes here. Defaults to Hydra's runtime output dir."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """What the run optimises: sft (default), dpo, orpo or kto."""
    init_from: Optional[str] = None
    """A completed run directory whose adapter this run continues (its <run>/adapter/, e.g. an SFT run before DPO);
    the base model and quantization must be the run's. With dpo/kto the reference is that adapter as it starts
    (TRL keeps a frozen copy of it, adapter-sized); null = a fresh adapter from the adapter group."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Stopping when the held-out metric no longer improves."""
    keep: str = "auto"
    """Which weights become <run>/adapter/: "best" (the evaluated checkpoint with the best early_stopping.metric:
    transformers' load_best_model_at_end, so a checkpoint is saved at every evaluation), "last" (the weights at the
    last step), or "auto" (best when the run evaluates and saves checkpoints, last otherwise)."""
    score_before: bool = True
    """Score the held-out task before training too (the "before" in before → after)."""
    max_nonfinite_steps: int = 3
    """A step with non-finite gradients is always skipped (weights unchanged; counted in metrics.json
    "skipped_updates"). Stop the run (status failed, earlier checkpoints kept) after this many consecutive such
    steps; 0 never stops. Under fp16, the GradScaler's normal overflow skips do not count (sft.counts_as_divergent)."""
    fail_fast: bool = False
    """In a sweep: stop the whole sweep at the first failed job (default: record it as failed and go on)."""
    batching: str = "grouped"
    """How rows become batches:
      "grouped"      — rows of similar length share a batch (the Trainer's length-grouped sampler: shuffled
                       groups of 50 batches, sorted by length inside), so little padding is computed: fastest,
      "shuffled"     — uniformly shuffled batches, padded to their longest row (the Trainer's default),
      "padding_free" — shuffled rows concatenated without padding, attention kept inside each row (position_ids):
                       least memory; attention then spans the whole batch's length, slower on CPU."""
    memory_budget_gb: Any = "auto"
    """Memory budget in GiB for a training step (weights + adapter + activations + logits, as the "will it fit?"
    estimate computes them). Over budget, every n-th decoder layer is checkpointed (recomputed in backward), with
    the largest n that fits, then every layer with offload_activations (auto). "auto" = 90% of the GPU's memory on
    CUDA, no budget on CPU; null = no budget (trainer.gradient_checkpointing alone decides). A number is also
    enforced on CUDA (torch.cuda.set_per_process_memory_fraction): a 24 on an 80 GB card runs about as a 24 GB card
    would, out-of-memory error included (the cap covers PyTorch's caching allocator, not the CUDA context's few
    hundred MiB)."""
    offload_activations: Any = "auto"
    """Activation offloading to host memory (TRL's `activation_offloading`: torchtune's OffloadActivations, which
    copies every saved activation but the LM head's (loss=selective's chunked logits are computed outside it and
    may be offloaded too) to pinned host memory on a side CUDA stream and brings it back
    ahead of its backward): true, false, or "auto" = on only where the memory budget is still exceeded with every
    decoder layer checkpointed. CUDA only: on CPU the activations are in host memory already (true is turned off,
    with a note in the plan)."""
    loss: str = "auto"
    """How the training loss is computed (same value in every case):
      "selective" — logits only for labelled positions, in chunks of <=256 MiB (fastest, least memory; falls back
                    to "native" for prompt/p-tuning and for models that rescale their logits),
      "native"    — the model's own cross-entropy over the full logits,
      "fused"     — TRL's fused LM head, which also logs entropy and token accuracy (slow without Triton),
      "auto"      — selective where it applies, else native; "fused" (TRL's compute_loss, the only path that
                    applies them) with trainer.loss_type other than nll, label smoothing, or an MoE model's router
                    auxiliary loss."""
    compile: str = "none"
    """Regional torch.compile: "layers" compiles each decoder layer (one compiled graph reused by every layer, so
    warm-up is one layer's compile, not the model's; bitsandbytes 4-bit ops are torch custom ops that compile keeps
    whole; the CPU's FastDropout breaks the graph at each LoRA dropout, which still measured faster there than
    torch's dropout compiled whole), "none" runs eagerly. SFT only. Measured on 2 CPU cores (SmolLM2-135M, seq 256,
    batch 8; benchmarks/README.md): 0.99-1.27x the eager default's tokens/s in three runs, after ~35-90 s of
    compiling; not yet measured on a GPU."""
    kernels: str = "auto"
    """Decoder-layer kernels (qlora_lab/cpu/kernels.py):
      "lean"  — PyTorch RMSNorm and SwiGLU computing the same values as transformers' modules but keeping less
                for backward (bf16 norm inputs instead of float32 copies; SiLU recomputed); Llama, Mistral and Qwen2
                (the families it is tested on; the plan turns it off for others and says so),
      "liger" — Liger Kernel's Triton RMSNorm, RoPE and SwiGLU (transformers' `use_liger_kernel`; needs a CUDA GPU
                and `pip install liger-kernel`); its fused loss stays off, the loss is `loss` above. Measured on
                an H200 (8B, seq 2048): -11.6 GiB and the same median step, but occasional slow steps (1.2-2.2 s
                vs 0.4 s; not profiled) that had not stopped after 15 steps; +12% tokens/s with every layer
                checkpointed,
      "none"  — the model's own modules,
      "auto"  — lean on CPU (measured: less memory, same speed) for those families; none on CUDA (lean not
                measured there yet)."""
    allocator: str = "auto"
    """The C allocator of the training process (qlora_lab/cpu/allocator.py): "mimalloc", "jemalloc", "system" (the C
    library's malloc), or "auto" = mimalloc on Linux without a GPU driver, else system. On CPU, glibc's malloc
    keeps freed activation memory fragmented: mimalloc measured -0.4 to -0.65 GiB peak RSS
    (benchmarks/results/levers-allocator-*, mimalloc-purge-*). Applied when
    `qlora-lab train` starts, from its command line (it re-executes itself once with LD_PRELOAD; auto leaves an
    allocator you preloaded yourself); train() called from Python or from a wrapper script, a value set in a
    config file, and submitit/SLURM jobs keep the process's own allocator (train logs which)."""


@dataclass
class BenchConfig:
    """What `qlora-lab bench` measures: every (seq_len, batch_size, method, recipe), each in a fresh process."""

    methods: list[str] = field(default_factory=lambda: ["qlora", "lora", "full", "prefix"])
    """Methods: "qlora" (NF4 base + LoRA), "lora" (bf16 base + LoRA), "full" (bf16, every weight), "prefix" (bf16 base
    + prefix tuning), and the preference objectives on the QLoRA base: "dpo", "kto" (TRL's trainers on the same rows
    as chosen/rejected pairs; plain = TRL's trainer with its defaults; not "orpo": its batches give the Trainer no
    tokens to count). LoRA r 16, alpha 32, dropout 0.05, all-linear, every linear layer in 4-bit: the plain recipe's
    settings, so that both recipes train the same model (our small-model rules, adapter.r=auto and
    quant.skip_modules=auto, can be measured with `overrides`)."""
    recipes: list[str] = field(default_factory=lambda: ["qlora_lab", "plain"])
    """"qlora_lab" (this tool's default recipe: `qlora-lab train`'s own builders) and "plain" (the hand-written TRL +
    peft + bitsandbytes script with library defaults, qlora_lab/bench/plain_recipe.py)."""
    seq_lens: list[int] = field(default_factory=lambda: [256])
    """Longest row in tokens (trainer.max_length); rows are drawn with lengths uniform in [seq_len/4, seq_len]."""
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    """Rows per step (per_device_train_batch_size; no gradient accumulation)."""
    steps: int = 6
    """Optimizer steps measured, after `warmup_steps` steps that are not (allocation, kernel selection, caches)."""
    warmup_steps: int = 2
    """Steps run before the measured ones and not timed."""
    profile_steps: int = 0
    """Steps profiled with torch.profiler after the measured ones (not in the timings); 0 = none. The results then
    list, per configuration, the ops with the most self time (GPU time on CUDA, CPU time otherwise)."""
    quality_rows: int = 0
    """Quality beside speed: after its steps, each configuration's model answers this many held-out demo rows (the
    demo's own held-out set, zero-shot, greedy) and its loss on their answers is taken, as `qlora-lab train` scores
    a run: json_match and eval loss columns. 0 = off. The default 6 steps teach nothing; with e.g.
    `bench.steps=50 bench.quality_rows=48` the columns compare the recipes' results at equal steps (README)."""
    overrides: list[str] = field(default_factory=list)
    """Extra `qlora-lab train` overrides for the qlora_lab recipe: the levers, e.g. ["loss=native"]."""
    variants: dict[str, list[str]] = field(default_factory=dict)
    """More qlora_lab recipes to measure in the same run, name -> overrides (on top of `overrides`), e.g.
    {shuffled: [batching=shuffled], torch_dropout: [adapter.dropout_impl=torch]}; each is the recipe
    "qlora_lab:<name>" in the results."""
    results_dir: str = "benchmarks/results"
    """Where results go: <results_dir>/<name>.{json,md,png}; name null = <machine>-<date>."""
    name: Optional[str] = None
    """Results file name (without suffix); null = <machine>-<date>."""
    peak_tflops: Optional[float] = None
    """Peak bf16 FLOP/s for MFU, in TFLOP/s; null = 989 on H100/H200, else a matmul measured at start."""
    timeout_s: int = 1800
    """Seconds before a configuration's process is stopped (recorded as failed)."""
    memory_budget_gb: Optional[float] = None
    """Both recipes inside this budget, in GiB, as on a card of this size: on CUDA each configuration's process is
    capped (torch.cuda.set_per_process_memory_fraction; past it the step fails with out-of-memory, as it would on
    the smaller card) and qlora_lab's plan is given memory_budget_gb=<this> to pick what fits; on CPU each row
    records whether its training memory (peak RSS above the imports) stayed inside ("within_budget"). null = none."""
    max_seq: bool = False
    """Instead of the matrix: for every (method, batch size, recipe), the longest sequence whose training step fits
    (on CUDA: the card, or memory_budget_gb; on CPU memory_budget_gb is required). Probes rows of exactly that many
    tokens, from seq_lens[0] doubling while it fits (up to max_seq_limit) or halving while it does not, then
    bisecting to max_seq_step tokens; each probe is
    one step in a fresh process. Writes <name>.{json,md} with every probe."""
    max_seq_limit: int = 131072
    """The longest sequence bench.max_seq probes."""
    max_seq_step: int = 1024
    """bench.max_seq's resolution in tokens: the bisection stops when the fitting and the failing length are at most
    this far apart (probes are multiples of it)."""


@dataclass
class BenchRunConfig:
    """Primary config of `qlora-lab bench` (conf/bench.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass
class MergeRunConfig:
    """Primary config of `qlora-lab merge` (conf/merge.yaml)."""

    run: str = MISSING
    """The run directory of a completed `qlora-lab train` (holds config.yaml, adapter/, metrics.json)."""
    out: Optional[str] = None
    """Where to write the merged model; null = <run>/merged. Written to a temp folder and renamed when complete."""
    base: str = "auto"
    """Base weights the adapter is merged into: "original" (the checkpoint's own weights), "nf4_roundtrip" (the
    base quantized and dequantized exactly as in training — what the adapter actually saw), or "auto"
    (4-bit runs: both, scored on the run's held-out rows, the better kept — see ``score``; original otherwise).
    "original" is refused for adapter.init=loftq runs: their adapter already holds the original − 4-bit difference."""
    score: bool = True
    """base=auto on a 4-bit run with a held-out task metric: merge into both bases, score each merged model on the
    run's held-out rows (task score, eval loss) and keep the better (ties: the one closest to the trained model);
    both are recorded in merge_info.json. false = no scoring: nf4_roundtrip, the weights the adapter trained
    against."""
    score_samples: Optional[int] = None
    """Held-out rows to score each base on; null = the run's own data.task_eval_samples."""
    dtype: str = "bfloat16"
    """dtype of the saved weights: "bfloat16", "float16" or "float32". The merge itself runs in float32."""
    check_prompts: int = 4
    """Held-out prompts for the after-merge check (merged vs base-in-training-precision + adapter)."""


@dataclass
class ChatRunConfig:
    """Primary config of `qlora-lab chat` (conf/chat.yaml)."""

    run: str = MISSING
    """A run directory (adapter on its base, in the training quantization) or a merged model folder."""
    prompt: Optional[str] = None
    """One prompt to answer and exit; null = interactive (empty line or Ctrl-D quits)."""
    system_prompt: Optional[str] = None
    """Optional system message."""
    max_new_tokens: int = 256
    """Longest answer, in tokens."""
    do_sample: bool = False
    """false = greedy decoding (deterministic); true = sample with temperature / top_p / top_k."""
    temperature: float = 0.7
    """Sampling temperature (do_sample=true)."""
    top_p: float = 0.9
    """Nucleus sampling: the smallest set of tokens whose probabilities add up to top_p (do_sample=true)."""
    top_k: int = 50
    """Sample among the k most likely tokens (do_sample=true)."""
    seed: int = 0
    """Seed for sampling."""
    stream: bool = True
    """Print tokens as they are generated."""

    prompt_file: Optional[str] = None
    """A file of prompts answered one after another: one prompt per line, or a .jsonl file with one JSON value a line
    (a list of chat messages, {"messages": [...]}, or {"prompt": ..., "completion": ...}; a conversation's final
    assistant message is kept as the reference, not sent). "-" reads standard input. Without prompt and prompt_file,
    a prompt piped into standard input (echo ... | qlora-lab chat run=R) is answered once; a terminal gets the
    interactive chat."""
    answers: Optional[str] = None
    """Where prompt_file's answers go, as JSONL (each input line with its "answer"): null = next to prompt_file as
    <name>.answers.jsonl (standard output for prompt_file=-); "-" = standard output."""


@dataclass
class HubConfig:
    """Where `qlora-lab export format=hub` uploads (the token comes from $HF_TOKEN only)."""

    repo: Optional[str] = None
    """The repository, user/name or org/name; created when missing."""
    private: bool = False
    """Create the repository private."""
    include: list[str] = field(default_factory=lambda: ["adapter"])
    """What to upload: "adapter" (the adapter folder, at the top), "merged" (the merged model, in merged/), "gguf"
    (the .gguf files of an earlier `export format=gguf`, in gguf/)."""


@dataclass
class ExportRunConfig:
    """Primary config of `qlora-lab export` (conf/export.yaml)."""

    run: Optional[str] = None
    """A completed run directory (its adapter is merged first, as `qlora-lab merge` does; an earlier <run>/merged with
    the same base is reused) — or `merged`, a merged model folder. Exactly one of the two."""
    merged: Optional[str] = None
    """A merged model folder (a `qlora-lab merge` output) to export instead of a run."""
    format: str = "gguf"
    """"gguf" (llama.cpp / LM Studio), "ollama" (GGUF + Modelfile) or "hub" (upload to the Hugging Face Hub)."""
    types: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    """GGUF types to write: "f16", "bf16", "q8_0", "f32"."""
    out: Optional[str] = None
    """Output folder; null = <run>/export (or export/ next to the merged folder)."""
    name: Optional[str] = None
    """File name stem (<name>-<type>.gguf); null = the run folder's name."""
    base: str = "auto"
    """Merge base when a run is merged first: "auto", "original" or "nf4_roundtrip" (see MergeRunConfig.base)."""
    check_prompts: int = 8
    """Held-out prompts of the run on which each GGUF read back is compared with the merged model."""
    max_new_tokens: int = 32
    """Tokens of each greedy answer compared side by side."""
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


def field_help(schema: type, name: str) -> str:
    """The docstring of ``schema``'s field ``name`` (the string under it in this file), or TRL's help for a trainer
    field; empty if none."""
    if schema is TrainerConfig:
        from qlora_lab.sftconfig import trainer_field_help

        return trainer_field_help(name)
    return _field_docs(schema).get(name, "")


@functools.cache
def _field_docs(schema: type) -> dict[str, str]:
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    except (OSError, TypeError):  # made with make_dataclass (PrepareRunConfig): its fields' docs are TrainRunConfig's
        return {} if schema is not PrepareRunConfig else _field_docs(TrainRunConfig)
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs

