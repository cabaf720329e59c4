"""Every adapter through the same SFTTrainer loop, on a 4-bit and a 16-bit base: what trains, what must not
change, and that the saved adapter reloads with plain peft to the same logits."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qlora_lab import train as train_mod
from qlora_lab.config import validate
from qlora_lab.errors import ConfigError
from tests.conftest import TINY, compose_train

ADAPTERS = ["lora", "rslora", "dora", "pissa", "olora", "loftq", "prefix", "prompt", "ptuning", "ia3", "full"]
REFUSED = {("full", "nf4"), ("pissa", "nf4"), ("olora", "nf4"), ("loftq", "none")}  # see test_refused_combinations
FAST = [*TINY, "trainer.max_steps=2", "score_before=false", "data.task_eval_samples=0", "trainer.save_strategy=no",
        "trainer.learning_rate=5e-3"]


def cases():
    for adapter in ADAPTERS:
        for quant in ("nf4", "none"):
            if (adapter, quant) in REFUSED:
                continue
            # peft's LoftQ computes on CUDA only (refused on CPU: test_refused_combinations)
            yield pytest.param(adapter, quant, marks=pytest.mark.gpu) if adapter == "loftq" else (adapter, quant)
    yield "lora", "fp4"
    yield "lora", "int8"
    yield "lora", "nf4-single"
    yield "prompt-text", "nf4"  # prompt tuning initialised from real token embeddings


def reload_plain(cfg, run_dir):
    """The trained model as a user would rebuild it: transformers + bitsandbytes + plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lab.models import _disable_cpu_inference_repacking, quantization_config, resolve_dtype, resolve_model_path

    from qlora_lab.models import device_map
    kwargs = dict(device_map=device_map(), dtype=resolve_dtype(cfg.model.dtype))
    if cfg.adapter.method == "full":
        return AutoModelForCausalLM.from_pretrained(run_dir / "adapter", **kwargs)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                quantization_config=quantization_config(cfg.quant), **kwargs)
    _disable_cpu_inference_repacking(base)  # compare on the training kernel (see qlora_lab/models.py)
    # adapters on a 4-bit base were trained (and saved) in bf16: keep that dtype rather than upcasting
    return PeftModel.from_pretrained(base, run_dir / "adapter", autocast_adapter_dtype=cfg.quant.method == "none")


@pytest.mark.integration
@pytest.mark.parametrize("adapter, quant", cases())
def test_adapter_trains_only_itself_and_reloads(tmp_path, captured, adapter, quant):
    extra = ["adapter.prompt_init_text=Extract the facts as JSON:"] if adapter == "prompt-text" else []
    adapter = adapter.removesuffix("-text")
    cfg = compose_train([*FAST, f"adapter={adapter}", f"quant={quant}", *extra], tmp_path)
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

    # base weights bit-identical; adapter weights moved
    changed = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert changed, "no trainable weight changed"
    if quant != "none":
        import bitsandbytes as bnb
        kind = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
        assert any(isinstance(m, kind) for m in model.modules())

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
    # Within bf16 rounding (eps 7.8e-3): the run computes in bf16 autocast, and an fp32 adapter (DoRA magnitude,
    # p-tuning MLP) or a bf16 base rounds in a slightly different order after reloading. PiSSA/OLoRA are saved
    # converted to plain rank-2r LoRA on the original base, which drops the bf16 rounding of their residual base.
    tol = 2e-2 if adapter in ("pissa", "olora") else 1e-2
    assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item()), (a - b).abs().max()


@pytest.mark.parametrize("adapter, quant, needle", [
    ("full", "nf4", "quantized weights cannot be trained directly"),
    ("pissa", "nf4", "PiSSA moves the principal components"),
    ("loftq", "none", "LoftQ initialises LoRA to cancel the 4-bit"),
    ("olora", "nf4", "OLoRA rewrites the base weights as a residual"),
])
def test_refused_combinations(adapter, quant, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(compose_train([f"adapter={adapter}", f"quant={quant}"]))


def test_loftq_without_cuda_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="LoftQ computes its SVDs there"):
        validate(compose_train(["adapter=loftq", "quant=nf4"]))


def test_prefix_with_activation_checkpointing_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing=false"):
        validate(compose_train(["adapter=prefix", "trainer.gradient_checkpointing=true"]))


def test_fast_dropout_has_dropouts_distribution_and_gradient():
    from qlora_lab.adapters import FastDropout

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
    from qlora_lab import adapters

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
    from qlora_lab import kernels
    from qlora_lab.adapters import FastDropout

    train_mod.train(compose_train([*TINY, f"adapter.dropout_impl={impl}", "trainer.max_steps=2", "score_before=false",
                                   "data.task_eval_samples=0", "trainer.save_strategy=no"], tmp_path))
    trainer = captured["trainer"]
    model = trainer.model
    fast = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(fast) == 14 and not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    recompute = impl == "auto"                                        # auto = recompute on CPU
    assert all(m.recompute == recompute for m in fast) and trainer._recompute_dropout == recompute
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in b)                         # gradients reached every adapter
    # the CPU default kernels=auto is lean: every RMSNorm and MLP of the tiny Llama runs the lean forward
    assert trainer.kernels == "lean"
    lean = [m for m in model.modules() if getattr(m.forward, "__func__", None) in (kernels._rmsnorm_forward,
                                                                                    kernels._mlp_forward)]
    assert len(lean) == 2 * 2 + 1 + 2                                # 2 layers x 2 norms, final norm, 2 MLPs
