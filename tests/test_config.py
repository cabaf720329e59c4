"""Every shipped config composes and validates; the validator reports every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qlora_lab.config import TrainerConfig, trainer_field_help, validate
from qlora_lab.errors import ConfigError
from qlora_lab.config import CONF_DIR
from qlora_lab.train import build_sft_config
from tests.conftest import compose_train

GROUPS = ["model", "quant", "adapter", "data", "trainer"]
# options that need a companion setting to validate (the validator refuses them otherwise, tested below)
REQUIRED = {"data/file": ["data.path=tests/data/prompt_completion.jsonl"], "data/hub": ["data.path=some/dataset"],
            "adapter/full": ["quant=none"], "adapter/pissa": ["quant=none"], "adapter/olora": ["quant=none"]}


def shipped_options():
    for group in GROUPS:
        for f in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield f"{group}/{f.stem}"


@pytest.mark.parametrize("option", list(shipped_options()))
def test_every_shipped_option_composes_and_validates(option, monkeypatch):
    group, name = option.split("/")
    monkeypatch.setattr("qlora_lab.config._has_cuda", lambda: True)  # loftq validates only where CUDA exists
    cfg = compose_train([f"{group}={name}", *REQUIRED.get(option, [])])
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=False, throw_on_missing=True)  # no ??? left


def test_default_config_is_the_embedded_demo():
    cfg = compose_train()
    assert cfg.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert (cfg.quant.method, cfg.quant.double_quant) == ("nf4", True)
    assert (cfg.adapter.method, cfg.adapter.target_modules) == ("lora", "all-linear")
    assert cfg.data.source == "demo"


def test_trainer_group_maps_one_to_one_onto_sftconfig(tmp_path):
    from trl import SFTConfig

    cfg = compose_train(["trainer.learning_rate=3e-4", "trainer.lr_scheduler_type=linear", "trainer.max_steps=7",
                         "trainer.gradient_checkpointing=true"])
    args = build_sft_config(cfg.trainer, tmp_path)
    assert isinstance(args, SFTConfig)
    assert (args.learning_rate, args.max_steps, str(args.lr_scheduler_type.value)) == (3e-4, 7, "linear")
    assert args.activation_checkpointing is True  # the deprecated alias, when set, wins
    assert args.output_dir == str(tmp_path)
    assert trainer_field_help("learning_rate")  # TRL's help text travels with the schema
    names = {f for f in TrainerConfig.__dataclass_fields__}
    assert "hub_token" not in names and "output_dir" not in names  # secrets / owned fields are not config


def test_validator_reports_every_problem_at_once():
    cfg = compose_train(["quant.method=nf5", "adapter.r=0", "data.eval_fraction=1.5", "trainer.learning_rate=-1",
                         "model.name_or_path=./no/such/folder", "data.source=file"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for needle in ["quant.method='nf5'", "Did you mean 'nf4'", "adapter.r=0", "data.eval_fraction=1.5",
                   "trainer.learning_rate=-1", "./no/such/folder", "data.path is required"]:
        assert needle in msg, needle
    assert len(e.value.problems) == 6


@pytest.mark.parametrize("override, needle", [
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer.no_such_field=1", "no_such_field"),
    ("adapter.rank=8", "rank"),
    ("quant=nf5", "nf5"),
])
def test_bad_overrides_are_rejected_at_composition(override, needle):
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((ConfigCompositionException, HydraException, OmegaConfBaseException)) as e:
        compose_train([override])
    assert needle in str(e.value)
