"""PEFT adapters: the ``peft`` config for the ``adapter`` group, initialisations that need the built model, and
the check that only adapter weights train."""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

# substrings of parameter names that belong to each kind of adapter
ADAPTER_PARAM_KEYS = ("lora_", "ia3_", "prompt_encoder", "modules_to_save")


def build_peft_config(cfg: DictConfig, tokenizer_path: str | None = None):
    """The peft config for ``cfg`` (the ``adapter`` group), or None for method=full. SFTTrainer applies it.

    ``tokenizer_path``: where peft loads the tokenizer to embed ``prompt_init_text`` (prompt tuning)."""
    import peft
    from peft import TaskType

    task = TaskType.CAUSAL_LM
    save = list(cfg.modules_to_save) or None
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    if cfg.method == "full":
        return None
    if cfg.method == "lora":
        init = cfg.init
        return peft.LoraConfig(
            task_type=task, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
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


def apply_post_init(cfg: DictConfig, model, model_path: str) -> None:
    """What needs the wrapped, quantized model: the dropout implementation, IA3's output dtype on a quantized base,
    and LoftQ via peft's replace_lora_weights_loftq."""
    use_dropout_impl(cfg, model)
    fix_bnb_adapter_layers(model)
    if not (cfg.method == "lora" and cfg.init == "loftq"):
        return
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    weights = Path(model_path) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"adapter.init=loftq needs the base's full-precision weights as one local safetensors file; "
                        f"{weights} does not exist (sharded or hub checkpoints: download and merge the shards, or "
                        "use adapter.init=default).")
    log.info("LoftQ: initialising LoRA from the quantization error of every adapted layer (%d iteration(s))",
             cfg.loftq_iter)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(cfg.loftq_iter):
        replace_lora_weights_loftq(model, model_path=str(weights))
    for n, p in model.named_parameters():  # keep the dtype the trainer chose for the adapter
        if n in dtypes and p.dtype != dtypes[n]:
            p.data = p.data.to(dtypes[n])


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


# --------------------------------------------------------------------------------------------------------------
# LoRA dropout with fewer random draws


def _draw_keep(seed: int, shape: torch.Size, device: torch.device, threshold: int) -> torch.Tensor:
    """The keep-mask of a FastDropout call: one 64-bit draw per four elements, each 16 bits against the threshold."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n = shape.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device, generator=gen)
    return bits.view(torch.int16)[:n].view(shape) >= threshold


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale; saves the 1-byte mask (not the input's dtype, as nn.Dropout does) for backward."""

    @staticmethod
    def forward(ctx, x, keep: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(keep)
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class _DroppedInput:
    """Stands in for a dropout output (or a view of it) saved for backward by the LoRA A matmul: the dropout's input,
    its mask (the one the dropout keeps for its own backward: no copy) and the view's geometry."""

    __slots__ = ("x", "version", "keep", "scale", "geometry")

    def __init__(self, x: torch.Tensor, version: int, keep: torch.Tensor, scale: float, saved: torch.Tensor):
        self.x, self.version, self.keep, self.scale = x, version, keep, scale
        self.geometry = (saved.size(), saved.stride(), saved.storage_offset())

    def output(self) -> torch.Tensor:
        if self.x._version != self.version:
            raise RuntimeError("an input of a LoRA dropout was modified in place between forward and backward, so its "
                               "output cannot be recomputed; set adapter.dropout_impl=torch for this model.")
        return self.x.mul(self.keep).mul_(self.scale).as_strided(*self.geometry)


# dropout outputs of the forward in progress, by storage address (-> weakref, input, keep-mask, scale, input version,
# output version), while recompute_dropout_outputs() is active. By storage, not by tensor: linear() on a 3-D input
# saves a 2-D view. The versions at dropout time: a tensor changed in place since is saved as it is (output) or
# refused in backward (input), as autograd itself would.
_PENDING: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor, float, int, int]] = {}
_RECOMPUTING = [False]


def _pack(t: torch.Tensor):
    entry = _PENDING.get(t.untyped_storage().data_ptr())
    if entry is not None:
        out = entry[0]()
        if (out is not None and out.dtype == t.dtype and t._version == entry[5]
                and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()):
            return _DroppedInput(entry[1], entry[4], entry[2], entry[3], t)
    return t


