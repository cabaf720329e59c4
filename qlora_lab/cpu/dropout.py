"""LoRA dropout with fewer random draws (``adapter.dropout_impl`` fast / recompute): a CPU lever.

On CPU, dropout's per-element Bernoulli draws were 28% of a QLoRA step on SmolLM2 (torch profiler:
aten::bernoulli_, 7 adapted inputs per layer); CUDA's fused dropout is cheap, so the plan (qlora_lab/plan.py)
turns this on for CPU runs only, unless set explicitly. Written here because no maintained library offers it.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch


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


def use_dropout_impl(model, impl: str) -> int:
    """Swap the LoRA dropout modules of ``model`` for :class:`FastDropout` per ``impl`` (the plan's dropout_impl:
    torch | fast | recompute); returns how many."""
    if impl not in ("fast", "recompute"):
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
