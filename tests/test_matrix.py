"""Every adapter x quantization pair that the validator accepts on this machine trains a step on the tiny model.

The matrix is generated, not hand-picked: every preset in conf/adapter times every preset in conf/quant, kept
where :func:`qlora_lab.validate.validate` accepts it here (LoftQ, for one, needs a 4-bit quant). A pair the
validator lets through must then run: one training step, the held-out eval loss and one generated task answer
(the forward outside the trainer's autocast, where IA3 on a bitsandbytes base used to fail).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qlora_lab import train as train_mod
from qlora_lab.config import CONF_DIR
from qlora_lab.errors import ConfigError
from qlora_lab.validate import ADAPTER_METHODS, QUANT_METHODS, validate
from tests.conftest import compose_train

ONE_STEP = ["model=tiny-random", "data.max_train_samples=4", "data.max_eval_samples=2", "data.task_eval_samples=1",
            "data.max_new_tokens=4", "score_before=false", "trainer.max_steps=1", "trainer.warmup_steps=0",
            "trainer.per_device_train_batch_size=2", "trainer.per_device_eval_batch_size=2",
            "trainer.eval_strategy=no", "trainer.save_strategy=no", "trainer.max_length=256",
            "trainer.learning_rate=1e-3"]


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml"))


# the method each preset selects, recorded while the matrix is composed
METHODS: dict[str, str] = {}


def accepted_pairs() -> list[tuple[str, str]]:
    pairs = []
    for adapter in presets("adapter"):
        for quant in presets("quant"):
            cfg = compose_train(["model=tiny-random", f"adapter={adapter}", f"quant={quant}"])
            METHODS[f"adapter={adapter}"], METHODS[f"quant={quant}"] = cfg.adapter.method, cfg.quant.method
            try:
                validate(cfg)
            except ConfigError:
                continue
            pairs.append((adapter, quant))
    return pairs


PAIRS = accepted_pairs()


def test_presets_cover_every_method_the_validator_knows():
    """A method the validator accepts but no preset selects would be missing from the matrix."""
    assert {METHODS[f"adapter={a}"] for a in presets("adapter")} == set(ADAPTER_METHODS)
    assert {METHODS[f"quant={q}"] for q in presets("quant")} == set(QUANT_METHODS)
    # and every adapter method trains on at least one base here
    assert {METHODS[f"adapter={a}"] for a, _ in PAIRS} == set(ADAPTER_METHODS)


@pytest.mark.integration
@pytest.mark.parametrize("adapter, quant", PAIRS)
def test_accepted_pair_trains_a_step(tmp_path, adapter, quant):
    metrics = train_mod.train(compose_train([*ONE_STEP, f"adapter={adapter}", f"quant={quant}"], tmp_path))
    assert metrics["status"] == "completed" and metrics["global_step"] == 1
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["skipped_updates"] == 0
    assert metrics["task_score_after"] is not None and len(metrics["examples"]) == 1


@pytest.mark.integration
def test_dora_on_an_int8_base_gives_the_same_output_on_every_forward():
    """peft's DoRA re-wraps a CPU int8 weight each forward, which lost bitsandbytes' row scales (adapters.py)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_lab import adapters, models

    cfg = compose_train(["model=tiny-random", "quant=int8"])
    path = models.resolve_model_path(cfg.model.name_or_path)
    model = get_peft_model(models.build_model(cfg.model, cfg.quant, path),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert adapters.keep_int8_scales(model) > 0
    ids = torch.tensor([[1, 520, 3300, 42, 17, 998, 205, 2]])
    with torch.no_grad():
        outputs = [model(input_ids=ids).logits for _ in range(3)]
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
