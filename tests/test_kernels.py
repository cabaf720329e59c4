"""kernels=lean: the same values and gradients as transformers' eager RMSNorm and SwiGLU MLP, with less kept."""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_lab import kernels


def _layer(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, rms_norm_eps=1e-5)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(dtype)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    return layer


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("dtype, train_norm", [(torch.bfloat16, False), (torch.float32, True)])
def test_lean_rmsnorm_and_mlp_match_the_eager_modules_and_keep_less(dtype, train_norm):
    eager = _layer(dtype)
    lean = copy.deepcopy(eager)
    assert kernels.apply_lean(lean) == 3                      # two RMSNorms and the MLP
    x0 = torch.randn(3, 17, 64, dtype=dtype) * 3
    results = {}
    for name, layer in (("eager", eager), ("lean", lean)):
        for n, p in layer.named_parameters():
            p.requires_grad_(train_norm or "mlp" in n)
        x = x0.clone().requires_grad_()

        def forward(layer=layer, x=x):
            return layer.mlp(layer.post_attention_layernorm(x)) + layer.input_layernorm(x)

        out, saved = _saved_bytes(forward)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        results[name] = (out.detach(), x.grad, grads, saved)
    (out_e, gx_e, gp_e, saved_e), (out_l, gx_l, gp_l, saved_l) = results["eager"], results["lean"]
    assert torch.equal(out_l, out_e)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(gx_l, gx_e, **tol)
    assert gp_l.keys() == gp_e.keys() and len(gp_e) >= 3
    for n in gp_e:
        torch.testing.assert_close(gp_l[n], gp_e[n], **tol)
    if dtype == torch.bfloat16:
        assert saved_l < 0.8 * saved_e                        # no float32 copies, no silu(gate)


def test_auto_is_lean_on_cpu_and_liger_needs_cuda(monkeypatch):
    from qlora_lab.errors import UserError
    from qlora_lab.models import arch_config

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    llama = arch_config("llama-3.2-1b-arch")
    assert kernels.resolve("auto", llama) == "lean" and kernels.resolve("none", llama) == "none"
    with pytest.raises(UserError, match="kernels=liger"):
        kernels.resolve("liger", llama)
