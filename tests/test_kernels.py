"""kernels=lean: the same values and gradients as transformers' eager RMSNorm and SwiGLU MLP, with less kept."""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_lab.cpu import kernels


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


def _tiny_causal_lm(model_type: str, dtype):
    """A 2-layer random model of a transformers decoder class, built from its config (no weights downloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=160,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.normal_(p, 1.0, 0.2)  # not all ones: the norm weights' gradients must matter
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type, norm, mlp", [("qwen2", "Qwen2RMSNorm", "Qwen2MLP"),
                                                   ("mistral", "MistralRMSNorm", "MistralMLP"),
                                                   ("llama", "LlamaRMSNorm", "LlamaMLP")])
def test_lean_kernels_equal_the_models_own_modules(model_type, norm, mlp, dtype):
    """Whole models of each listed decoder class: the same logits, and the same gradients for every weight."""
    eager = _tiny_causal_lm(model_type, dtype)
    lean = copy.deepcopy(eager)
    names = {type(m).__name__ for m in eager.modules()}
    assert {norm, mlp} <= names  # the class names kernels.py lists are the ones this transformers builds
    assert kernels.apply_lean(lean) == 2 * 2 + 1 + 2   # 2 layers x 2 norms, the final norm, 2 MLPs
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (eager, lean):
        logits = model(input_ids=ids).logits
        (logits.float() * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits_e, grads_e), (logits_l, grads_l) = results
    assert torch.equal(logits_l, logits_e)  # the same operations in the same order
    # float32: rounding of the sums (the embedding gradient adds up every position); bf16: its 8-bit mantissa
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert grads_l.keys() == grads_e.keys()
    for n in grads_e:
        assert grads_e[n] is not None, n
        torch.testing.assert_close(grads_l[n].float(), grads_e[n].float(), **tol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.integration
def test_kernels_auto_behaves_as_its_device_default(tmp_path, captured):
    """kernels=auto keeps exactly what the documented default of this device keeps for backward in a training
    forward (lean on CPU: less than the model's own modules; the model's own modules on CUDA), with the same logits."""
    from qlora_lab import train as train_mod
    from tests.conftest import TINY, compose_train

    def trained_forward(impl):
        train_mod.train(compose_train([*TINY, f"kernels={impl}", "quant=none", "adapter.dropout=0",
                                       "trainer.max_steps=1", "score_before=false", "data.task_eval_samples=0",
                                       "trainer.save_strategy=no"], tmp_path / impl))
        model = captured["trainer"].model.train()
        ids = torch.tensor([[1, 520, 3300, 42, 17, 998, 205, 2] * 4], device=model.device)
        torch.manual_seed(0)
        out, saved = _saved_bytes(lambda: model(input_ids=ids).logits)
        return out.detach(), saved

    auto, lean, none = (trained_forward(impl) for impl in ("auto", "lean", "none"))
    expected = none if torch.cuda.is_available() else lean
    assert auto[1] == expected[1]
    assert lean[1] < none[1]                              # what lean is for: the two defaults differ
    torch.testing.assert_close(auto[0], none[0], rtol=1e-2, atol=1e-2)  # same model, same values


def _lora_model(quantized: bool, use_dora: bool = False):
    """Two Linear layers under peft LoRA (r 4, dropout 0): over bitsandbytes' Linear4bit (NF4) or nn.Linear."""
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)).to(torch.bfloat16)
    if quantized:
        import bitsandbytes as bnb

        q = torch.nn.Sequential(*(bnb.nn.Linear4bit(m.in_features, m.out_features, compute_dtype=torch.bfloat16,
                                                     quant_type="nf4") for m in base))
        for qm, m in zip(q, base):
            qm.weight = bnb.nn.Params4bit(m.weight.data.float(), requires_grad=False, quant_type="nf4")
            qm.bias = torch.nn.Parameter(m.bias.data, requires_grad=False)
        base = q.to("cpu")  # Params4bit quantizes when moved to a device
        base.is_loaded_in_4bit = True  # what peft reads off a transformers model to pick its Linear4bit layer
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"],
                                                      lora_dropout=0.0, use_dora=use_dora))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # peft starts B at 0: make the adapter's share visible
    return model.to(torch.bfloat16) if not quantized else model


@pytest.mark.parametrize("quantized, use_dora", [(True, False), (False, False), (True, True)])
def test_lean_lora_forward_is_peft_bit_for_bit(quantized, use_dora):
    peft_model = _lora_model(quantized, use_dora)
    lean = _lora_model(quantized, use_dora)
    assert kernels.apply_lean_lora(lean) == 2
    assert {type(m).__module__ for m in lean.modules() if hasattr(m, "lora_A")} == {
        "peft.tuners.lora.bnb" if quantized else "peft.tuners.lora.layer"}
    assert all(m.forward.__func__ is kernels._lora_forward for m in lean.modules()
               if type(m).__name__ in kernels.LEAN_LORA_LAYERS and type(m).__module__.startswith("peft"))
    x0 = torch.randn(3, 11, 64, dtype=torch.bfloat16)
    outs, grads = [], []
    for model in (peft_model, lean):
        x = x0.clone().requires_grad_()
        out = model(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad] + [p.grad for n, p in sorted(model.named_parameters()) if p.requires_grad])
    assert torch.equal(outs[0], outs[1])
    assert len(grads[1]) > 1 and all(torch.equal(a, b) for a, b in zip(*grads))
    with lean.disable_adapter():  # the adapter off: peft's own path, the base alone
        base_out = lean(x0)
    assert not torch.equal(base_out, outs[1])


def test_lean_lora_forward_falls_back_where_an_in_place_add_could_be_seen():
    """A forward hook on the base layer, or a Linear subclass that saves its output: peft's own forward runs."""
    import peft

    class TanhLinear(torch.nn.Linear):  # saves its output for backward (tanh)
        def forward(self, x):
            return torch.tanh(super().forward(x))

    def model():
        torch.manual_seed(0)
        m = peft.get_peft_model(torch.nn.Sequential(TanhLinear(16, 16), torch.nn.Linear(16, 16)),
                                peft.LoraConfig(r=2, target_modules=["0", "1"], lora_dropout=0.0))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p)
        return m

    ref, lean = model(), model()
    assert kernels.apply_lean_lora(lean) == 2
    seen = {}
    for name, m in (("ref", ref), ("lean", lean)):
        m.base_model.model[1].base_layer.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(4, 16)
    outs = []
    for m in (ref, lean):
        y = m(x)
        y.sum().backward()  # TanhLinear's saved output was not changed in place
        outs.append(y.detach())
    assert torch.equal(outs[0], outs[1]) and torch.equal(seen["ref"], seen["lean"])
