"""Every shipped config composes and validates; the validator reports every problem at once."""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qlora_lab.config import CONF_DIR
from qlora_lab.errors import ConfigError
from qlora_lab.sftconfig import (
    DEPRECATED_TRAINER_ALIASES,
    OWNED_TRAINER_FIELDS,
    TrainerConfig,
    build_sft_config,
    trainer_field_help,
)
from qlora_lab.validate import validate
from tests.conftest import compose_train

GROUPS = ["model", "quant", "adapter", "data", "trainer", "objective"]
# options that need a companion setting to validate (the validator refuses them otherwise, tested below)
REQUIRED = {"data/file": ["data.path=tests/data/prompt_completion.jsonl"], "data/hub": ["data.path=some/dataset"],
            "data/mixture": ["data.sources=[{path: tests/data/prompt_completion.jsonl, weight: 0.6},"
                             "{path: tests/data/messages.jsonl, weight: 0.4}]"],
            "adapter/full": ["quant=none"], "adapter/pissa": ["quant=none"], "adapter/olora": ["quant=none"]}


def shipped_options():
    for group in GROUPS:
        for f in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield f"{group}/{f.stem}"


@pytest.mark.parametrize("option", list(shipped_options()))
def test_every_shipped_option_composes_and_validates(option):
    group, name = option.split("/")
    cfg = compose_train([f"{group}={name}", *REQUIRED.get(option, [])])
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=False, throw_on_missing=True)  # no ??? left


def hydra_options(group: str) -> list[str]:
    return [f.stem for f in sorted((Path(CONF_DIR) / group).glob("*.yaml"))]


