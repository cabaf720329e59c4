"""Every adapter through the same SFTTrainer loop, on a 4-bit and a 16-bit base: what trains, what must not
change, and that the saved adapter reloads with plain peft to the same logits."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from qlora_lab import train as train_mod
from qlora_lab.errors import ConfigError
from qlora_lab.validate import validate
from tests.conftest import TINY, compose_train

ADAPTERS = ["lora", "rslora", "dora", "pissa", "olora", "loftq", "prefix", "prompt", "ptuning", "ia3", "full"]
REFUSED = {("full", "nf4"), ("pissa", "nf4"), ("olora", "nf4"), ("loftq", "none")}  # see test_refused_combinations
# no warmup: both steps train (with LoRA's B = 0 at init, A only moves on the 2nd step)
FAST = [*TINY, "trainer.max_steps=2", "score_before=false", "data.task_eval_samples=0", "trainer.save_strategy=no",
        "trainer.warmup_steps=0"]


def cases():
    for adapter in ADAPTERS:
        for quant in ("nf4", "none"):
            if (adapter, quant) in REFUSED:
                continue
            yield adapter, quant
    yield "lora", "fp4"
    yield "lora", "int8"
    yield "lora", "nf4-single"
    yield "prompt-text", "nf4"  # prompt tuning initialised from real token embeddings


def reload_plain(cfg, run_dir):
    """The trained model as a user would rebuild it: transformers + bitsandbytes + plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lab.models import (
        _disable_cpu_inference_repacking,
        device_map,
        quantization_config,
        resolve_dtype,
        resolve_model_path,
    )
    kwargs = dict(device_map=device_map(), dtype=resolve_dtype(cfg.model.dtype))
    if cfg.adapter.method == "full":
        return AutoModelForCausalLM.from_pretrained(run_dir / "adapter", **kwargs)
    # the 4-bit layers as the run had them: the plan records what quant.skip_modules=auto kept in 16-bit
    kept = json.loads((run_dir / "plan.json").read_text())["resolved"]["quant.skip_modules"]
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                quantization_config=quantization_config(cfg.quant, skip_modules=kept),
                                                **kwargs)
    _disable_cpu_inference_repacking(base)  # compare on the training kernel (see qlora_lab/models.py)
    # adapters on a 4-bit base were trained (and saved) in bf16: keep that dtype rather than upcasting
    return PeftModel.from_pretrained(base, run_dir / "adapter", autocast_adapter_dtype=cfg.quant.method == "none")


# Learning rates high enough that 2 steps move every adapter's output well clear of the reload tolerance (below):
# IA3 scales activations by vectors initialised to 1, and at 5e-3 moved the logits by less than that tolerance.
LEARNING_RATE = {"ia3": "5e-2", "prefix": "2e-2", "prompt": "2e-2", "ptuning": "2e-2"}


