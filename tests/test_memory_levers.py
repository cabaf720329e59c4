"""Budget mode and activation offloading: the plan's choice, the CUDA cap, and exact behaviour with the lever on.

Offloading is TRL's (torchtune's OffloadActivations). It runs only on an accelerator; on CPU the tests build it
with the CPU standing in for the device and without its side stream (TRL's single-stream path; the stream path
needs CUDA: the GPU-gated test), so every saved activation it takes is copied to a separate host buffer in forward
and read from there in backward — whose result must equal training without it.
"""

from __future__ import annotations

import dataclasses
import types
from unittest import mock

import pytest
import torch

from qlora_lab import measure, plan
from tests.conftest import TINY, compose_train

CPU = plan.Machine(device="cpu", accelerator="cpu", bf16=True, world_size=1)
GPU24 = dataclasses.replace(CPU, device="cuda", accelerator="cuda", gpu_name="X", gpu_memory_gb=24.0)
# settings whose estimate the tests compute by hand (not the size rules' r=auto / skip_modules=auto)
FIXED = ["model=tiny-random", "adapter.r=16", "adapter.alpha=32", "quant.skip_modules=[]",
         "trainer.per_device_train_batch_size=64"]
SHAPE = (400, 0.1)


def _model_config():
    from transformers import LlamaConfig

    # 8 layers: with every layer checkpointed, the 8 kept layer inputs are what offloading takes off the device
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)


def _estimates(model_config, machine_kernels="none", dropout="torch"):
    from qlora_lab import estimate

    kwargs = dict(quant="nf4", adapter="lora", r=16, dropout=0.05, dropout_impl=dropout, kernels=machine_kernels,
                  batch=64, seq_len=400, loss="selective", loss_tokens=0.1)
    return {key: estimate.estimate(model_config, **kwargs, checkpointing=share, offload=off)["total_bytes"] / 2**30
            for key, share, off in (("none", False, False), ("every", True, False), ("offload", True, True))}


def test_the_budget_plan_offloads_only_when_every_layer_checkpointed_still_does_not_fit():
    model_config = _model_config()
    est = _estimates(model_config)  # on CUDA: kernels none, torch dropout
    assert est["none"] > est["every"] > est["offload"]

    def planned(budget, *extra, machine=GPU24):
        return plan.make(compose_train([*FIXED, f"memory_budget_gb={budget}", *extra]), machine, model_config, SHAPE)

    fits_checkpointed = planned(est["every"] * 1.0001)
    assert (fits_checkpointed.checkpoint_every, fits_checkpointed.offload_activations) == (1, False)
    tight = planned(est["every"] * 0.9999)
    assert (tight.checkpoint_every, tight.checkpointing_by, tight.offload_activations) == (1, "budget", True)
    assert tight.estimated_gb == pytest.approx(est["offload"], abs=0.01)
    assert any("activations offloaded to host memory" in n for n in tight.notes)
    assert "activations offloaded to host" in plan.describe(tight)
    assert tight.resolved()["offload_activations"] is True
    assert planned(0.001, "objective=dpo").offload_activations is False  # auto: SFT only
    # recompute dropout's saved-tensor hooks would take the saved tensors from the offloader: fast instead, said
    recomputed = planned(_estimates(model_config, dropout="recompute")["every"] * 0.9999,
                         "adapter.dropout_impl=recompute")
    assert (recomputed.offload_activations, recomputed.dropout_impl) == (True, "fast")
    assert any("dropout_impl=recompute: fast instead" in n for n in recomputed.notes)
    # asked on with a budget the offloaded step fits: no checkpointing on top
    assert planned(est["offload"] * 1.01, "offload_activations=true").checkpoint_every == 0
    # asked off: the budget cannot be met, every layer is checkpointed, nothing offloaded
    assert planned(est["every"] * 0.9999, "offload_activations=false").offload_activations is False
    # asked on: on, whatever the budget (no budget: no checkpointing)
    forced = planned("null", "offload_activations=true")
    assert (forced.checkpoint_every, forced.offload_activations) == (0, True)
    # CPU: activations are in host memory already; true is turned off and the plan says so
    on_cpu = planned("null", "offload_activations=true", machine=CPU)
    assert on_cpu.offload_activations is False
    assert any("offload_activations=true: off" in n for n in on_cpu.notes)
    assert planned(0.001, machine=CPU).offload_activations is False  # auto on CPU: never


def test_offload_activations_takes_true_false_or_auto():
    from qlora_lab.errors import ConfigError
    from qlora_lab.validate import validate

    with pytest.raises(ConfigError, match=r"offload_activations='yes': give true, false or auto"):
        validate(compose_train([*TINY, "offload_activations=yes"]))
    with pytest.raises(ConfigError, match=r"offload_activations=1: give true, false or auto"):
        validate(compose_train([*TINY, "offload_activations=1"]))  # 1 == True in Python; not a switch here
    for ok in ("true", "false", "auto"):
        validate(compose_train([*TINY, f"offload_activations={ok}"]))