def compose_with_hydra(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("option", hydra_options("launcher"))
def test_every_launcher_option_composes_into_a_launcher_hydra_can_build(option, tmp_path):
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class, get_method, instantiate

    default = compose_with_hydra("train", []).hydra.launcher._target_
    cfg = compose_with_hydra("train", [f"launcher={option}", f"hydra.sweep.dir={tmp_path}"])
    assert cfg.hydra.launcher._target_ != default  # the option replaced Hydra's basic launcher
    assert issubclass(get_class(cfg.hydra.launcher._target_), Launcher)
    assert isinstance(instantiate(cfg.hydra.launcher), Launcher)  # every field the preset sets is the plugin's
    for callback in cfg.hydra.callbacks.values():  # the preset's callbacks import (and the sweep report stays)
        get_method(callback._target_)
    assert "sweep_report" in cfg.hydra.callbacks


@pytest.mark.parametrize("option", hydra_options("sweep"))
def test_every_sweep_option_composes_into_a_sweeper_over_real_fields(option, tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.plugins.sweeper import Sweeper
    from hydra.utils import get_class, instantiate
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    default = compose_with_hydra("train", []).hydra.sweeper._target_
    cfg = compose_with_hydra("train", [f"sweep={option}", f"hydra.sweep.dir={tmp_path}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ != default and issubclass(get_class(sweeper._target_), Sweeper)
    assert isinstance(instantiate(sweeper), Sweeper)  # the sampler too (a nested _target_)
    assert sweeper.params, "a sweep preset with nothing to search"
    parser = OverridesParser.create()
    for key, value in sweeper.params.items():
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key  # a field of the train config
        create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))  # the search space parses


@pytest.mark.parametrize("name, schema, overrides", [
    ("merge", "MergeRunConfig", ["run=some/run"]),
    ("chat", "ChatRunConfig", ["run=some/run"]),
    ("bench", "BenchRunConfig", []),
])
def test_every_command_config_composes_against_its_schema(name, schema, overrides):
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from qlora_lab import config as config_mod

    cfg = compose_with_hydra(name, overrides)
    assert OmegaConf.get_type(cfg) is getattr(config_mod, schema)  # typed: unknown keys and bad types are refused
    with pytest.raises((HydraException, OmegaConfBaseException), match="no_such_key"):
        compose_with_hydra(name, [*overrides, "no_such_key=1"])
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no ??? left once the required keys are given
    if name == "merge":
        from qlora_lab.merge import BASES, SAVE_DTYPES

        assert cfg.base in BASES and cfg.dtype in SAVE_DTYPES
    elif name == "bench":
        from qlora_lab.bench.app import validate_bench

        validate_bench(cfg)


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
    args = build_sft_config(cfg.trainer, tmp_path, cuda=False, mixed_precision="bf16")
    assert isinstance(args, SFTConfig)
    assert (args.learning_rate, args.max_steps, str(args.lr_scheduler_type.value)) == (3e-4, 7, "linear")
    assert args.activation_checkpointing is True  # the deprecated alias, when set, wins
    assert args.output_dir == str(tmp_path)
    assert trainer_field_help("learning_rate")  # TRL's help text travels with the schema
    names = {f for f in TrainerConfig.__dataclass_fields__}
    assert "hub_token" not in names and "output_dir" not in names  # secrets / owned fields are not config


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value.value if isinstance(value, enum.Enum) else value


def test_trainer_schema_is_sftconfig_minus_the_owned_fields():
    from trl import SFTConfig

    sft = {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}
    schema = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    assert set(schema) <= set(sft), sorted(set(schema) - set(sft))  # trainer.X is always SFTConfig's X
    assert OWNED_TRAINER_FIELDS <= set(sft) and not OWNED_TRAINER_FIELDS & set(schema)
    assert set(sft) == set(schema) | OWNED_TRAINER_FIELDS, sorted(set(sft) - set(schema) - OWNED_TRAINER_FIELDS)
    for name, f in schema.items():  # TRL's defaults (deprecated aliases: None = unset, the new name decides)
        expected = None if name in DEPRECATED_TRAINER_ALIASES else _default(sft[name])
        assert _default(f) == expected, (name, _default(f), expected)
    shipped = yaml.safe_load((Path(CONF_DIR) / "trainer" / "default.yaml").read_text())
    assert set(shipped) <= set(schema), sorted(set(shipped) - set(schema))


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


@pytest.mark.parametrize("value", ["down_proj", "[1]", "['']"])
def test_skip_modules_takes_auto_or_a_list_of_names(value):
    with pytest.raises(ConfigError) as e:
        validate(compose_train(["model=tiny-random", f"quant.skip_modules={value}"]))
    assert len(e.value.problems) == 1 and "give 'auto'" in e.value.problems[0] and "[down_proj]" in e.value.problems[0]


@pytest.mark.parametrize("override, needle", [
    ("adapter.r=abc", "adapter.r=abc: the rank must be an integer >= 1 (typical: 8-64), or auto"),
    ("adapter.r=8.5", "adapter.r=8.5: the rank must be an integer >= 1"),
    ("adapter.alpha=-1", "adapter.alpha=-1: must be a number > 0 (typical: 2 x adapter.r), or auto (2 x r)"),
])
def test_rank_and_alpha_take_auto_or_a_positive_number(override, needle):
    validate(compose_train(["model=tiny-random", "adapter.r=auto", "adapter.alpha=auto"]))  # the defaults pass
    with pytest.raises(ConfigError) as e:
        validate(compose_train(["model=tiny-random", override]))
    assert len(e.value.problems) == 1 and needle in e.value.problems[0], e.value.problems


@pytest.mark.parametrize("override, needle", [
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("quant=nf5", "nf5"),
])
def test_bad_overrides_are_rejected_at_composition(override, needle):
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((ConfigCompositionException, HydraException, OmegaConfBaseException)) as e:
        compose_train([override])
    assert needle in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("+adapter.alhpa=64", "adapter.alhpa: no such setting in adapter (nothing would read it). Did you mean "
                          "adapter.alpha? Fix: adapter.alpha=64."),
    ("adapter.alhpa=64", "Did you mean adapter.alpha? Fix: adapter.alpha=64."),
    ("+trainer.learning_rat=1e-4", "Did you mean trainer.learning_rate?"),
    ("trainer.learning_rat=1e-4", "Did you mean trainer.learning_rate?"),
    ("+model.foo=1", "model.foo: no such setting in model"),
    ("+model._target_=os.system", "model._target_: no such setting in model"),
    ("adapter.rank=8", "adapter.rank: no such setting in adapter"),
    ("+foo=1", "foo: no such setting in the command's config"),
    ("+data.columns={q:prompt}", None),  # a mapping field typed Any: its keys are the user's
])
def test_keys_outside_the_schema_are_reported_with_or_without_plus(override, needle):
    cfg = compose_train(["model=tiny-random", override])
    if needle is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert len(e.value.problems) == 1 and needle in e.value.problems[0], e.value.problems