@pytest.mark.integration
@pytest.mark.parametrize("adapter, quant", cases())
def test_adapter_trains_only_itself_and_reloads(tmp_path, captured, adapter, quant):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    extra = ["adapter.prompt_init_text=Extract the facts as JSON:"] if adapter == "prompt-text" else []
    adapter = adapter.removesuffix("-text")
    lr = LEARNING_RATE.get(adapter, "5e-3")
    cfg = compose_train([*FAST, f"adapter={adapter}", f"quant={quant}", f"trainer.learning_rate={lr}", *extra],
                        tmp_path)
    metrics = train_mod.train(cfg)
    model = captured["trainer"].model.eval()
    before = captured["before"]
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}

    # what trains: exactly the adapter (everything for full), with the count peft reports
    assert trainable
    if adapter == "full":
        assert trainable == set(params)
        assert metrics["trainable_params"] == metrics["total_params"] == sum(p.numel() for p in params.values())
    else:
        assert (metrics["trainable_params"], metrics["total_params"]) == model.get_nb_trainable_parameters()
        assert metrics["trainable_params"] == sum(params[n].numel() for n in trainable)

    # base weights bit-identical; every adapter weight moved (LoRA: A and B, DoRA magnitudes, the p-tuning MLP, ...)
    changed = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert changed == trainable, sorted(trainable - changed)[:5]
    if quant != "none":
        import bitsandbytes as bnb
        kind = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
        assert any(isinstance(m, kind) for m in model.modules())

    # the saved file holds exactly the trained adapter (PiSSA/OLoRA: converted to plain LoRA, checked by the logits)
    if adapter not in ("full", "pissa", "olora"):
        saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        expected = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
        assert saved.keys() == expected.keys()
        for key, tensor in expected.items():
            assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key

    # the saved adapter reloads with plain peft (or transformers, for full) to the same logits
    reloaded = reload_plain(cfg, tmp_path).eval()
    ids = torch.tensor([[1, 520, 3300, 42, 17, 998, 205, 2]])
    # accelerate wraps the trained model's forward in the run's bf16 autocast; give the reloaded one the same
    ids = ids.to(model.device)
    autocast = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bool(captured["trainer"].args.bf16))
    with torch.no_grad():
        a = model(input_ids=ids).logits.float()
        with autocast:
            b = reloaded(input_ids=ids).logits.float()
        # the same model with the untrained adapter (as training started): what an unsaved adapter would give
        trained = {n: params[n].detach().clone() for n in trainable}
        for n in trainable:
            params[n].copy_(before[n])
        untrained = model(input_ids=ids).logits.float()
        for n in trainable:
            params[n].copy_(trained[n])
    # Within bf16 rounding (eps 7.8e-3): the run computes in bf16 autocast, and an fp32 adapter (DoRA magnitude,
    # p-tuning MLP) or a bf16 base rounds in a slightly different order after reloading. PiSSA/OLoRA are saved
    # converted to plain rank-2r LoRA on the original base, which drops the bf16 rounding of their residual base.
    tol = (2e-2 if adapter in ("pissa", "olora") else 1e-2) * max(1.0, a.abs().max().item())
    moved = (a - untrained).abs().max().item()
    # training moved the output far beyond the tolerance, so an untrained or stale saved adapter cannot pass below
    assert moved >= 5 * tol, (moved, tol)
    assert (a - b).abs().max() <= tol, (a - b).abs().max()


@pytest.mark.parametrize("adapter, quant, needle", [
    ("full", "nf4", "quantized weights cannot be trained directly"),
    ("pissa", "nf4", "PiSSA moves the principal components"),
    ("loftq", "none", "LoftQ initialises LoRA to cancel the 4-bit"),
    ("olora", "nf4", "OLoRA rewrites the base weights as a residual"),
])
def test_refused_combinations(adapter, quant, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(compose_train([f"adapter={adapter}", f"quant={quant}"]))


def test_loftq_steps_other_than_one_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="adapter.loftq_iter=3: only 1 is supported"):
        validate(compose_train(["adapter=loftq", "quant=nf4", "adapter.loftq_iter=3"]))


