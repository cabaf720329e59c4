"""Training the tiny random model end to end through `train(cfg)`: what changes, what must not, and resume."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from qlora_lab import train as train_mod
from tests.conftest import TINY, compose_train

pytestmark = pytest.mark.integration


def test_nf4_lora_trains_only_the_adapter(tmp_path, captured):
    metrics = train_mod.train(compose_train(TINY, tmp_path))
    trainer = captured["trainer"]
    model = trainer.model

    # only adapter weights are trainable, and the count is peft's own
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert metrics["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert (metrics["trainable_params"], metrics["total_params"]) == model.get_nb_trainable_parameters()

    # the 4-bit base is really 4-bit, and bit-identical after training; the adapter moved
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    after = dict(model.named_parameters())
    for name, old in captured["before"].items():
        same = torch.equal(old, after[name].detach())
        assert same != (name in trainable), name
    lora_b = [n for n in trainable if "lora_B" in n]
    assert lora_b and all(captured["before"][n].abs().sum() == 0 for n in lora_b)  # peft inits B at zero

    # run directory
    out = tmp_path
    for rel in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                "checkpoints/checkpoint-2", "metrics.json", "report.md"]:  # .hydra/ comes from the shell: test_cli
        assert (out / rel).exists(), rel
    saved = json.loads((out / "metrics.json").read_text())
    for key in ["eval_loss", "train_loss", "task_score_before", "task_score_after", "train_runtime_s",
                "tokens_per_s", "peak_mem_mb", "trainable_params", "total_params"]:
        assert saved[key] is not None, key
    assert saved["status"] == "completed" and saved["global_step"] == 3
    assert saved["train_tokens"] > 0 and saved["tokens_per_s"] > 0
    assert "before" in (out / "report.md").read_text()
    env = json.loads((out / "environment.json").read_text())
    assert env["versions"]["peft"] and env["versions"]["trl"] and env["seed"] == 42 and env["device"] in ("cpu", "cuda")


def test_saved_adapter_reloads_with_plain_peft_to_the_same_logits(tmp_path, captured):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = compose_train(TINY, tmp_path)
    train_mod.train(cfg)
    trained = captured["trainer"].model.eval()

    from qlora_lab.models import (
        _disable_cpu_inference_repacking,
        device_map,
        quantization_config,
        resolve_dtype,
        resolve_model_path,
    )
    kept = json.loads((tmp_path / "plan.json").read_text())["resolved"]["quant.skip_modules"]  # the 4-bit layers
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-random"),
                                                quantization_config=quantization_config(cfg.quant, skip_modules=kept),
                                                device_map=device_map(), dtype=resolve_dtype(cfg.model.dtype))
    # autocast_adapter_dtype=False keeps the adapter in the dtype it was trained and saved in (bf16 for QLoRA)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter", autocast_adapter_dtype=False).eval()
    ids = torch.tensor([[1, 520, 3300, 42, 17, 998, 2]], device=trained.device)
    # On AVX512-BF16 CPUs, plain bitsandbytes would run this eval forward on its packed inference kernel (another
    # bf16 rounding order); compare both models on the same kernel (see qlora_lab/models.py for why).
    _disable_cpu_inference_repacking(reloaded)
    with torch.no_grad():
        a = trained(input_ids=ids).logits.float()
        b = reloaded(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
    with torch.no_grad(), reloaded.disable_adapter():
        c = reloaded(input_ids=ids).logits.float()
    assert not torch.allclose(b, c, atol=1e-4)  # and the adapter does something


def test_resume_continues_from_the_newest_complete_checkpoint(tmp_path):
    first = train_mod.train(compose_train([*TINY, "trainer.max_steps=2", "trainer.save_steps=1"], tmp_path))
    assert first["global_step"] == 2 and (tmp_path / "checkpoints/checkpoint-2/trainer_state.json").is_file()
    # a checkpoint whose save was interrupted (no trainer_state.json) must be ignored
    (tmp_path / "checkpoints/checkpoint-9").mkdir()
    second = train_mod.train(compose_train([*TINY, "trainer.max_steps=4", "trainer.save_steps=1"], tmp_path))
    assert second["resumed_from"].endswith("checkpoint-2")
    assert second["global_step"] == 4
    state = json.loads((tmp_path / "checkpoints/checkpoint-4/trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 from the resumed one: none repeated
    assert second["task_score_before"] == first["task_score_before"]  # carried over, not recomputed


def test_a_completed_run_is_not_trained_again_and_a_resume_keeps_its_settings(tmp_path):
    from qlora_lab.errors import UserError

    run = [*TINY, "trainer.max_steps=2", "trainer.save_steps=1", "score_before=false", "data.task_eval_samples=0"]
    train_mod.train(compose_train(run, tmp_path))
    first = OmegaConf.load(tmp_path / "config.yaml")  # the config it trained with, resolved
    assert first.adapter.r == "auto" and first.output_dir == str(tmp_path)
    # the tiny model is under 1B parameters: auto's 64, capped at its smallest layer size (k/v_proj: 64 -> 32)
    assert json.loads((tmp_path / "plan.json").read_text())["resolved"]["adapter.r"] == 32
    written = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    with pytest.raises(UserError, match="holds a completed run .2 steps"):  # the same command again
        train_mod.train(compose_train(run, tmp_path))
    with pytest.raises(UserError, match=r"adapter.r: 'auto' at the start, 8 now(.|\n)*Fix: rerun with the settings in"):
        train_mod.train(compose_train([*run, "trainer.max_steps=3", "adapter.r=8"], tmp_path))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == written  # nothing touched

    longer = train_mod.train(compose_train([*run, "trainer.max_steps=3"], tmp_path))  # training it longer is fine
    assert longer["global_step"] == 3 and longer["resumed_from"].endswith("checkpoint-2")
    assert OmegaConf.load(tmp_path / "config.yaml") == first  # still the first start's


def test_plain_lora_without_quantization(tmp_path, captured):
    metrics = train_mod.train(compose_train([*TINY, "quant=none", "score_before=false"], tmp_path))
    import bitsandbytes as bnb
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in captured["trainer"].model.modules())
    assert metrics["status"] == "completed" and "task_score_before" not in metrics


@pytest.mark.parametrize("fmt", ["messages.jsonl", "instruction.json", "text.csv"])
def test_user_data_formats_train(tmp_path, fmt):
    from pathlib import Path

    path = Path(__file__).parent / "data" / fmt
    metrics = train_mod.train(compose_train([*TINY, "data=file", f"data.path={path}", "trainer.max_steps=2",
                                             "data.eval_fraction=0.3"], tmp_path))
    assert metrics["status"] == "completed"
    assert metrics["task_metric"] == ("none" if fmt == "text.csv" else "exact_match")


def test_the_loss_covers_only_the_answer(tmp_path, captured):
    train_mod.train(compose_train([*TINY, "trainer.max_steps=1", "score_before=false", "data.task_eval_samples=0",
                                   "trainer.save_strategy=no"], tmp_path))
    trainer = captured["trainer"]
    tokenizer = trainer.processing_class
    raw = trainer.train_dataset
    for row in raw.select(range(4)):
        labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert row["labels"][0] == -100 and labelled  # the prompt (system, user turn) is masked, the answer is not
        # exactly the answer and the end of its turn (TRL's completion-only loss on conversational rows)
        answer = tokenizer.decode(labelled)
        assert answer.endswith("<|im_end|>\n") and "<|im_start|>" not in answer
        assert answer.removesuffix("<|im_end|>\n").strip().startswith("{")  # the demo task's JSON answer


def test_selective_native_and_fused_loss_paths_train_the_same_adapter(tmp_path, captured):
    losses, adapters = {}, {}
    for loss in ("selective", "native", "fused"):
        # float32 and no dropout: the three paths must agree to float rounding, step by step
        train_mod.train(compose_train([*TINY, f"loss={loss}", "trainer.max_steps=2", "score_before=false",
                                       "quant=none", "model.dtype=float32", "trainer.bf16=false", "adapter.dropout=0",
                                       "data.task_eval_samples=0", "trainer.save_strategy=no"], tmp_path / loss))
        trainer = captured["trainer"]
        assert trainer.loss_impl == loss
        losses[loss] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        adapters[loss] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(losses["native"]) == 2
    assert losses["selective"] == pytest.approx(losses["native"], rel=1e-5)
    assert losses["native"] == pytest.approx(losses["fused"], rel=1e-4)
    for name, value in adapters["native"].items():
        torch.testing.assert_close(adapters["selective"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_liger_kernels_train_like_the_models_own_modules(tmp_path, captured):
    """kernels=liger (Triton RMSNorm, RoPE, SwiGLU) against kernels=none: same losses step by step in float32; and
    QLoRA (NF4) with Liger trains. The none run goes first: Liger's patch is
    process-wide."""
    exact = [*TINY, "trainer.max_steps=3", "score_before=false", "quant=none", "model.dtype=float32",
             "trainer.bf16=false", "adapter.dropout=0", "data.task_eval_samples=0", "trainer.save_strategy=no"]
    losses = {}
    for kernels in ("none", "liger"):
        train_mod.train(compose_train([*exact, f"kernels={kernels}"], tmp_path / kernels))
        trainer = captured["trainer"]
        assert trainer.args.use_liger_kernel == (kernels == "liger")
        losses[kernels] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert type(trainer.model.get_base_model().model.layers[0].mlp).__name__ == "LigerSwiGLUMLP"
    assert len(losses["none"]) == 3 and losses["liger"] == pytest.approx(losses["none"], rel=1e-4)

    metrics = train_mod.train(compose_train([*TINY, "trainer.max_steps=2", "score_before=false", "kernels=liger"],
                                            tmp_path / "qlora"))
    assert captured["trainer"].args.use_liger_kernel and metrics["train_loss"] > 0


def test_chunked_lm_loss_matches_one_pass_in_value_and_gradients(monkeypatch):
    from qlora_lab import sft

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (300,))
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    ref_grad = torch.autograd.grad(ref, [hidden, head.weight])
    monkeypatch.setattr(sft, "CHUNK_LOGITS", 1000 * 128)  # 128-token chunks: 3 of them, recomputed in backward
    got = sft.chunked_lm_loss(hidden, head, targets)
    got_grad = torch.autograd.grad(got, [hidden, head.weight])
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grad, ref_grad):
        torch.testing.assert_close(g, r)


def test_chunked_lm_loss_without_gradients_keeps_at_most_an_eval_chunk_of_logits():
    """Evaluation (no grad): the same sum, with at most EVAL_CHUNK_LOGITS logits (or 128 rows) alive at once."""
    from torch.overrides import TorchFunctionMode

    from qlora_lab import sft

    class LogitShapes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.nn.functional.linear:
                self.rows.append(out.shape[0])
            return out

    torch.manual_seed(0)
    vocab = 49152  # SmolLM2's: 2**22 logits are 85 rows, so 128-row chunks
    head = torch.nn.Linear(16, vocab, bias=False)
    hidden, targets = torch.randn(700, 16), torch.randint(0, vocab, (700,))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
        with LogitShapes() as seen:
            got = sft.chunked_lm_loss(hidden, head, targets)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    assert max(seen.rows) == max(128, sft.EVAL_CHUNK_LOGITS // vocab) == 128 and sum(seen.rows) == 700


def test_selective_loss_falls_back_where_positions_do_not_line_up(tmp_path, captured):
    train_mod.train(compose_train([*TINY, "adapter=prompt", "loss=selective", "trainer.max_steps=1",
                                   "score_before=false", "data.task_eval_samples=0", "trainer.save_strategy=no"],
                                  tmp_path))
    assert captured["trainer"].loss_impl == "native"


@pytest.mark.parametrize("skip", ["auto", "[down_proj]", "[]"])
def test_quant_skip_modules_stay_in_16_bit_and_the_run_rebuilds_the_same_base(tmp_path, captured, skip):
    """auto (the default) on a model under 1B parameters = [down_proj] in 16-bit; [] = every linear layer in 4-bit.
    The plan records it, and what merge/chat rebuild from the run has the same layers in 4-bit."""
    import bitsandbytes as bnb

    from qlora_lab.runs import load_run, load_trained

    run_dir = tmp_path / "run"
    train_mod.train(compose_train([*TINY, f"quant.skip_modules={skip}", "trainer.max_steps=1", "score_before=false",
                                   "data.task_eval_samples=0", "trainer.save_strategy=no"], run_dir))
    expected = [] if skip == "[]" else ["down_proj"]
    assert json.loads((run_dir / "plan.json").read_text())["resolved"]["quant.skip_modules"] == expected

    def four_bit(model) -> dict[str, bool]:
        return {n.split(".")[-2]: isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules()
                if n.endswith(("down_proj.base_layer", "up_proj.base_layer", "q_proj.base_layer"))}

    trained = four_bit(captured["trainer"].model)
    assert trained == {"down_proj": not expected, "up_proj": True, "q_proj": True}
    assert four_bit(load_trained(load_run(str(run_dir)))[0]) == trained


def test_skip_modules_auto_keeps_down_proj_only_for_small_4_bit_models():
    from omegaconf import OmegaConf

    from qlora_lab.models import SMALL_MODEL_PARAMS, resolve_skip_modules

    def q(**kw):
        return OmegaConf.create({"method": "nf4", "skip_modules": "auto", **kw})

    assert resolve_skip_modules(q(), total_params=135_000_000) == ["down_proj"]
    assert resolve_skip_modules(q(method="fp4"), total_params=SMALL_MODEL_PARAMS - 1) == ["down_proj"]
    assert resolve_skip_modules(q(), total_params=SMALL_MODEL_PARAMS) == []  # 1B and up: every layer in 4-bit
    assert resolve_skip_modules(q(method="int8"), total_params=135_000_000) == []
    assert resolve_skip_modules(q(skip_modules=[]), total_params=135_000_000) == []
    assert resolve_skip_modules(q(skip_modules=["o_proj"]), total_params=8_000_000_000) == ["o_proj"]


def test_rank_auto_is_64_under_1b_parameters_and_alpha_auto_twice_the_rank():
    from omegaconf import OmegaConf

    from qlora_lab.models import SMALL_MODEL_PARAMS, resolve_rank

    def a(**kw):
        return OmegaConf.create({"r": "auto", "alpha": "auto", **kw})

    assert resolve_rank(a(), 135_000_000) == (64, 128)
    assert resolve_rank(a(), SMALL_MODEL_PARAMS) == (16, 32)
    assert resolve_rank(a(), None) == (16, 32)  # size unknown: the large-model rank
    assert resolve_rank(a(r=8), 135_000_000) == (8, 16)
    assert resolve_rank(a(r=8, alpha=4), 135_000_000) == (8, 4)
    assert resolve_rank(a(alpha=16), 135_000_000) == (64, 16)
    assert resolve_rank(a(), 135_000_000, smallest_dim=32) == (32, 64)  # never above a layer's size (tiny models)
    assert resolve_rank(a(r=128), 135_000_000, smallest_dim=32) == (128, 256)  # a number is the user's


def test_the_plan_keeps_an_8b_model_all_4_bit_and_its_estimate_counts_16_bit_layers():
    """The shipped 8B architecture (config only) resolves auto to nothing; a 16-bit down_proj costs what it should."""
    from qlora_lab import estimate, models, plan

    cfg = compose_train(["model=llama-3.1-8b-arch"])
    model_config = models.arch_config("llama-3.1-8b-arch")  # the config only: no 8B of random weights built
    machine = plan.Machine(device="cpu", accelerator="cpu", bf16=True, world_size=1)
    the_plan = plan.make(cfg, machine, model_config)
    assert the_plan.skip_modules == () and (the_plan.lora_r, the_plan.lora_alpha) == (16, 32)
    counts = estimate.count_params(model_config)
    down = counts["linear_by_name"]["down_proj"]
    assert down == 32 * 4096 * 14336
    all4 = estimate.estimate(model_config, counts=counts)["weights_bytes"]
    kept = estimate.estimate(model_config, counts=counts, skip_modules=("down_proj",))["weights_bytes"]
    assert kept - all4 == pytest.approx(down * (2 - estimate.NF4_BYTES[True]), abs=2)


def test_memory_budget_checkpoints_every_nth_layer_and_trains_the_same_adapter(tmp_path, captured):
    exact = ["quant=none", "model.dtype=float32", "trainer.bf16=false", "adapter.dropout=0", "trainer.max_steps=2",
             "score_before=false", "data.task_eval_samples=0", "trainer.save_strategy=no"]
    adapters = {}
    for budget in ("null", "0.001"):  # 1 MiB: nothing fits, so every layer (n=1) is checkpointed
        train_mod.train(compose_train([*TINY, *exact, f"memory_budget_gb={budget}"], tmp_path / budget))
        trainer = captured["trainer"]
        args = trainer.args
        if budget == "null":
            assert not args.activation_checkpointing
        else:
            assert args.activation_checkpointing and args.activation_checkpointing_kwargs["every_n_layers"] == 1
            layers = trainer.model.get_base_model().model.layers
            assert all(layer.gradient_checkpointing for layer in layers)
        adapters[budget] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    # recomputing activations must not change a thing: the same adapter after 2 steps, every layer's A and B moved
    for name, value in adapters["null"].items():
        torch.testing.assert_close(adapters["0.001"][name], value, rtol=1e-5, atol=1e-6)
    assert all(v.abs().sum() > 0 for n, v in adapters["0.001"].items() if "lora_B" in n)


def test_checkpoint_every_n_picks_the_fewest_layers_that_fit():
    """The plan checkpoints every n-th layer with the largest n whose estimate fits memory_budget_gb."""
    from omegaconf import open_dict

    from qlora_lab import estimate, models, plan

    # the estimate below is computed with these settings (not the size rules' r=auto / skip_modules=auto)
    cfg = compose_train(["model=tiny-random", "adapter.r=16", "adapter.alpha=32", "quant.skip_modules=[]"])
    path = models.resolve_model_path(cfg.model.name_or_path)
    model_config = models.model_config(cfg.model, path)
    machine = plan.Machine(device="cpu", accelerator="cpu", bf16=True, world_size=1)
    shape = (400, 0.1)
    with open_dict(cfg):
        cfg.trainer.per_device_train_batch_size = 64

    def planned(budget):
        with open_dict(cfg):
            cfg.memory_budget_gb = budget
        p = plan.make(cfg, machine, model_config, shape)
        return p.checkpoint_every, p.checkpointing_by

    kwargs = dict(quant="nf4", adapter="lora", r=16, dropout=0.05, dropout_impl="recompute", kernels="lean",
                  batch=64, seq_len=400, loss="selective", loss_tokens=0.1)
    none, half, every = (estimate.estimate(model_config, **kwargs, checkpointing=share)["total_bytes"] / 2**30
                         for share in (False, 0.5, True))
    assert none > half and none > every
    assert planned(none) == (0, "none")                      # fits as it is
    assert planned(none * (1 - 1e-6)) == (2, "budget")       # n=2: the largest n (2 layers)
    assert planned(half) == (2, "budget")
    assert planned(min(half, every) * (1 - 1e-6)) == (1, "budget")  # nothing fits: every layer
    assert planned(None) == (0, "none")
    assert planned("auto") == (0, "none")                    # auto on CPU: no budget


@pytest.mark.parametrize("batching", ["shuffled", "padding_free"])
def test_batching_modes_train_and_padding_free_keeps_max_length_and_row_boundaries(tmp_path, captured, batching):
    metrics = train_mod.train(compose_train([*TINY, f"batching={batching}", "trainer.max_length=115",
                                             "trainer.max_steps=2", "score_before=false",
                                             "data.task_eval_samples=0", "trainer.save_strategy=no"], tmp_path))
    trainer = captured["trainer"]
    assert metrics["status"] == "completed"
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) <= 115  # rows truncated to max_length
    assert all(any(x != -100 for x in labels) for labels in trainer.train_dataset["labels"])
    if batching == "padding_free":
        assert trainer.args.padding_free and trainer.args.max_length is None  # TRL's own check, sidestepped
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # one row, positions restart per row
        # attention stays inside each row: every row's logits in the packed batch equal the row's logits alone
        model = trainer.model.eval()
        ids, pos = batch["input_ids"].to(model.device), batch["position_ids"].to(model.device)
        starts = [i for i in range(ids.shape[1]) if pos[0, i] == 0] + [ids.shape[1]]
        assert len(starts) > 2  # at least two rows packed
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=pos).logits[0].float()
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=ids[:, a:b]).logits[0].float()
                torch.testing.assert_close(packed[a:b], alone, rtol=0.02, atol=0.02)
    else:
        assert trainer.args.train_sampling_strategy == "random"


def test_default_batching_groups_rows_by_length_in_an_order_drawn_from_the_seed(tmp_path, captured):
    train_mod.train(compose_train([*TINY, "trainer.max_steps=1", "score_before=false", "data.task_eval_samples=0",
                                   "trainer.save_strategy=no"], tmp_path))
    trainer = captured["trainer"]
    assert trainer.args.train_sampling_strategy == "group_by_length"
    sampler = trainer._get_train_sampler()
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert list(sampler.lengths) == lengths
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    # transformers' grouping: megabatches of min(rows // (4 x batch), 50) batches (here 2 x 4 rows), each sorted
    # longest first; only a megabatch's first row may be swapped (the longest row of all goes first)
    size = max(1, min(len(lengths) // 16, 50)) * 4
    assert len(lengths) >= 2 * size  # several megabatches: their make-up depends on the random draw
    for start in range(0, len(order), size):
        group = [lengths[i] for i in order[start:start + size]][1:]
        assert group == sorted(group, reverse=True), (start, group)
    # the order is drawn from (seed, epoch) alone, so that a resumed run skips exactly the batches it trained:
    # whatever drew from the global RNG in between (the before-training evaluation on a fresh run) changes nothing
    torch.manual_seed(1234)
    torch.rand(100)
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order  # each epoch its own order
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_a_trainer_that_would_use_dataparallel_is_refused_at_build(tmp_path, monkeypatch):
    """The Trainer's own GPU count (TrainingArguments.n_gpu) decides at build, whatever the validator saw."""
    from trl import SFTConfig

    from qlora_lab.errors import UserError

    monkeypatch.setattr(SFTConfig, "n_gpu", property(lambda self: 2))
    with pytest.raises(UserError, match="torch.nn.DataParallel.*torchrun --nproc_per_node=2"):
        train_mod.train(compose_train([*TINY, "quant=none", "score_before=false", "data.task_eval_samples=0"],
                                      tmp_path))
    assert not (tmp_path / "adapter").exists()


