"""The "lean" decoder-layer kernels (``kernels=lean``): PyTorch versions of RMSNorm and SwiGLU that keep less for
backward. A CPU lever: the plan (qlora_lab/plan.py) picks it on CPU for the model families below, where it is
tested to equal the model's own modules (tests/test_kernels.py); Liger's Triton kernels are the CUDA counterpart.

Why "lean" is written here rather than taken from a library: Liger Kernel does the same on CUDA (Triton), and
nothing maintained does it for CPU, where the embedded model trains. Both functions compute exactly what
transformers' eager modules compute, with the same operations in the same order; only what autograd keeps differs:

- RMSNorm (LlamaRMSNorm and its copies): the eager module upcasts its input to float32 and autograd keeps that
  copy (4 bytes per element); here the input is kept in its own dtype (2 bytes in bf16) with the float32 1/rms per
  row, and the float32 copy is made again in backward.
- SwiGLU MLP (down(silu(gate(x)) * up(x))): the eager module keeps gate(x), silu(gate(x)) and up(x); here
  silu(gate(x)) is recomputed in backward from gate(x).
- peft's LoRA layer forward (applied once the trainer has wrapped the model): the same result without peft's
  defensive copy of the base output and its two temporaries (:func:`_lora_forward`).

On the embedded model (SmolLM2-135M, QLoRA, batch 8 x 256 tokens) that is 1/3 GiB less per step, see
benchmarks/README.md. Patched per module instance (forward replaced), only for instances of the classes below
(matched by type, not name: a model's own subclass or a same-named class elsewhere is left alone).
"""

from __future__ import annotations

import importlib
import logging
from types import MethodType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# model_type -> (module, its RMSNorm class, its MLP class), from transformers; each family is tested in
# tests/test_kernels.py. The RMSNorms compute weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
# (attribute variance_epsilon); the MLPs down_proj(act_fn(gate_proj(x)) * up_proj(x)).
LEAN_FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP"),
}
# peft LoRA layers over nn.Linear and bitsandbytes' Linear4bit (peft.tuners.lora.layer / .bnb)
LEAN_LORA_LAYERS = {"Linear", "Linear4bit"}


def lean_classes(model_type: str) -> tuple[type, type] | None:
    """(RMSNorm class, MLP class) of a family the lean kernels are tested on, or None."""
    spec = LEAN_FAMILIES.get(model_type)
    if spec is None:
        return None
    module = importlib.import_module(spec[0])
    return getattr(module, spec[1]), getattr(module, spec[2])


def lean_unsupported(model_type: str) -> str | None:
    """Why the lean kernels do not apply to ``model_type`` (None when they do)."""
    if model_type in LEAN_FAMILIES:
        return None
    return f"the lean kernels are tested on {', '.join(LEAN_FAMILIES)} only, not {model_type!r}"


# --------------------------------------------------------------------------------------------------------------
# lean RMSNorm and SwiGLU


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd, normed if weight.requires_grad else None)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd, normed = ctx.saved_tensors
        # the eager module's backward, op for op: y = w * n; n = (xf * r).to(dtype); r = rsqrt(mean(xf^2) + eps)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * normed).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        grad_h = (grad * weight).to(x.dtype).to(torch.float32)  # eager rounds to the input dtype first
        xf = x.to(torch.float32)
        grad_r = (grad_h * xf).sum(-1, keepdim=True)
        grad_var = grad_r * (-0.5 * rstd.pow(3))
        grad_xf = grad_h * rstd + grad_var.expand_as(xf) / xf.shape[-1] * 2 * xf
        return grad_xf.to(x.dtype), grad_w, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _rmsnorm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _lora_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear / Linear4bit forward for one plain LoRA adapter, minus its copies: peft computes
    ``result.clone() + (lora_B(lora_A(dropout(x))) * scaling)`` (the clone is a defensive copy for 4-bit layers, see
    peft/tuners/lora/bnb.py); here the scaling and the sum are done in place on tensors no backward keeps, so the
    values are bit for bit peft's. Anything else (DoRA and other variants, several or disabled adapters, merged
    weights, autocast, extra arguments) runs peft's own forward."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    base = self.base_layer
    if (args or kwargs or name not in self.lora_A or name in self.lora_variant or self.disable_adapters
            or self.merged or torch.is_autocast_enabled() or not _output_unsaved(base)
            or base._forward_hooks or torch.nn.modules.module._global_forward_hooks):
        # (forward hooks would see the base output change in place)
        return type(self).forward(self, x, *args, **kwargs)
    result = base(x)
    lora_A = self.lora_A[name]
    out = self.lora_B[name](lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))))
    out = out.mul_(self.scaling[name])
    if type(self).__name__ == "Linear4bit":
        out = out.to(result.dtype)  # peft's 4-bit layer rounds the adapter's output to the base output's dtype first
    # peft's Linear returns (result + out).to(result.dtype), a sum in the promoted dtype: what an in-place add into
    # `result` computes. In place only on a fresh tensor of the base layer's (autograd refuses the rest loudly).
    # Under torch.compile (compile=layers) the out-of-place sum: the compiler fuses it anyway, and a data-pointer
    # comparison would break the graph.
    if not torch.compiler.is_compiling() and result._base is None and result.data_ptr() != x.data_ptr():
        return result.add_(out)
    return (result + out).to(result.dtype)


def _output_unsaved(base) -> bool:
    """Whether no backward keeps ``base``'s output: exactly nn.Linear or bitsandbytes' Linear4bit (a subclass may
    save it, e.g. one ending in tanh), so the lean forward may add into it in place."""
    cls = type(base)
    return cls is torch.nn.Linear or (cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes"))


def apply_lean_lora(model) -> int:
    """Give every peft LoRA Linear / Linear4bit layer of ``model`` the lean forward; returns how many."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ in LEAN_LORA_LAYERS and type(module).__module__.startswith("peft.tuners.lora"):
            module.forward = MethodType(_lora_forward, module)
            patched += 1
    return patched


def apply_lean(model) -> int:
    """Replace the forward of every RMSNorm / SiLU MLP of ``model`` whose exact type is one of LEAN_FAMILIES'
    classes; returns how many were patched (0 for other families: they run their own modules)."""
    families = [lean_classes(t) for t in LEAN_FAMILIES]
    norms, mlps = {n for n, _ in families}, {m for _, m in families}
    patched = 0
    for module in model.modules():
        if type(module) in norms and hasattr(module, "variance_epsilon"):
            module.forward = MethodType(_rmsnorm_forward, module)
            patched += 1
        elif (type(module) in mlps and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
              and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))):
            module.forward = MethodType(_mlp_forward, module)
            patched += 1
    if not patched:
        log.info("kernels=lean: no module of %s in this model; it runs its own modules", ", ".join(LEAN_FAMILIES))
    return patched