@pytest.mark.integration
@pytest.mark.parametrize("quant_type, rslora", [("nf4", False), ("fp4", True)])
def test_loftq_init_is_the_rank_r_optimum_of_every_layers_4bit_error(quant_type, rslora):
    """After loftq_init, every 4-bit layer's dequant(Q(W)) + scaling * B @ A is closer to the full-precision W than
    dequant(Q(W)) alone, by exactly what rank r allows (Eckart-Young: the residual's singular values beyond r), with
    LoRA's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) taken into account. On CPU."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_lab import adapters, models

    path = models.resolve_model_path("builtin:tiny-random")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    r = 4
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", use_rslora=rslora))
    stats = adapters.loftq_init(model, str(path))
    original = load_file(f"{path}/model.safetensors")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert stats["layers"] == len(layers) > 5
    for name, module in layers:
        w = original[name.removeprefix("base_model.model.") + ".weight"].float()
        dq = bnb.functional.dequantize_4bit(module.base_layer.weight.data, module.base_layer.weight.quant_state).float()
        scale = module.scaling["default"]
        assert scale == (16 / r**0.5 if rslora else 16 / r)
        ba = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
        before, after = (w - dq).norm().item(), (w - dq - scale * ba).norm().item()
        optimum = torch.linalg.svdvals(w - dq)[r:].norm().item()
        assert after < before, name
        assert abs(after - optimum) <= 1e-3 * before, (name, after, optimum)
    assert stats["error_after"] < stats["error_before"]


@pytest.mark.parametrize("field", ["gradient_checkpointing", "activation_checkpointing"])
def test_prefix_with_activation_checkpointing_is_refused_with_the_reason(field):
    with pytest.raises(ConfigError, match="drop the cache that carries peft's prefix") as e:
        validate(compose_train(["adapter=prefix", f"trainer.{field}=true"]))
    assert f"trainer.{field}=true" in str(e.value) and f"Set trainer.{field}=false" in str(e.value)  # what was set


def test_fast_dropout_has_dropouts_distribution_and_gradient():
    from qlora_lab.cpu.dropout import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.95) < 2e-3           # p(drop) = 0.05 (to 1/65536)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.95), rtol=1e-4)  # kept values rescaled
    rows, cols = kept.float().mean(1), kept.float().mean(0)         # no structure from the 16-bit lanes
    assert rows.std() < 0.02 and cols.std() < 0.02
    assert not torch.equal(kept, drop(x) != 0)                      # a new mask every call
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                          # d(sum)/dx = mask * scale
    drop.eval()
    assert drop(x) is x


def test_fast_dropout_recomputes_its_saved_output_in_backward_to_the_same_gradients(monkeypatch):
    from qlora_lab.cpu import dropout as adapters

    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 4, bias=False), torch.nn.Linear(4, 64, bias=False)  # a LoRA branch: B(A(drop(x)))
    torch.nn.init.normal_(b.weight)
    drop = adapters.FastDropout(0.3).train()
    x0 = torch.randn(8, 64)
    stand_ins = []
    real_unpack = adapters._unpack
    monkeypatch.setattr(adapters, "_unpack", lambda saved: (stand_ins.append(type(saved).__name__),
                                                            real_unpack(saved))[1])

    def grads(recompute: bool):
        torch.manual_seed(1)
        a.zero_grad(), b.zero_grad()
        x = x0.clone().requires_grad_()
        with adapters.recompute_dropout_outputs() if recompute else contextlib.nullcontext():
            y = b(a(drop(x)))
        (y * torch.arange(64.0)).sum().backward()
        return x.grad, a.weight.grad.clone(), b.weight.grad.clone()

    draws = []
    real_draw = adapters._draw_keep
    monkeypatch.setattr(adapters, "_draw_keep", lambda *a: (draws.append(a), real_draw(*a))[1])
    plain = grads(False)
    assert "_DroppedInput" not in stand_ins
    recomputed = grads(True)
    assert len(draws) == 2 and draws[0] == draws[1]      # one draw per call (kept for backward), same seed
    assert stand_ins.count("_DroppedInput") == 1          # A's saved input was the stand-in, recomputed in backward
    for p, r in zip(plain, recomputed):
        assert torch.equal(p, r)
    assert not adapters._PENDING

    x = x0.clone().requires_grad_()
    with adapters.recompute_dropout_outputs():
        y = b(a(drop(x)))
    with torch.no_grad():
        x.mul_(2)                                          # an in-place change the recomputation would miss
    with pytest.raises(RuntimeError, match="dropout_impl=torch"):
        y.sum().backward()

    def changed_in_place(recompute: bool, where: str):
        torch.manual_seed(1)
        a.zero_grad()
        x = x0.clone().requires_grad_()
        with adapters.recompute_dropout_outputs() if recompute else contextlib.nullcontext():
            h = x * 1.0
            d = drop(h)
            if where == "input":
                h.mul_(3)                                  # after the dropout, before A saves its output
            else:
                d = d.mul_(3)                              # the output itself, before A saves it
            y = b(a(d))
        y.sum().backward()
        return a.weight.grad.clone()

    torch.testing.assert_close(changed_in_place(True, "output"), changed_in_place(False, "output"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="dropout_impl=torch"):
        changed_in_place(True, "input")


@pytest.mark.parametrize("impl", ["fast", "auto"])
def test_fast_dropout_replaces_lora_dropout_and_trains(tmp_path, captured, impl):
    from qlora_lab.cpu import kernels
    from qlora_lab.cpu.dropout import FastDropout

    cfg = compose_train([*TINY, f"adapter.dropout_impl={impl}", "trainer.max_steps=2", "score_before=false",
                         "data.task_eval_samples=0", "trainer.save_strategy=no"], tmp_path)
    train_mod.train(cfg)
    trainer = captured["trainer"]
    model = trainer.model
    # the documented auto rules (AdapterConfig.dropout_impl, TrainRunConfig.kernels): on CPU recompute and lean; on
    # CUDA torch's dropout and the model's own modules
    on_cuda = torch.cuda.is_available()
    dropout_impl = {"fast": "fast", "auto": "torch" if on_cuda else "recompute"}[impl]
    kernel_impl = "none" if on_cuda else "lean"
    recorded = json.loads((tmp_path / "plan.json").read_text())
    assert recorded["dropout_impl"] == dropout_impl and recorded["kernels"] == kernel_impl
    assert trainer.kernels == kernel_impl
    fast = [m for m in model.modules() if isinstance(m, FastDropout)]
    torch_dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if dropout_impl == "torch":
        assert not fast and len(torch_dropouts) == 14                # peft's own nn.Dropout on all 14 adapted linears
    else:
        assert len(fast) == 14 and not torch_dropouts
    recompute = dropout_impl == "recompute"
    assert all(m.recompute == recompute for m in fast) and trainer._recompute_dropout == recompute
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in b)                         # gradients reached every adapter
    # lean: every RMSNorm and MLP of the tiny Llama runs the lean forward; none: none of them does
    lean = [m for m in model.modules() if getattr(m.forward, "__func__", None) in (kernels._rmsnorm_forward,
                                                                                    kernels._mlp_forward)]
    assert len(lean) == (2 * 2 + 1 + 2 if kernel_impl == "lean" else 0)  # 2 layers x 2 norms, final norm, 2 MLPs


@pytest.mark.integration
def test_auto_dropout_trains_exactly_as_its_device_default(tmp_path):
    """adapter.dropout_impl=auto gives the same first update as the implementation documented for this device
    (recompute on CPU, torch's nn.Dropout on CUDA) and not the other one: same seed, one step, LoRA B moved by
    gradients that go through the dropout masks (B = 0 at init, so A's input masks decide B's first update).
    (fast and recompute draw the same masks; they differ only in what backward keeps.)"""
    from safetensors.torch import load_file

    def first_update(impl):
        run = tmp_path / impl
        train_mod.train(compose_train([*TINY, f"adapter.dropout_impl={impl}", "adapter.dropout=0.3",
                                       "trainer.max_steps=1", "trainer.warmup_steps=0", "score_before=false",
                                       "data.task_eval_samples=0", "trainer.save_strategy=no"], run))
        return {k: v for k, v in load_file(run / "adapter/adapter_model.safetensors").items() if "lora_B" in k}

    auto = first_update("auto")
    same, other = ("torch", "recompute") if torch.cuda.is_available() else ("recompute", "torch")
    expected, different = first_update(same), first_update(other)
    assert auto.keys() == expected.keys() and auto
    assert all(torch.equal(auto[k], expected[k]) for k in auto)
    assert any(not torch.equal(auto[k], different[k]) for k in auto)


def test_loftq_without_full_precision_safetensors_says_what_it_needs(tmp_path):
    from qlora_lab import adapters
    from qlora_lab.errors import UserError

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="neither model.safetensors nor model.safetensors.index.json"):
        adapters._full_precision_weights(str(tmp_path))
