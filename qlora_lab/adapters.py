"""PEFT adapters: the ``peft`` config for the ``adapter`` group, initialisations that need the built model, and
the check that only adapter weights train."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from qlora_lab.cpu.dropout import use_dropout_impl
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

# substrings of parameter names that belong to each kind of adapter
ADAPTER_PARAM_KEYS = ("lora_", "ia3_", "prompt_encoder", "modules_to_save")


def build_peft_config(cfg: DictConfig, tokenizer_path: str | None = None, rank: tuple[int, float] | None = None):
    """The peft config for ``cfg`` (the ``adapter`` group), or None for method=full. SFTTrainer applies it.

    ``tokenizer_path``: where peft loads the tokenizer to embed ``prompt_init_text`` (prompt tuning); ``rank``: the
    plan's (r, alpha) (None: the config's, "auto" taken for a model of unknown size: models.resolve_rank)."""
    import peft
    from peft import TaskType

    from qlora_lab.models import resolve_rank

    task = TaskType.CAUSAL_LM
    save = list(cfg.modules_to_save) or None
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    if cfg.method == "full":
        return None
    if cfg.method == "lora":
        init = cfg.init
        r, alpha = rank or resolve_rank(cfg)
        return peft.LoraConfig(
            task_type=task, r=r, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=targets,
            bias=cfg.bias, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, modules_to_save=save,
            # LoftQ is applied after quantized loading (see apply_post_init); peft's own init="loftq" path needs an
            # unquantized model and overwrites its base weights.
            init_lora_weights=True if init in ("default", "loftq") else init,
        )
    if cfg.method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                       prefix_projection=cfg.prefix_projection, modules_to_save=save)
    if cfg.method == "prompt":
        text = cfg.prompt_init_text
        return peft.PromptTuningConfig(
            task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, modules_to_save=save,
            prompt_tuning_init=peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer_path if text else None,
        )
    if cfg.method == "ptuning":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                        encoder_hidden_size=cfg.encoder_hidden_size, modules_to_save=save)
    if cfg.method == "ia3":
        ff = cfg.feedforward_modules
        return peft.IA3Config(task_type=task, target_modules=targets, modules_to_save=save,
                              feedforward_modules=None if ff is None else (ff if isinstance(ff, str) else list(ff)))
    raise UserError(f"adapter.method={cfg.method!r} is not supported.")


def rewrites_base(cfg: DictConfig) -> bool:
    """PiSSA and OLoRA move part of the base weights into the adapter at init (the base is then a residual)."""
    return cfg.method == "lora" and (cfg.init.startswith("pissa") or cfg.init == "olora")


def apply_post_init(cfg: DictConfig, model, model_path: str, dropout_impl: str = "torch") -> None:
    """What needs the wrapped, quantized model: the dropout implementation (the plan's), IA3's output dtype on a
    quantized base, and LoftQ via peft's replace_lora_weights_loftq."""
    if cfg.method == "lora":
        use_dropout_impl(model, dropout_impl)
    fix_bnb_adapter_layers(model)
    if not (cfg.method == "lora" and cfg.init == "loftq"):
        return
    log.info("LoftQ: initialising LoRA from the 4-bit quantization error of every adapted layer")
    stats = loftq_init(model, model_path)
    log.info("LoftQ: %d 4-bit layers; base + adapter is %.1f%% closer to the full-precision weights than the 4-bit "
             "base alone (Frobenius norm of the error, summed over layers: %.3g -> %.3g)", stats["layers"],
             100 * (1 - stats["error_after"] / stats["error_before"]), stats["error_before"], stats["error_after"])


def _full_precision_weights(model_path: str):
    """(tensor name -> its file, a function reading one tensor) for the base's safetensors: one file, or shards with
    their index. Each read opens the file again (safetensors maps it; measured: the whole LoftQ init of the 135M demo
    model, 210 layers with their SVDs, took 11 s)."""
    import json

    from safetensors import safe_open

    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt", device="cpu") as f:
            files = dict.fromkeys(f.keys(), folder / "model.safetensors")
    else:
        raise UserError(f"adapter.init=loftq needs the base's full-precision weights as safetensors; {folder} has "
                        "neither model.safetensors nor model.safetensors.index.json (use adapter.init=default).")

    def get(name: str) -> torch.Tensor:
        with safe_open(files[name], framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    return files, get


@torch.no_grad()
def loftq_init(model, model_path: str, adapter_name: str = "default") -> dict:
    """LoftQ's first step (Li et al. 2023) on every 4-bit LoRA layer: with R = W - dequant(Q(W)), the residual of the
    full-precision weight W and its 4-bit copy, set the factors to R's best rank-r approximation (truncated SVD,
    Eckart-Young) so that dequant(Q(W)) + scaling * B @ A is as close to W as rank r allows.

    Not peft's replace_lora_weights_loftq, for two reasons: it moves the SVD to "cuda"/"xpu" unconditionally
    (peft 0.21.2 utils/loftq_utils.py, _loftq_init_new), so it cannot run on CPU; and it writes B @ A = R_r without
    dividing by LoRA's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA; peft issue #1982), so with the default
    alpha = 2r the layer starts at W_q + 2 R_r, whose error equals the plain 4-bit base's. Here the factors are
    divided by sqrt(scaling) each. One step only: the 4-bit base stays Q(W), the weights merge and chat rebuild from
    the original model, so LoftQ's later alternating steps (re-quantizing W - BA) could not be reproduced from the
    saved adapter. Returns the summed error norms before and after, and the layer count."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit

    files, get = _full_precision_weights(model_path)
    before = after = 0.0
    layers = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or adapter_name not in module.lora_A:
            continue
        key = name.split("base_model.model.", 1)[-1] + ".weight"
        if key not in files:
            raise UserError(f"adapter.init=loftq: {key} is not in the base's safetensors ({model_path}); the model's "
                            "layer names differ from its checkpoint's. Use adapter.init=default.")
        weight = module.base_layer.weight
        w = get(key).to(torch.float32)
        residual = w - bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
        r, scale = module.r[adapter_name], float(module.scaling[adapter_name])
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = (s[:r] / scale).sqrt()
        lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        lora_b.data = (u[:, :r] * root).to(lora_b.dtype)
        lora_a.data = (root[:, None] * vh[:r]).to(lora_a.dtype)
        before += residual.norm().item()
        after += (residual - scale * lora_b.float() @ lora_a.float()).norm().item()
        layers += 1
    if not layers:
        raise UserError("adapter.init=loftq found no 4-bit LoRA layer to initialise; it needs quant=nf4 or fp4.")
    return {"layers": layers, "error_before": before, "error_after": after}


# --------------------------------------------------------------------------------------------------------------
# IA3 on a bitsandbytes base


def _output_in_input_dtype(module, args, output):
    x = args[0]
    if torch.is_tensor(output) and output.is_floating_point() and x.is_floating_point() and output.dtype != x.dtype:
        return output.to(x.dtype)
    return None


def keep_ia3_output_dtype(model) -> int:
    """Make peft's IA3 layers on a bitsandbytes base return their input's dtype, as its plain IA3 Linear does.

    peft 0.21.2 ia3/bnb.py (Linear4bit.forward, Linear8bitLt.forward) upcasts a bf16/fp16 input to float32 outside
    autocast, then reads the dtype to cast back to from the *result* of that float32 call (``expected_dtype =
    result.dtype``), so the cast back is a no-op and the layer returns float32. Adapted k_proj/v_proj then hand float
    32 keys/values to attention next to the unadapted q_proj's bf16 queries, and SDPA raises "Expected query, key,
    and value to have the same dtype" in every forward outside autocast (generation, the held-out task score, chat);
    an adapted down_proj turns the residual stream float32. A forward hook casts the output back to the dtype the
    layer was called with (what ia3/layer.py Linear.forward returns). Returns how many layers it applied to."""
    try:
        from peft.tuners.ia3 import bnb as ia3_bnb
    except ImportError:
        return 0
    kinds = tuple(getattr(ia3_bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(ia3_bnb, name))
    hooked = 0
    for module in model.modules():
        if kinds and isinstance(module, kinds) and not getattr(module, "_keeps_input_dtype", False):
            module.register_forward_hook(_output_in_input_dtype)
            module._keeps_input_dtype = True
            hooked += 1
    return hooked


def _restore_int8_scales(module, args):
    weight = module.weight
    if getattr(weight, "CB", None) is not None and weight.SCB is None and module.state.SCB is not None:
        weight.SCB = module.state.SCB


def keep_int8_scales(model) -> int:
    """Keep bitsandbytes' int8 row scales when peft's DoRA re-wraps a CPU int8 weight.

    bitsandbytes 0.50.2 Linear8bitLt.forward moves the weight's int8 data and scales into ``module.state`` on the
    first call (init_8bit_state: ``weight.CB = weight.SCB = None``). peft 0.21.2's DoRA dequantizes the base weight
    every forward (utils/integrations.py dequantize_module_weight), and on CPU then assigns ``module.weight =
    module.weight.to(device)``; Int8Params.to returns a new parameter with ``CB`` = its int8 data but ``SCB`` only if
    the old one had it — None by then. The next forward's init_8bit_state copies that None into the state, and the
    int8 matmul fails ("'NoneType' object has no attribute 'dtype'"): DoRA on an int8 base crashed on CPU in the
    first forward after a training step. The scales are unchanged (the data is the same int8 tensor), so they are put
    back before the layer reads them. Returns how many layers it applied to."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return 0
    hooked = 0
    for module in model.modules():
        if isinstance(module, Linear8bitLt) and not getattr(module, "_keeps_int8_scales", False):
            module.register_forward_pre_hook(_restore_int8_scales)
            module._keeps_int8_scales = True
            hooked += 1
    return hooked


def fix_bnb_adapter_layers(model) -> None:
    """The two fixes above, for every model that carries an adapter on a bitsandbytes base."""
    keep_ia3_output_dtype(model)
    keep_int8_scales(model)


def save_initial_adapter(cfg: DictConfig, model, folder: Path) -> Path | None:
    """For PiSSA/OLoRA, save the adapter as initialised, so the final one can be converted to plain LoRA."""
    if not rewrites_base(cfg):
        return None
    init_dir = folder / "adapter_init"
    if (init_dir / "adapter_config.json").is_file():  # resuming: the original init is already on disk
        return init_dir
    pcfg = model.peft_config["default"]
    original = pcfg.init_lora_weights
    pcfg.init_lora_weights = True  # peft requires this marker on the initial save (see its PiSSA docs)
    try:
        model.save_pretrained(init_dir)
    finally:
        pcfg.init_lora_weights = original
    return init_dir


def save_adapter(cfg: DictConfig, model, folder: Path, initial: Path | None, state_dict: dict | None = None) -> None:
    """Save the trained adapter; PiSSA/OLoRA are converted so that they apply to the original base model.
    ``state_dict``: the model's weights gathered from FSDP / ZeRO-3 shards (distributed.gathered_state_dict), from
    which peft's save_pretrained picks the adapter's (get_peft_model_state_dict(state_dict=...))."""
    # the trained adapter only: TRL's preference trainers keep a frozen copy of a loaded adapter as the reference
    # ("ref", objectives.py), which peft would save beside it into ref/
    only = {"selected_adapters": ["default"]} if len(getattr(model, "peft_config", {})) > 1 else {}
    if state_dict is not None:
        only["state_dict"] = state_dict
    if initial is not None:
        # peft turns the residual-based adapter into an equivalent rank-2r LoRA on the untouched base weights.
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(initial), **only)
    else:
        model.save_pretrained(folder, **only)


def check_only_adapter_trainable(cfg: DictConfig, model) -> tuple[int, int]:
    """Raise unless every trainable parameter belongs to the adapter; return (trainable, total) counts."""
    if cfg.method == "full":
        total = sum(p.numel() for p in model.parameters())
        return sum(p.numel() for p in model.parameters() if p.requires_grad), total
    keys = ADAPTER_PARAM_KEYS + (("bias",) if getattr(cfg, "bias", "none") != "none" else ())
    stray = [n for n, p in model.named_parameters() if p.requires_grad and not any(k in n for k in keys)]
    if stray:
        raise RuntimeError(f"base-model parameters are trainable, which an adapter run must never do: {stray[:5]}")
    return model.get_nb_trainable_parameters()


def base_model_only(cfg: DictConfig, model):
    """Context in which ``model`` behaves as the base model (adapter off); a no-op for full fine-tuning."""
    if cfg.method == "full" or rewrites_base(cfg):
        # PiSSA/OLoRA: disabling the adapter would leave only the residual; at init, residual + adapter is the base.
        return nullcontext()
    return model.disable_adapter()