def test_gradient_accumulation_equals_the_same_global_batch_with_the_selective_loss(tmp_path, captured):
    """4 rows x 2 accumulated micro-batches and 8 rows in one batch: the same losses and the same adapter (the
    selective loss divides each micro-batch's sum by the whole step's label count, as the model's own loss does).
    float32 throughout and no dropout, so that the only difference is how the batch is split."""
    from safetensors.torch import load_file

    def run(name, batch, accumulate):
        cfg = compose_train([*TINY, "quant=none", "model.dtype=float32", "trainer.bf16=false", "adapter.dropout=0",
                             "loss=selective", "batching=shuffled", "trainer.max_steps=2", "trainer.warmup_steps=0",
                             f"trainer.per_device_train_batch_size={batch}",
                             f"trainer.gradient_accumulation_steps={accumulate}", "score_before=false",
                             "data.task_eval_samples=0", "trainer.save_strategy=no"], tmp_path / name)
        metrics = train_mod.train(cfg)
        assert captured["trainer"].loss_impl == "selective"
        losses = [h["loss"] for h in captured["trainer"].state.log_history if "loss" in h]
        return losses, metrics["eval_loss"], load_file(tmp_path / name / "adapter/adapter_model.safetensors")

    (losses_ga, eval_ga, adapter_ga), (losses_one, eval_one, adapter_one) = run("ga", 4, 2), run("one", 8, 1)
    assert len(losses_ga) == len(losses_one) == 2
    assert losses_ga == pytest.approx(losses_one, rel=1e-5)
    assert eval_ga == pytest.approx(eval_one, rel=1e-5)
    assert adapter_ga.keys() == adapter_one.keys()
    for key in adapter_ga:
        torch.testing.assert_close(adapter_ga[key], adapter_one[key], rtol=1e-4, atol=1e-6)
    assert any(adapter_one[k].abs().sum() > 0 for k in adapter_one if "lora_B" in k)  # the adapter did train


