"""The run's plan: every ``auto`` of a validated config decided once, for this machine, and recorded.

:func:`make` turns the config, the :class:`Machine` (device, bf16 support, CUDA/ROCm, world size, GPU memory), the
model's config and the prepared data's shape into a frozen :class:`Plan`: dtypes, mixed precision, attention, loss
path, kernels, dropout, allocator, batching, the checkpointing policy with the memory estimate that chose it, and
the task metric. Everything downstream (models, the trainer, the bench's worker) reads the plan, never ``auto``.

The plan is logged once as a short table and written to ``<run>/plan.json`` beside ``config.yaml``. A resume
compares the new plan with the recorded one: a change of the fields that set the numerics (:data:`NUMERIC`) is
refused with the fields that differ, unless ``resume.allow_plan_change=true``. ``merge`` and ``chat`` rebuild the
base with the recorded dtypes (:func:`recorded_dtypes`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qlora_lab.cpu import allocator
from qlora_lab.errors import UserError
from qlora_lab.models import resolve_rank, resolve_skip_modules
from qlora_lab.sftconfig import resolve_keep

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"

# Liger Kernel's layer kernels, set through transformers' own switch (TrainingArguments.use_liger_kernel); the fused
# linear cross-entropy stays off: the loss is qlora_lab's (`loss=`), and TRL 1.16 refuses Liger's fused loss.
LIGER_KERNEL_CONFIG = {"rope": True, "rms_norm": True, "swiglu": True,
                       "cross_entropy": False, "fused_linear_cross_entropy": False}


# --------------------------------------------------------------------------------------------------------------
# the machine


@dataclass(frozen=True)
class Machine:
    """What the plan depends on in the machine."""

    device: str
    """"cuda" (NVIDIA or ROCm: torch's cuda device either way) or "cpu"."""
    accelerator: str
    """"cuda", "rocm" or "cpu"."""
    bf16: bool
    """Whether bf16 math is native here (CUDA: compute capability >= 8; CPU: AVX512-BF16 or AMX)."""
    world_size: int
    """Processes training together (torchrun / accelerate); 1 for one process."""
    gpu_name: str | None = None
    """This process's GPU."""
    gpu_memory_gb: float | None = None
    """Its total memory in GiB."""
    cpu_count: int = 1
    """CPU cores."""

    @classmethod
    def detect(cls) -> Machine:
        import torch

        from qlora_lab.distributed import world_size
        from qlora_lab.models import bf16_supported

        gpu = torch.cuda.is_available()
        name = memory = None
        if gpu:
            props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
            name, memory = props.name, round(props.total_memory / 2**30, 1)
        accelerator = ("rocm" if getattr(torch.version, "hip", None) else "cuda") if gpu else "cpu"
        return cls(device="cuda" if gpu else "cpu", accelerator=accelerator, bf16=bf16_supported(),
                   world_size=world_size(), gpu_name=name, gpu_memory_gb=memory, cpu_count=os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Plan:
    """Every decision a run makes from its config and machine; each field says which config key it resolves."""

    machine: Machine
    model_type: str
    """The model's architecture (config.json model_type)."""
    model_dtype: str
    """model.dtype: the dtype of the weights that are not quantized."""
    compute_dtype: str | None
    """quant.compute_dtype: the dtype 4-bit matmuls run in (None without 4-bit quantization)."""
    quant_storage: str | None
    """quant.quant_storage: the 4-bit storage dtype (None: uint8)."""
    skip_modules: tuple[str, ...]
    """quant.skip_modules: linear layers kept unquantized besides the LM head ("auto": models.SMALL_MODEL_16BIT for
    a 4-bit model under 1B parameters, else none); empty without quantization."""
    lora_r: int | None
    """adapter.r: the LoRA rank ("auto": models.SMALL_MODEL_RANK under 1B parameters, else models.RANK); None for
    adapters without a rank."""
    lora_alpha: float | None
    """adapter.alpha ("auto": 2 x lora_r); None for adapters without a rank."""
    mixed_precision: str
    """trainer.bf16 / trainer.fp16: "bf16", "fp16" or "no"."""
    attn_implementation: str | None
    """model.attn_implementation (None: transformers' default)."""
    loss: str
    """loss: "selective", "native" or "fused"; the objective ("dpo", "orpo", "kto") for TRL's preference trainers."""
    kernels: str
    """kernels: "lean", "liger" or "none"."""
    compile: str
    """compile: "layers" (each decoder layer torch.compile'd) or "none"."""
    dropout_impl: str
    """adapter.dropout_impl: "torch", "fast" or "recompute" ("torch" where the adapter has no LoRA dropout)."""
    allocator: str
    """allocator: the one this run asks for ("mimalloc", "jemalloc" or "system")."""
    batching: str
    """batching: "grouped", "shuffled" or "padding_free"."""
    pad_to_multiple_of: int | None
    """trainer.pad_to_multiple_of: TRL's "auto" pads to 128 on AWS Neuron only, so None on the devices here."""
    memory_budget_gb: float | None
    """memory_budget_gb: the step's budget in GiB (None: no budget)."""
    checkpoint_every: int
    """Activation checkpointing: 0 off, 1 every decoder layer, n every n-th (the largest n under the budget)."""
    checkpointing_by: str
    """Who set the checkpointing: "trainer" (trainer.activation_checkpointing), "budget" or "none"."""
    offload_activations: bool
    """offload_activations: saved activations offloaded to host memory (TRL's activation offloading; CUDA only)."""
    estimated_gb: float | None
    """The memory estimate of a step with this checkpointing, in GiB (None where it cannot be computed)."""
    estimated_unchecked_gb: float | None
    """The same without checkpointing."""
    task_metric: str
    """data.task_metric: "json_match", "exact_match" or "none"."""
    data_format: str
    """data.format: each source's detected row format ("+"-joined for a mixture)."""
    keep: str = "last"
    """keep: which weights become the adapter, "best" (the best evaluated checkpoint) or "last"."""
    notes: tuple[str, ...] = field(default=())
    """Why a lever is off, or what was chosen instead of what was asked."""

    def resolved(self) -> dict[str, Any]:
        """config key -> its value in this plan (what each ``auto`` became)."""
        return {"model.dtype": self.model_dtype, "model.attn_implementation": self.attn_implementation,
                "quant.compute_dtype": self.compute_dtype, "quant.quant_storage": self.quant_storage,
                "quant.skip_modules": list(self.skip_modules), "adapter.r": self.lora_r,
                "adapter.alpha": self.lora_alpha,
                "trainer.bf16": self.mixed_precision == "bf16", "trainer.fp16": self.mixed_precision == "fp16",
                "loss": self.loss, "kernels": self.kernels, "compile": self.compile,
                "adapter.dropout_impl": self.dropout_impl,
                "allocator": self.allocator, "batching": self.batching,
                "trainer.pad_to_multiple_of": self.pad_to_multiple_of, "memory_budget_gb": self.memory_budget_gb,
                "offload_activations": self.offload_activations,
                "data.task_metric": self.task_metric, "data.format": self.data_format, "keep": self.keep}

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "resolved": self.resolved()}


# What sets a run's numbers: a resume that would change one of these trains on with other numerics.
NUMERIC = ("machine.device", "machine.world_size", "model_dtype", "compute_dtype", "quant_storage", "skip_modules",
           "lora_r", "lora_alpha",
           "mixed_precision",
           "attn_implementation", "loss", "kernels", "dropout_impl")


def make(cfg: DictConfig, machine: Machine, model_config, shape: tuple[int, float] | None = None,
         data_stats: dict[str, Any] | None = None, task_rows: int = 0) -> Plan:
    """The plan of a validated train config on ``machine``. ``shape``: (padded batch length, labelled share of
    tokens) of the prepared training rows (estimate.data_shape), for the memory estimate; ``data_stats``: the
    prepared data's stats (the detected formats); ``task_rows``: held-out rows with a prompt and answer to score."""
    notes: list[str] = []
    dtype = _dtype(cfg.model.dtype, machine)
    four_bit = cfg.quant.method in ("nf4", "fp4")
    compute = _dtype(cfg.quant.compute_dtype, machine) if four_bit else None
    storage = _dtype(cfg.quant.quant_storage, machine) if four_bit and cfg.quant.quant_storage else None
    model_type = getattr(model_config, "model_type", "unknown")
    counts = _counts(model_config)
    total = counts["total"] if counts else None
    skip = _skip_modules(cfg.quant, total)
    smallest = min((min(shape) for shape in counts["linear_shapes"]), default=None) if counts else None
    r, alpha = resolve_rank(cfg.adapter, total, smallest) if cfg.adapter.method == "lora" else (None, None)
    if cfg.get("init_from"):  # a preference run continues a trained adapter: its rank, not the config's
        r, alpha = _continued_rank(Path(cfg.init_from) / "adapter" / "adapter_config.json", r, alpha)
    objective = cfg.objective.name
    if objective == "sft":
        loss = _loss(cfg, model_config, notes)
        kernels = _kernels(cfg.kernels, model_config, machine, notes)
        dropout = _dropout(cfg.adapter, machine, cfg.get("compile", "none"), notes)
    else:  # TRL's preference trainers compute their own loss, without SFTTrainer's levers (objectives.py)
        loss, kernels, dropout = objective, "none", "torch"
        notes.append(f"objective={objective}: TRL's {objective.upper()} loss; the SFT levers (loss path, lean "
                     "kernels, fast dropout, length grouping) do not apply")
    every, by, offload, est, unchecked, budget = _checkpointing(cfg, machine, model_config, shape, loss, kernels,
                                                                dropout, skip, r or 0, counts, notes)
    if offload and dropout == "recompute":
        # recompute's saved-tensor hooks would sit inside the offloader's and take every saved tensor from it
        notes.append("adapter.dropout_impl=recompute: fast instead — offloaded activations need no recomputed copies")
        dropout = "fast"
    return Plan(
        machine=machine, model_type=model_type, model_dtype=dtype, compute_dtype=compute, quant_storage=storage,
        skip_modules=tuple(skip), lora_r=r, lora_alpha=alpha,
        mixed_precision=_mixed_precision(cfg.trainer, machine), attn_implementation=cfg.model.attn_implementation,
        loss=loss, kernels=kernels, compile=_compile(cfg.get("compile", "none"), objective, notes),
        dropout_impl=dropout, allocator=allocator.resolve(cfg.allocator),
        batching=cfg.batching if objective == "sft" else "shuffled",
        pad_to_multiple_of=_pad_multiple(cfg.trainer.get("pad_to_multiple_of")),
        memory_budget_gb=budget, checkpoint_every=every, checkpointing_by=by, offload_activations=offload,
        estimated_gb=_round(est), estimated_unchecked_gb=_round(unchecked), task_metric=_task_metric(cfg.data, task_rows),
        data_format=_data_format(data_stats), keep=resolve_keep(cfg.keep, cfg.trainer),
        notes=tuple(notes))


def _counts(model_config) -> dict[str, Any] | None:
    """estimate.count_params of the model, or None for an architecture whose empty copy cannot be built (its size
    is then unknown: the size rules take their large-model side, and there is no memory estimate)."""
    from qlora_lab.estimate import count_params

    try:
        return count_params(model_config)
    except Exception as e:  # noqa: BLE001  -- an estimate or a size rule never stops a run
        log.warning("the model's size is unknown (%s): quant.skip_modules=auto and adapter.r=auto take their "
                    "large-model values, and there is no memory estimate", e)
        return None


def _continued_rank(path: Path, r, alpha) -> tuple[int | None, float | None]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return r, alpha  # objectives.py reports a missing or unreadable adapter when it loads it
    return saved.get("r"), saved.get("lora_alpha")


def _skip_modules(quant_cfg: DictConfig, total: int | None) -> list[str]:
    # total None (size unknown): "auto" keeps nothing in 16-bit, a list is that list (resolve_skip_modules)
    return [] if quant_cfg.method == "none" else resolve_skip_modules(quant_cfg, total_params=total)


def _round(gib: float | None) -> float | None:
    return None if gib is None else round(gib, 4)


def _dtype(name: str, machine: Machine) -> str:
    if name == "auto":
        return "bfloat16" if machine.bf16 else "float32"
    return name


def _pad_multiple(value: Any) -> int | None:
    if value in (None, "auto") or str(value).lower() in ("none", "null"):
        return None
    return int(value)


def _mixed_precision(t: DictConfig, machine: Machine) -> str:
    if t.fp16:
        return "fp16"
    if t.bf16 is None:
        return "bf16" if machine.bf16 else "no"
    return "bf16" if t.bf16 else "no"


def needs_trl_loss(trainer_cfg, model_config) -> str | None:
    """Why only TRL's own compute_loss (loss "fused") computes the configured loss, or None.

    TRL 1.16's SFTTrainer.compute_loss applies ``loss_type`` (e.g. "dft"), label smoothing and an MoE model's router
    auxiliary loss; the selective and native paths compute plain cross-entropy.
    """
    if trainer_cfg.get("loss_type", "nll") != "nll":
        return f"trainer.loss_type={trainer_cfg.loss_type}"
    if trainer_cfg.get("label_smoothing_factor", 0):
        return f"trainer.label_smoothing_factor={trainer_cfg.label_smoothing_factor}"
    if hasattr(model_config, "output_router_logits"):
        return "the model's router auxiliary loss (mixture of experts)"
    return None


def selective_loss_supported(model_config, adapter_method: str) -> str | None:
    """None if ``loss=selective`` computes exactly what the model's own loss does, else the reason it does not."""
    if adapter_method in ("prompt", "ptuning"):
        return "prompt/p-tuning prepend virtual tokens to the sequence, so positions do not line up with labels"
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(model_config, attr, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({attr}); its own loss path is used"
    return None


def _loss(cfg: DictConfig, model_config, notes: list[str]) -> str:
    """The loss path for ``cfg.loss`` on this model (see TrainRunConfig.loss)."""
    trl_only = needs_trl_loss(cfg.trainer, model_config)
    if trl_only and cfg.loss != "fused":
        if cfg.loss != "auto":
            notes.append(f"loss={cfg.loss} does not compute {trl_only}: TRL's loss (fused) instead")
        return "fused"
    if cfg.loss in ("auto", "selective"):
        from qlora_lab.distributed import zero_stage

        why_not = selective_loss_supported(model_config, cfg.adapter.method)
        if why_not is None and zero_stage(cfg.trainer) == 3:
            # measured on 2 CPU ranks: the output layer's weight is an empty ZeRO-3 partition (shape (0,)) outside its
            # own forward, where the selective loss reads it (ZeroDivisionError in chunked_lm_loss). FSDP2 keeps it
            # whole: accelerate shards the final norm and the output layer with reshard_after_forward=False
            # (accelerate/utils/fsdp_utils.py, fsdp2_prepare_model).
            why_not = "DeepSpeed ZeRO-3 gathers the output layer's weight only inside its own forward"
        if why_not is None:
            return "selective"
        notes.append(f"loss: native, not selective ({why_not})")
        return "native"
    return cfg.loss


def liger_unavailable(model_config=None) -> str | None:
    """Why Liger's kernels cannot run here (None when they can): no CUDA, not installed, or no kernels for the model
    type. Not imported unless CUDA is there: liger-kernel imports Triton."""
    import torch

    if not torch.cuda.is_available():
        return "Liger's kernels are Triton kernels for CUDA GPUs and this machine has none"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if model_config is not None:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        if model_config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            return f"Liger has no kernels for model type {model_config.model_type!r}"
    return None


def _kernels(kernels: str, model_config, machine: Machine, notes: list[str]) -> str:
    """kernels=auto: lean on CPU (measured: less memory at the same speed) for the families they are tested on; none
    on CUDA (lean is not measured there; Liger had slow steps, see benchmarks/README.md)."""
    from qlora_lab.cpu.kernels import lean_unsupported

    if kernels == "liger":
        why_not = liger_unavailable(model_config)
        if why_not:
            raise UserError(f"kernels=liger: {why_not}.\nFix: use kernels=auto or kernels=none.")
        return "liger"
    if kernels == "auto" and machine.device != "cpu":
        return "none"
    if kernels in ("auto", "lean"):
        why_not = lean_unsupported(getattr(model_config, "model_type", "unknown"))
        if why_not:
            notes.append(f"kernels: none, not lean ({why_not})")
            return "none"
        return "lean"
    return kernels


def _compile(asked: str, objective: str, notes: list[str]) -> str:
    if asked != "none" and objective != "sft":
        notes.append(f"compile={asked}: off — TRL's {objective.upper()} trainer is not compiled here (SFT only)")
        return "none"
    return asked


def _dropout(adapter: DictConfig, machine: Machine, compile_: str = "none", notes: list[str] | None = None) -> str:
    """adapter.dropout_impl=auto: recompute on CPU (dropout's random draws were ~28% of a QLoRA step there), torch on
    CUDA (its fused dropout is cheap). Under compile=layers FastDropout's seeded generator breaks the compiled graph
    at every LoRA dropout (64 graph breaks in 3 tiny-model steps, none with torch's), and CPU keeps it all the same:
    measured there, the broken graph with FastDropout trained at 303.8 tokens/s and the whole graph with torch's
    dropout at 154.4 (benchmarks/README.md). Only LoRA with dropout > 0 has dropout modules to swap."""
    if adapter.method != "lora" or adapter.dropout == 0:
        return "torch"
    impl = adapter.get("dropout_impl", "torch")
    if impl == "auto":
        impl = "recompute" if machine.device == "cpu" else "torch"
    if compile_ == "layers" and impl in ("fast", "recompute") and notes is not None:
        notes.append(f"compile=layers with adapter.dropout_impl={impl}: each LoRA dropout breaks the compiled graph "
                     "(measured faster on CPU than torch's dropout compiled whole)")
    return impl


def _checkpointing(cfg, machine: Machine, model_config, shape, loss: str, kernels: str, dropout: str,
                   skip: list[str], r: int, counts: dict[str, Any] | None,
                   notes: list[str]) -> tuple[int, str, bool, float | None, float | None, float | None]:
    """(every n-th layer checkpointed (0 = none), set by, offload, estimate GiB, estimate without checkpointing GiB,
    budget). The fastest plan whose estimated step fits memory_budget_gb ("auto": 90% of the GPU; none on CPU, where
    RAM is the limit and speed matters more): no checkpointing, else every n-th decoder layer with the largest n,
    else every layer, else (offload_activations=auto, CUDA) every layer with the activations offloaded to the host."""
    from qlora_lab import estimate
    from qlora_lab.sftconfig import TrainerConfig

    t = cfg.trainer
    budget = cfg.memory_budget_gb
    if budget == "auto":
        budget = round(0.9 * machine.gpu_memory_gb, 1) if machine.gpu_memory_gb else None
    budget = None if budget is None else float(budget)
    asked_offload = cfg.get("offload_activations", "auto")
    can_offload = machine.device == "cuda"
    if asked_offload is True and not can_offload:
        notes.append("offload_activations=true: off — on CPU the activations are in host memory already")
    offload = asked_offload is True and can_offload
    seq_len, labelled = shape or (t.max_length or 1024, 1.0)
    kwargs = dict(quant=cfg.quant.method, double_quant=cfg.quant.double_quant, adapter=cfg.adapter.method,
                  r=r, dropout=cfg.adapter.dropout, dropout_impl=dropout, kernels=kernels,
                  batch=t.per_device_train_batch_size, seq_len=seq_len, loss=loss, loss_tokens=labelled,
                  model_bytes=4 if _dtype(cfg.model.dtype, machine) == "float32" else 2, skip_modules=tuple(skip))

    def gib(share: float, offloaded: bool = offload) -> float | None:
        """The estimate in GiB with ``share`` of the layers checkpointed; None where it cannot be computed (an
        estimate never stops a run: e.g. an architecture without the Llama-style sizes it reads)."""
        if counts is None:
            return None
        try:
            est = estimate.estimate(model_config, **kwargs, checkpointing=share, counts=counts, offload=offloaded)
        except Exception:  # noqa: BLE001
            return None
        return est["total_bytes"] / 2**30

    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    unchecked = gib(0.0, False)
    if t.get("activation_checkpointing") or t.get("gradient_checkpointing"):
        return 1, "trainer", offload, gib(1.0), unchecked, budget
    as_asked = gib(0.0)  # offload_activations=true already moves the activations off the device
    if budget is None or as_asked is None or as_asked <= budget or layers == 0:
        return 0, "none", offload, as_asked, unchecked, budget
    if cfg.adapter.method == "prefix":  # peft's prefix tuning breaks under activation checkpointing
        notes.append(f"memory_budget_gb={budget}: estimated {unchecked:.2f} GiB, but adapter=prefix cannot use "
                     "activation checkpointing")
        return 0, "none", offload, gib(0.0), unchecked, budget
    if "activation_checkpointing_kwargs" not in {f.name for f in dataclasses.fields(TrainerConfig)}:
        notes.append("memory_budget_gb: this transformers version checkpoints all layers or none; all layers")
        return 1, "budget", offload, gib(1.0), unchecked, budget
    for n in range(layers, 1, -1):
        est = gib(len(range(0, layers, n)) / layers)
        if est is not None and est <= budget:
            return n, "budget", offload, est, unchecked, budget
    every = gib(1.0)
    # auto offloads SFT only: the preference trainers (objectives.py) do not take the budget's checkpointing either
    if every is not None and every > budget and asked_offload == "auto" and can_offload and cfg.objective.name == "sft":
        offloaded = gib(1.0, True)
        notes.append(f"memory_budget_gb={budget}: every layer checkpointed is still {every:.2f} GiB; activations "
                     f"offloaded to host memory ({offloaded:.2f} GiB)")
        return 1, "budget", True, offloaded, unchecked, budget
    return 1, "budget", offload, every, unchecked, budget


def _task_metric(data_cfg: DictConfig, task_rows: int) -> str:
    metric = data_cfg.task_metric
    if metric == "none" or data_cfg.task_eval_samples == 0 or task_rows == 0:
        return "none"  # plain-text data has no prompt/answer pairs to score
    if metric == "auto":
        return "json_match" if data_cfg.source == "demo" else "exact_match"
    return metric


def _data_format(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "not prepared"
    formats = [s.get("format") for s in stats.get("sources") or [] if s.get("format")]
    if formats:
        return "+".join(formats)
    return "detected while streaming" if stats.get("streaming") else "unknown"


# --------------------------------------------------------------------------------------------------------------
# showing, recording, comparing


def describe(plan: Plan) -> str:
    """The plan as a short table, for the log."""
    m = plan.machine
    where = m.gpu_name or f"{m.cpu_count} CPU cores"
    check = {0: "off", 1: "every layer"}.get(plan.checkpoint_every, f"every {plan.checkpoint_every}th layer")
    est = f"{plan.estimated_gb:.2f} GiB" if plan.estimated_gb is not None else "n/a"
    if plan.memory_budget_gb is not None:
        est += f" (budget {plan.memory_budget_gb:g} GiB)"
    capacity, where_mem = (m.gpu_memory_gb, m.gpu_name) if m.gpu_memory_gb else (_ram_gb(), "RAM")
    if plan.estimated_gb is not None and capacity:  # "will it fit?", before any weight is loaded
        fits = "fits" if plan.estimated_gb < 0.9 * capacity else "WILL NOT FIT"
        est += f", {fits} in {capacity:.1f} GiB of {where_mem}"
    rows = [("machine", f"{m.accelerator}, {where}, bf16 {'yes' if m.bf16 else 'no'}, {m.world_size} process(es)"),
            ("dtypes", f"weights {plan.model_dtype}, 4-bit compute {plan.compute_dtype or '-'}, "
                       f"mixed precision {plan.mixed_precision}"),
            ("attention", str(plan.attn_implementation or "transformers' default")),
            ("LoRA rank / not quantized", f"{f'r={plan.lora_r}, alpha={plan.lora_alpha:g}' if plan.lora_r else '-'} "
                                         f"/ {', '.join(plan.skip_modules) or '-'}"),
            ("loss / kernels / dropout", f"{plan.loss} / {plan.kernels}"
                                         f"{' (decoder layers compiled)' if plan.compile == 'layers' else ''} / "
                                         f"{plan.dropout_impl}"),
            ("batching / allocator", f"{plan.batching} / {plan.allocator}"),
            ("checkpointing", f"{check} (by {plan.checkpointing_by}){', activations offloaded to host' if plan.offload_activations else ''}; "
                              f"step estimate {est}"),
            ("data / task metric", f"{plan.data_format} / {plan.task_metric}"),
            ("adapter kept", plan.keep)]
    width = max(len(k) for k, _ in rows)
    lines = ["Plan:"] + [f"  {k:<{width}}  {v}" for k, v in rows] + [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def numeric_differences(recorded: dict[str, Any], plan: Plan) -> list[str]:
    """The NUMERIC fields of a recorded plan (plan.json) that ``plan`` changes, as "field: before -> now" lines."""
    def as_json(tree: Any) -> dict[str, Any]:  # tuples as JSON lists on both sides
        return _flat(json.loads(json.dumps(tree)))

    before, now = as_json(recorded), as_json(dataclasses.asdict(plan))
    return [f"{key}: {before.get(key)!r} when the run started, {now.get(key)!r} now"
            for key in NUMERIC if key in before and before.get(key) != now.get(key)]


def read(run_dir: Path) -> dict[str, Any] | None:
    """The plan.json of a run, or None (runs made before plans existed)."""
    path = Path(run_dir) / PLAN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}). Fix: restore it, or delete it to rebuild the run with this "
                        "machine's defaults.") from None


def recorded_skip_modules(run_dir: Path) -> list[str] | None:
    """The 16-bit layers a run's 4-bit base kept (plan.json), or None where the plan does not say (older runs: their
    config's list, resolved by models.build_model)."""
    recorded = read(run_dir)
    skip = (recorded or {}).get("skip_modules")
    return None if skip is None else list(skip)


def recorded_dtypes(run_dir: Path, cfg: DictConfig) -> tuple[str, str | None]:
    """(model dtype, 4-bit compute dtype) a run trained with: from its plan.json, else (older runs) its config
    resolved on this machine."""
    recorded = read(run_dir)
    if recorded:
        return recorded["model_dtype"], recorded.get("compute_dtype")
    from qlora_lab.models import bf16_supported

    here = "bfloat16" if bf16_supported() else "float32"
    dtype = here if cfg.model.dtype == "auto" else cfg.model.dtype
    compute = here if cfg.quant.get("compute_dtype", "auto") == "auto" else cfg.quant.compute_dtype
    return dtype, compute if cfg.quant.method in ("nf4", "fp4") else None
