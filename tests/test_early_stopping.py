"""The overfitting guard: early_stopping.patience stops a run whose held-out loss stops improving, keep=best makes
<run>/adapter/ the best evaluated checkpoint, and a resume goes on with the early-stopping state it had."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lab import train as train_mod
from qlora_lab.errors import ConfigError
from qlora_lab.validate import validate
from tests.conftest import TINY, compose_train

ADAPTER = "adapter_model.safetensors"


def twenty_rows(folder: Path) -> list[str]:
    """20 training rows of random words (nothing to learn but the rows themselves) and 8 held-out rows like them:
    many epochs over them overfit. The output layer trains too (adapter.modules_to_save=[lm_head]): the tiny random
    model's tied head (std 0.02 on 64 dims) bounds its logits, and with LoRA alone its held-out loss stayed at
    10.72 +- 0.02, a curve of float noise whose order flipped with the thread count. Measured on the tiny model
    (2-core CPU, 1 and 2 threads alike to 0.03): 9.46, 7.89, 7.29 at step 15, then 7.55 and 7.68, so patience 2
    stops the run at step 25 of 60 and keeps step 15."""
    rng = random.Random(0)

    def row():
        word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))  # noqa: E731
        return {"prompt": "Repeat the code: " + word(), "completion": " ".join(word() for _ in range(12))}

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(20)))
    (folder / "eval.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(8)))
    return ["model=tiny-random", "data=file", f"data.path={folder / 'train.jsonl'}",
            f"data.eval_path={folder / 'eval.jsonl'}", "data.task_metric=none", "trainer.max_steps=60",
            "trainer.per_device_train_batch_size=4", "trainer.learning_rate=5e-3", "trainer.logging_steps=5",
            "trainer.eval_strategy=steps", "trainer.eval_steps=5", "trainer.warmup_steps=0",
            "trainer.lr_scheduler_type=constant", "early_stopping.patience=2",
            # the settings the curve above was measured with (the size rules would give r=32, down_proj in 16-bit)
            "adapter.r=16", "adapter.alpha=32", "quant.skip_modules=[]", "adapter.modules_to_save=[lm_head]"]


def early_stopping_state(checkpoint: Path) -> dict:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]


@pytest.mark.integration
def test_an_overfitting_run_stops_early_and_keeps_the_best_checkpoint(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lab.models import quantization_config, resolve_dtype, resolve_model_path

    run = tmp_path / "run"
    cfg = compose_train(twenty_rows(tmp_path / "data"), run)
    metrics = train_mod.train(cfg)

    curve = metrics["eval_curve"]
    assert metrics["stopped_early"] and metrics["global_step"] < 60, curve
    best = metrics["best_step"]
    assert metrics["keep"] == "best" and best < metrics["global_step"], curve
    losses = {p["step"]: p["eval_loss"] for p in curve}
    assert [p["step"] for p in curve] == list(range(5, metrics["global_step"] + 1, 5))
    assert losses[best] == min(losses.values()) == metrics["best_metric"]["eval_loss"]
    # the two evaluations after the best did not improve on it: that is what stopped the run
    assert all(losses[s] >= losses[best] for s in (metrics["global_step"] - 5, metrics["global_step"]))
    assert metrics["eval_loss"] == pytest.approx(losses[best], abs=1e-6)  # the final evaluation is of the kept weights

    # adapter/ holds exactly the best checkpoint's adapter, not the last step's
    kept = load_file(run / "adapter" / ADAPTER)
    best_ckpt = load_file(run / "checkpoints" / f"checkpoint-{best}" / ADAPTER)
    last_ckpt = load_file(run / "checkpoints" / f"checkpoint-{metrics['global_step']}" / ADAPTER)
    assert kept.keys() == best_ckpt.keys() and kept
    assert all(kept[k].dtype == best_ckpt[k].dtype and torch.equal(kept[k], best_ckpt[k]) for k in kept)
    assert not all(torch.equal(kept[k], last_ckpt[k]) for k in kept)

    # and it reloads with plain peft to those weights
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-random"),
                                                quantization_config=quantization_config(cfg.quant),
                                                dtype=resolve_dtype(cfg.model.dtype))
    reloaded = PeftModel.from_pretrained(base, run / "adapter", autocast_adapter_dtype=False)
    # the LoRA matrices and the trained output layer (peft's copy of lm_head under modules_to_save)
    loaded = {n.replace(".modules_to_save.default", "").replace(".default", ""): p
              for n, p in reloaded.named_parameters() if "lora_" in n or "modules_to_save" in n}
    assert len(loaded) == len(best_ckpt) and "base_model.model.lm_head.weight" in best_ckpt
    for name, tensor in best_ckpt.items():
        short = name.split("base_model.model.")[-1]
        match = [p for n, p in loaded.items() if n.endswith(short)]
        assert len(match) == 1 and torch.equal(match[0].detach().to(tensor.dtype), tensor), name

    # the early-stopping counter is in the checkpoint's trainer_state.json (transformers' stateful_callbacks)
    assert early_stopping_state(run / "checkpoints" / f"checkpoint-{metrics['global_step']}") == {
        "early_stopping_patience_counter": 2}
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["best_step"] == best and len(saved["eval_curve"]) == len(curve)
    report = (run / "report.md").read_text()
    assert f"| {best} (kept) |" in report and "stopped early" in report


@pytest.mark.integration
def test_a_resume_keeps_the_early_stopping_state(tmp_path):
    """Stopped (completed) at step 20, one evaluation without improvement counted; trained longer from there, the
    run stops at step 25 as the uninterrupted run does, which it would not with the counter reset to 0."""
    run = tmp_path / "run"
    overrides = twenty_rows(tmp_path / "data")
    first = train_mod.train(compose_train([*overrides, "trainer.max_steps=20"], run))
    assert first["global_step"] == 20 and not first["stopped_early"]
    assert early_stopping_state(run / "checkpoints" / "checkpoint-20") == {"early_stopping_patience_counter": 1}

    longer = train_mod.train(compose_train(overrides, run))
    assert longer["resumed_from"].endswith("checkpoint-20")
    assert longer["stopped_early"] and longer["global_step"] == 25 and longer["best_step"] == 15, longer["eval_curve"]


def test_bad_overfitting_settings_are_reported_together():
    with pytest.raises(ConfigError) as e:
        validate(compose_train([*TINY, "early_stopping.patience=-1", "keep=bset", "early_stopping.threshold=-0.1",
                                "early_stopping.metric=''"]))
    text = str(e.value)
    for needle in ("keep='bset' is not one of auto, best, last", "early_stopping.patience=-1",
                   "early_stopping.threshold=-0.1", "early_stopping.metric=''"):
        assert needle in text, text
    with pytest.raises(ConfigError) as e:  # TINY evaluates nothing (trainer.eval_strategy=no)
        validate(compose_train([*TINY, "early_stopping.patience=2", "keep=best"]))
    assert "early_stopping.patience=2 with trainer.eval_strategy=no" in str(e.value)
    assert "keep=best with trainer.eval_strategy=no" in str(e.value)


def test_keep_defaults_to_best_when_the_run_evaluates():
    from qlora_lab.sftconfig import overfitting_fields, resolve_keep

    cfg = compose_train(["model=tiny-random"])  # the shipped defaults: eval every quarter of training
    validate(cfg)
    assert resolve_keep(cfg.keep, cfg.trainer) == "best"
    assert resolve_keep(cfg.keep, compose_train(TINY).trainer) == "last"  # TINY evaluates nothing
    assert resolve_keep(cfg.keep, compose_train(["trainer.save_strategy=no"]).trainer) == "last"
    fields = overfitting_fields("best", cfg.early_stopping, cfg.trainer)
    assert fields == {"metric_for_best_model": "eval_loss", "load_best_model_at_end": True,
                      "save_strategy": "steps", "save_steps": 0.25}
    assert overfitting_fields("last", cfg.early_stopping, cfg.trainer) == {}


def test_the_eval_curve_and_its_report_table():
    from qlora_lab import report

    history = [{"step": 0, "before_loss": 1.0}, {"step": 5, "loss": 0.9}, {"step": 5, "eval_loss": 0.8},
               {"step": 10, "eval_loss": 0.7, "eval_rewards/accuracies": 0.5}, {"step": 15, "eval_loss": 0.75}]
    assert report.eval_curve(history) == [{"step": 5, "eval_loss": 0.8}, {"step": 10, "eval_loss": 0.7},
                                          {"step": 15, "eval_loss": 0.75}]
    assert report.eval_curve(history, "rewards/accuracies")[1] == {"step": 10, "eval_loss": 0.7,
                                                                   "eval_rewards/accuracies": 0.5}
    lines = report._eval_lines({"eval_curve": report.eval_curve(history), "keep": "best", "best_step": 10,
                                "stopped_early": True}, patience=1)
    text = "\n".join(lines)
    assert "| 10 (kept) | 0.7000 |" in text and "step 10" in text and "no improvement for 1 evaluation(s)" in text
    assert report._eval_lines({"eval_curve": []}) == []
    assert report._eval_lines({"eval_curve": report.eval_curve(history), "keep": "last"})[3].startswith(
        "adapter/ holds the last step")