def test_evaluation_takes_the_lean_loss_path_and_gives_the_models_own_loss(tmp_path, captured):
    """Trainer.evaluate() without compute_metrics asks only for the loss (transformers passes prediction_loss_only,
    TRL's prediction_step then compute_loss(return_outputs=False)): the selective path, whose LM head computes no
    logits at all; the eval loss is the model's own."""
    from qlora_lab.sft import output_layer

    train_mod.train(compose_train([*TINY, "trainer.max_steps=1", "score_before=false", "data.task_eval_samples=0",
                                   "trainer.save_strategy=no"], tmp_path))
    trainer = captured["trainer"]
    assert trainer.loss_impl == "selective" and trainer.compute_metrics is None
    shapes = []
    hook = output_layer(trainer.model).register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        lean = trainer.evaluate()["eval_loss"]
        lean_shapes, shapes[:] = list(shapes), []
        trainer.loss_impl = "native"  # the model's own loss over its full logits
        native = trainer.evaluate()["eval_loss"]
    finally:
        hook.remove()
        trainer.loss_impl = "selective"
    vocab = trainer.model.config.vocab_size
    assert lean_shapes and all(s[1] == 0 for s in lean_shapes)  # no position's logits on the lean path
    assert shapes and all(s[1] > 0 and s[2] == vocab for s in shapes)  # the full logits on the native one
    assert lean == pytest.approx(native, rel=1e-3)