def test_unknown_keys_are_listed_with_the_other_problems():
    cfg = compose_train(["+adapter.alhpa=64", "trainer.learning_rat=1e-4", "+model.foo=1", "adapter.r=0",
                         "trainer.max_steps=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)  # not SFTConfig's TypeError for the unexpected keyword
    assert [p.split(":")[0].split("=")[0] for p in e.value.problems] == [
        "model.foo", "adapter.alhpa", "trainer.learning_rat", "adapter.r", "trainer.max_steps"]


@pytest.mark.parametrize("name, overrides", [
    ("merge", ["run=/no/such/run", "+dtyp=float16"]),
    ("chat", ["run=/no/such/run", "max_new_token=5"]),
    ("bench", ["+bench.step=3"]),
    ("bench", ["model.nme_or_path=x"]),
])
def test_merge_chat_and_bench_report_unknown_keys(name, overrides):
    from qlora_lab.validate import appendable_overrides

    cfg = compose_with_hydra(name, appendable_overrides(name, overrides))
    from omegaconf import open_dict
    with open_dict(cfg):
        del cfg["hydra"]
    key = overrides[-1].lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + ": no such setting.*Did you mean"):
        if name == "merge":
            from qlora_lab.merge import merge
            merge(cfg)  # before the run is looked for
        elif name == "chat":
            from qlora_lab.chat import chat
            chat(cfg)
        else:
            from qlora_lab.bench.app import validate_bench
            validate_bench(cfg)


def test_cli_flags_and_known_keys_are_left_to_hydra():
    from qlora_lab.validate import appendable_overrides

    given = ["model=tiny-random", "adapter.r=8", "hydra.run.dir=x", "hydra/launcher=basic", "sweep=optuna_lr_rank",
             "data.columns.question=prompt", "+adapter.alhpa=1", "~adapter.alpha", "++adapter.alpha=3"]
    assert appendable_overrides("train", given) == given
    assert appendable_overrides("train", ["adapter.alhpa=1", "foo.bar=2"]) == ["+adapter.alhpa=1", "+foo.bar=2"]


@pytest.mark.parametrize("quant, env, refused", [
    ("none", {}, True),                  # one process, 2 GPUs, unquantized: the Trainer would use DataParallel
    ("nf4", {}, True),                   # not wrapped, but TRL's SFTTrainer refuses any n_gpu > 1 (a traceback)
    ("none", {"LOCAL_RANK": "0"}, False),  # torchrun / accelerate: one GPU per process (DDP)
])
def test_one_process_on_several_gpus_is_refused_where_dataparallel_would_run(monkeypatch, quant, env, refused):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from qlora_lab.validate import _data_parallel_problems

    cfg = compose_train(["model=tiny-random", f"quant={quant}"])
    problems: list[str] = []
    _data_parallel_problems(problems, cfg)  # (validate() under LOCAL_RANK would start torch.distributed)
    assert bool(problems) == refused
    if refused:
        with pytest.raises(ConfigError, match=re.escape("torchrun --nproc_per_node=2 -m qlora_lab train")):
            validate(cfg)


# ---- multi-GPU launch: the accelerate configs (conf/accelerate/*.yml) and what the validator refuses under them

ACCELERATE_DIR = Path(CONF_DIR) / "accelerate"
# what the validator reads from the launcher's environment
LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE")


def accelerate_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file <file> -m qlora_lab train` gives every process: accelerate's
    own code path (commands/launch.py launch_command), without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "qlora_lab", "train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.fixture
def launched(monkeypatch):
    """launched("fsdp_qlora"): this process sees what `accelerate launch` with that config exports."""
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)

    def launch(name: str) -> dict[str, str]:
        env = accelerate_env(ACCELERATE_DIR / f"{name}.yml")
        for key in LAUNCH_ENV:
            if key in env:
                monkeypatch.setenv(key, env[key])
        return env

    return launch


def test_accelerate_configs_load_with_accelerates_own_config_class():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    kinds = {f.stem: ClusterConfig.from_yaml_file(str(f)).distributed_type for f in ACCELERATE_DIR.glob("*.yml")}
    assert kinds == {"ddp": DistributedType.MULTI_GPU, "fsdp_qlora": DistributedType.FSDP,
                     "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}
    assert not list(ACCELERATE_DIR.glob("*.yaml"))  # .yaml would make Hydra offer a bogus `accelerate=` group


@pytest.mark.parametrize("name, expected", [
    ("ddp", {"ACCELERATE_USE_FSDP": None, "ACCELERATE_USE_DEEPSPEED": None, "ACCELERATE_MIXED_PRECISION": "no"}),
    # peft docs (accelerate/fsdp.md) for QLoRA: cpu_ram_efficient_loading, no use_orig_params, offload
    ("fsdp_qlora", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_USE_ORIG_PARAMS": "false",
                    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_SYNC_MODULE_STATES": "true",
                    "FSDP_OFFLOAD_PARAMS": "true", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                    "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}),
    ("deepspeed_zero2", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    ("deepspeed_zero3", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                         "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
                         "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}),
])
def test_accelerate_launch_exports_what_each_config_promises(name, expected):
    env = accelerate_env(ACCELERATE_DIR / f"{name}.yml")
    assert {key: env.get(key) for key in expected} == expected


NO_TASK_SCORE = "data.task_eval_samples=0"  # rank-0 generation cannot run under sharding (tested below)


@pytest.mark.parametrize("launcher, overrides, needle", [
    ("fsdp_qlora", [], "quant.quant_storage=null (uint8) with quant.method=nf4 under FSDP"),
    ("fsdp_qlora", ["quant.quant_storage=bfloat16", "model.dtype=float32"], "(model.dtype=float32)"),
    ("fsdp_qlora", ["quant=int8"], "quant.method=int8 under FSDP"),
    ("deepspeed_zero3", ["quant=fp4"], "quant.method=fp4 under DeepSpeed ZeRO-3"),
    ("deepspeed_zero3", ["quant=int8"], "quant.method=int8 under DeepSpeed ZeRO-3"),
])
def test_sharded_launch_refuses_quantized_weights_it_cannot_shard(launched, launcher, overrides, needle):
    launched(launcher)
    with pytest.raises(ConfigError) as e:
        validate(compose_train([NO_TASK_SCORE, *overrides]))
    assert needle in str(e.value) and "quant.quant_storage=bfloat16" in str(e.value)  # the fix is named
    assert len(e.value.problems) == 1


@pytest.mark.parametrize("launcher, overrides", [
    ("fsdp_qlora", ["quant.quant_storage=bfloat16", "model.dtype=bfloat16"]),
    ("fsdp_qlora", ["quant=none"]),
    ("deepspeed_zero3", ["quant.quant_storage=bfloat16", "model.dtype=bfloat16"]),
    ("deepspeed_zero2", ["quant=int8"]),
    ("ddp", []),
])
def test_sharded_launch_accepts_float_storage_and_unsharded_launches_anything(launched, launcher, overrides):
    launched(launcher)
    validate(compose_train([NO_TASK_SCORE, *overrides]))


@pytest.mark.parametrize("launcher", ["fsdp_qlora", "deepspeed_zero3"])
def test_sharded_launch_refuses_the_rank0_task_score(launched, launcher):
    launched(launcher)
    with pytest.raises(ConfigError, match=r"data.task_eval_samples=\d+ under .*rank 0 alone") as e:
        validate(compose_train(["quant=none"]))
    assert len(e.value.problems) == 1
    validate(compose_train(["quant=none", "data.task_metric=none"]))


def test_sharding_requested_through_trainer_fields_is_checked_too(tmp_path, monkeypatch):
    """torchrun users turn FSDP / DeepSpeed on with TrainingArguments fields instead of accelerate's config."""
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    zero3, zero2 = tmp_path / "zero3.json", tmp_path / "zero2.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    zero2.write_text('{"zero_optimization": {"stage": 2}}')
    for override, needle in [("trainer.fsdp=full_shard", "under FSDP"),
                             (f"trainer.deepspeed={zero3}", "under DeepSpeed ZeRO-3"),
                             ("trainer.deepspeed={zero_optimization:{stage:3}}", "under DeepSpeed ZeRO-3"),
                             (f"trainer.deepspeed={tmp_path}/missing.json", "not a readable DeepSpeed JSON config")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate(compose_train([override]))
    validate(compose_train([f"trainer.deepspeed={zero2}"]))
    validate(compose_train(["trainer.fsdp=full_shard", "quant.quant_storage=bfloat16", "model.dtype=bfloat16",
                            NO_TASK_SCORE]))
    with pytest.raises(ConfigError, match="quant.quant_storage='bf16' is not one of"):
        validate(compose_train(["quant.quant_storage=bf16"]))


def test_speed_and_memory_options_are_validated_together():
    cfg = compose_train(["batching=grouped2", "memory_budget_gb=-1", "adapter.dropout_impl=fastest", "loss=fast"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    assert "4 problem(s)" in text
    assert "batching='grouped2'" in text and "Did you mean 'grouped'?" in text
    assert "memory_budget_gb=-1" in text and "'auto'" in text
    assert "adapter.dropout_impl='fastest'" in text and "loss='fast'" in text
    for ok in ("memory_budget_gb=auto", "memory_budget_gb=null", "memory_budget_gb=2.5", "batching=padding_free"):
        validate(compose_train([ok]))


def test_kernels_option_is_validated(monkeypatch):
    with pytest.raises(ConfigError, match=re.escape("kernels='triton'")):
        validate(compose_train(["kernels=triton"]))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        validate(compose_train(["kernels=liger"]))
    assert "kernels=liger" in str(e.value) and "CUDA" in str(e.value) and "kernels=auto" in str(e.value)
    for ok in ("auto", "lean", "none"):
        validate(compose_train([f"kernels={ok}"]))


@pytest.mark.parametrize("overrides, needle", [
    (["trainer.padding_free=true"], "use batching=padding_free instead"),
    (["trainer.packing=true"], "trainer.packing=true with batching=grouped"),
])
def test_trl_padding_options_point_to_batching(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(compose_train(overrides))