def test_a_numeric_budget_caps_the_processs_cuda_memory(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                 get_device_properties=lambda d: types.SimpleNamespace(total_memory=80 * 2**30),
                                 set_per_process_memory_fraction=lambda f, d: calls.append((f, d)))
    monkeypatch.setattr(measure.torch, "cuda", fake)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert measure.limit_cuda_memory(24) == pytest.approx(0.3)
    assert calls == [(pytest.approx(0.3), 1)]
    assert measure.limit_cuda_memory(200) == 1.0  # a budget above the card: the whole card
    for no_cap in ("auto", None, True):  # no cap, and an earlier one lifted (a sweep's jobs share a process)
        assert measure.limit_cuda_memory(no_cap) is None
    assert calls[2:] == [(1.0, 1)] * 3
    monkeypatch.setattr(fake, "is_available", lambda: False)
    assert measure.limit_cuda_memory(24) is None and len(calls) == 5


def _cpu_offloader(packed: list[bool]):
    """TRL's get_act_offloading_ctx_manager with the CPU standing in for the accelerator (TRL's class reads
    torch.accelerator, None on a CPU-only build, and calls the device module's empty_cache, which torch.cpu lacks);
    ``packed`` gets, per saved tensor, whether it was offloaded (copied to a separate buffer)."""
    from trl.models import activation_offloading as ao

    real = ao.get_act_offloading_ctx_manager

    def build(model, **kwargs):
        with mock.patch.object(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu")):
            ctx = real(model, use_pin_memory=False, use_streams=False)
        ctx.device_module = types.SimpleNamespace(stream=torch.cpu.stream, current_stream=torch.cpu.current_stream,
                                                  Stream=torch.cpu.Stream, empty_cache=lambda: None)
        pack = ctx.pack_hook

        def counting(tensor):
            key = pack(tensor)
            packed.append(ctx.tracker[key][1])
            return key

        ctx.pack_hook = counting
        return ctx

    return build


@pytest.mark.integration
@pytest.mark.parametrize("checkpointing", [True, False])
def test_offloaded_activations_train_exactly_as_kept_ones(tmp_path, captured, monkeypatch, checkpointing):
    """The same losses and the same adapter after 3 steps with TRL's offloading on (every checkpointed layer input
    and saved activation copied out) as without — through train(), with the default 4-bit base, the selective
    loss, the lean kernels and LoRA dropout."""
    from trl.trainer import sft_trainer

    from qlora_lab import train as train_mod

    # LoRA dropout kept (0.05, the CPU plan's recomputed FastDropout): its seeded draws are the same with offloading,
    # and its own saved-tensor hooks must stand aside for the offloader's (sft.py), or nothing would be offloaded
    exact = ["model.dtype=float32", "quant.compute_dtype=float32", "trainer.bf16=false",
             "score_before=false", "data.task_eval_samples=0", "trainer.save_strategy=no", "memory_budget_gb=null",
             f"trainer.gradient_checkpointing={str(checkpointing).lower()}"]
    real_make = plan.make
    results = {}
    for offload in (False, True):
        packed: list[bool] = []
        monkeypatch.setattr(sft_trainer, "get_act_offloading_ctx_manager", _cpu_offloader(packed))
        # the plan turns offloading on only on CUDA; here it is set on the CPU plan, as the plan sets it on a GPU
        monkeypatch.setattr(plan, "make", lambda *a, **k: dataclasses.replace(real_make(*a, **k),
                                                                              offload_activations=offload))
        metrics = train_mod.train(compose_train([*TINY, *exact], tmp_path / str(offload)))
        trainer = captured["trainer"]
        assert metrics["status"] == "completed" and trainer.args.activation_offloading is offload
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[offload] = (losses, adapter, packed)
    (losses, adapter, none_packed), (off_losses, off_adapter, packed) = results[False], results[True]
    assert not none_packed and sum(packed) > 0  # the lever really moved tensors, and only when on
    assert len(losses) == 3 and off_losses == pytest.approx(losses, rel=1e-6)
    for name, value in adapter.items():
        torch.testing.assert_close(off_adapter[name], value, rtol=1e-6, atol=1e-7)
    assert all(v.abs().sum() > 0 for n, v in off_adapter.items() if "lora_B" in n)  # every B moved


@pytest.mark.gpu
def test_on_a_gpu_offloading_moves_activations_to_the_host_and_the_budget_cap_raises_oom():
    """On CUDA, TRL's offloading as train() enters it (streams, pinned memory): a 4-layer Llama whose saved
    activations dominate (seq 4096, batch 4, hidden 512), one forward and backward with and without — the same loss
    and gradients, and under half the peak allocated memory; then a 1 GiB cap makes a 2 GiB allocation fail."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=1024)
    model = LlamaForCausalLM(config).cuda().train()
    ids = torch.randint(0, 1024, (4, 4096), device="cuda")
    results = {}
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ctx = get_act_offloading_ctx_manager(model) if offload else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t)
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        results[offload] = (loss.item(), [p.grad.clone() for p in model.parameters()],
                            torch.cuda.max_memory_allocated() - base)
    (loss, grads, peak), (off_loss, off_grads, off_peak) = results[False], results[True]
    assert off_loss == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, off_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert off_peak < 0.5 * peak, (off_peak, peak)
    try:
        measure.limit_cuda_memory(1)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
