"""Preference objectives (objective=dpo/orpo/kto): TRL's trainers on the same groups and run directory as SFT; the
embedded preference demo; what the validator refuses; init_from continuing an SFT run's adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_lab import preference
from qlora_lab.errors import ConfigError
from qlora_lab.validate import validate
from tests.conftest import TINY, compose_train
from tests.test_cli import run_cli

TINY_PREF = ["model=tiny-random", "data.max_train_samples=8", "data.max_eval_samples=4", "data.task_eval_samples=2",
             "data.max_new_tokens=4", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
             "trainer.per_device_eval_batch_size=4", "trainer.eval_strategy=no", "trainer.logging_steps=1",
             "trainer.max_length=256"]


def test_the_preference_demo_pairs_a_correct_answer_with_a_plausible_wrong_one():
    pairs = preference.demo_pairs(30, "eval", seed=0)
    assert len(pairs) == 30
    kinds = set()
    for p in pairs:
        chosen, rejected = json.loads(p["chosen"]), json.loads(p["rejected"])
        assert chosen != rejected and chosen.keys() == rejected.keys() == {"name", "age", "city", "job"}
        assert chosen["name"] == rejected["name"] and chosen["name"] in p["prompt"]
        assert str(chosen["age"]) in p["prompt"] and chosen["city"] in p["prompt"]
        differ = {k for k in chosen if chosen[k] != rejected[k]}
        kinds.add("swap" if differ == {"city", "job"} else differ.pop())
    assert kinds == {"swap", "city", "age"}
    # the held-out pairs are the SFT demo's held-out rows: same prompts, the correct JSON chosen
    from qlora_lab.task import demo_rows
    rows = demo_rows(30, "eval")
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [(r["prompt"], r["completion"]) for r in rows]
    kto = preference.unpaired(pairs[:2])
    assert [r["label"] for r in kto] == [True, False, True, False]


@pytest.mark.parametrize("overrides, needle", [
    (["objective=dpo", "adapter=prefix"], "adapter=prefix with objective=dpo"),
    (["objective=dpo", "adapter=full", "quant=none"], "adapter=full with objective=dpo"),
    (["objective=kto", "trainer.per_device_train_batch_size=1"], "objective=kto with trainer.per_device_train_batch"),
    (["objective=dpo", "data=hub", "data.path=some/dataset"], "data.source=hub with objective=dpo"),
    (["objective=dpo", "objective.beta=0"], "objective.beta=0"),
    (["objective=dpo", "+init_from=/nonexistent/run"], "init_from='/nonexistent/run': not a completed run"),
    (["objective=dpo", "objective.name=ppo"], "objective.name='ppo' is not one of sft, dpo, orpo, kto"),
    (["objective=kto", "objective.sft_weight=1"], "objective.sft_weight=1.0 with objective=kto"),
    (["objective=dpo", "objective.sft_weight=-1"], "objective.sft_weight=-1.0 with objective=dpo"),
])
def test_the_validator_refuses_what_the_preference_trainers_do_not_run(overrides, needle):
    with pytest.raises(ConfigError) as e:
        validate(compose_train([*TINY, *[o.lstrip("+") for o in overrides]]))
    assert needle in str(e.value), str(e.value)


def test_init_from_is_for_preference_objectives(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        validate(compose_train([*TINY, f"init_from={tmp_path}"]))
    assert "init_from with objective=sft" in str(e.value)
    validate(compose_train([*TINY, "objective=dpo", f"init_from={tmp_path}"]))
    for name in ("dpo", "orpo", "kto"):
        validate(compose_train([*TINY, f"objective={name}"]))


def _reload_with_plain_peft(run, cfg_quant="nf4"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lab.models import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-random"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and len(loaded) == len(saved)
    return model


def test_dpo_sft_weight_adds_trls_sft_loss_on_the_chosen_answers():
    from qlora_lab.objectives import objective_fields
    from qlora_lab.sftconfig import build_sft_config

    fields = objective_fields(compose_train([*TINY, "objective=dpo", "objective.sft_weight=0.5"]).objective)
    assert fields["loss_type"] == ["sigmoid", "sft"] and fields["loss_weights"] == [1.0, 0.5]
    assert "loss_weights" not in objective_fields(compose_train([*TINY, "objective=dpo"]).objective)
    from trl import DPOConfig  # and TRL takes them as they are

    cfg = compose_train([*TINY, "objective=dpo", "objective.sft_weight=0.5"])
    args = build_sft_config(cfg.trainer, "/tmp/unused", cuda=False, mixed_precision="no", config_class=DPOConfig,
                            extra=fields)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]


@pytest.mark.integration
@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_each_objective_trains_the_tiny_model_through_the_cli(objective, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *TINY_PREF, f"objective={objective}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "qlora_lab run report" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 2 and metrics["objective"] == objective
    assert metrics["task_metric"] == "json_match" and metrics["task_score_after"] is not None
    assert metrics["preference_accuracy_before"] is not None and metrics["preference_accuracy_after"] is not None
    if objective in ("dpo", "orpo"):
        assert "reward_accuracy_after" in metrics and "reward_margin_after" in metrics, metrics
    for rel in ("adapter/adapter_config.json", "adapter/tokenizer.json", "config.yaml", "plan.json", "report.md",
                "log_history.json"):
        assert (run / rel).is_file(), rel
    assert json.loads((run / "plan.json").read_text())["loss"] == objective
    _reload_with_plain_peft(run)


@pytest.mark.integration
def test_dpo_init_from_continues_the_sft_runs_adapter(tmp_path, captured):
    from qlora_lab import train as train_mod

    sft_run, dpo_run = tmp_path / "sft", tmp_path / "dpo"
    train_mod.train(compose_train([*TINY_PREF, "adapter.r=8"], sft_run))
    sft = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    metrics = train_mod.train(compose_train([*TINY_PREF, "objective=dpo", f"init_from={sft_run}"], dpo_run))
    assert metrics["status"] == "completed" and metrics["init_from"] == str(sft_run)
    assert (metrics["lora_r"], metrics["lora_alpha"]) == (8, 16)  # the continued adapter's rank, not auto's 64
    at_start = {n: p for n, p in captured["before"].items() if ".default." in n}
    assert len(at_start) == len(sft)
    for name, tensor in sft.items():  # step 0 of the DPO run: exactly the SFT adapter
        key = name.replace(".weight", ".default.weight")
        match = [p for n, p in at_start.items() if n.endswith(key.split("base_model.model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0].to(tensor.dtype), tensor), name
    dpo = load_file(dpo_run / "adapter" / "adapter_model.safetensors")
    assert dpo.keys() == sft.keys() and not all(torch.equal(dpo[k], sft[k]) for k in sft)  # and DPO moved it
    assert not (dpo_run / "adapter" / "ref").exists()  # TRL's frozen reference copy is not saved with it


@pytest.mark.integration
def test_the_divergence_guard_skips_non_finite_dpo_steps_and_stops_a_diverged_run(tmp_path, monkeypatch):
    from trl import DPOTrainer

    from qlora_lab import train as train_mod
    from qlora_lab.sft import Diverged

    real = DPOTrainer.compute_loss

    def nan_from_step_2(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return loss * float("nan") if not return_outputs and self.state.global_step >= 2 else loss

    monkeypatch.setattr(DPOTrainer, "compute_loss", nan_from_step_2)
    with pytest.raises(Diverged, match="not finite for 2 consecutive steps"):
        train_mod.train(compose_train([*TINY_PREF, "objective=dpo", "trainer.max_steps=6", "max_nonfinite_steps=2",
                                       "trainer.save_strategy=steps", "trainer.save_steps=2"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["global_step"] == 4  # steps 3 and 4 skipped, then stopped
    assert metrics["last_checkpoint"].endswith("checkpoint-2")  # the run stops before step 4's save
    for name, tensor in load_file(tmp_path / "checkpoints/checkpoint-2/adapter_model.safetensors").items():
        assert torch.isfinite(tensor).all(), name
    assert not (tmp_path / "adapter").exists()