def _unpack(saved):
    return saved.output() if isinstance(saved, _DroppedInput) else saved


@contextmanager
def recompute_dropout_outputs():
    """Within: FastDropout outputs that autograd saves (the input of every LoRA A matmul) are saved as their input
    and 1-byte mask (which the dropout keeps anyway), and recomputed in backward. The input is usually kept anyway
    (the base layer's input, shared by q/k/v and by gate/up), so a layer keeps one tensor per input instead of a
    dropped copy per adapted module. Measured on SmolLM2 QLoRA, CPU: see benchmarks/README.md. Uses torch's
    saved-tensor hooks; activation checkpointing's own hooks take over inside checkpointed layers."""
    _RECOMPUTING[0] = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _RECOMPUTING[0] = False
        _PENDING.clear()


class FastDropout(torch.nn.Module):
    """Dropout drawing one 64-bit random number per four elements (16-bit thresholds), from a per-call seed.

    The same distribution as ``nn.Dropout(p)`` — independent per element, scaled by 1/(1-p) — with p rounded to a
    multiple of 1/65536 (0.05 -> 0.0500031). Why not torch's: on CPU, dropout's per-element Bernoulli draws were 28%
    of a QLoRA step on SmolLM2 (torch profiler: aten::bernoulli_, 7 adapted inputs per layer), and its mask is kept
    in the input's dtype for backward; here a quarter of the draws and a 1-byte mask, and with ``recompute`` (under
    :func:`recompute_dropout_outputs`) the dropped output is not kept but recomputed from the input and the mask.
    (Redrawing the mask in backward instead of keeping it saves 1 byte per element; it was ~6% slower on CPU.)
    The seed comes from the global CPU generator, so seeds, checkpoint/resume RNG restoring and activation
    checkpointing's RNG replay work as for nn.Dropout.
    """

    def __init__(self, p: float, recompute: bool = True):
        super().__init__()
        self.p, self.recompute = p, recompute
        self.threshold = round(p * 65536) - 32768          # keep where a uniform int16 >= threshold
        self.scale = 1.0 / (1.0 - (self.threshold + 32768) / 65536)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seed = int(torch.randint(0, 2**62, (1,)))  # from the global generator: seeding and RNG replay as nn.Dropout
        keep = _draw_keep(seed, x.shape, x.device, self.threshold)
        out = _MaskedScale.apply(x, keep, self.scale)
        if self.recompute and _RECOMPUTING[0] and torch.is_grad_enabled():
            key = out.untyped_storage().data_ptr()
            _PENDING[key] = (weakref.ref(out, lambda _, key=key: _PENDING.pop(key, None)), x, keep, self.scale,
                             x._version, out._version)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, recompute={self.recompute}"


def resolve_dropout_impl(cfg: DictConfig) -> str:
    """``adapter.dropout_impl`` with auto resolved: recompute on CPU, torch on CUDA (its fused dropout is cheap)."""
    impl = cfg.get("dropout_impl", "torch")
    if impl == "auto":
        return "torch" if torch.cuda.is_available() else "recompute"
    return impl


def use_dropout_impl(cfg: DictConfig, model) -> int:
    """Swap the LoRA dropout modules for :class:`FastDropout` per ``adapter.dropout_impl``; returns how many."""
    impl = resolve_dropout_impl(cfg)
    if impl not in ("fast", "recompute") or cfg.method != "lora":
        return 0
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, d in dropouts.items():
                if isinstance(d, torch.nn.Dropout) and d.p > 0:
                    dropouts[name] = FastDropout(d.p, recompute=impl == "recompute")
                    swapped += 1
    return swapped


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


def save_adapter(cfg: DictConfig, model, folder: Path, initial: Path | None) -> None:
    """Save the trained adapter; PiSSA/OLoRA are converted so that they apply to the original base model."""
    if initial is not None:
        # peft turns the residual-based adapter into an equivalent rank-2r LoRA on the untouched base weights.
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(initial))
    else:
        model.save_pretrained(folder)


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
