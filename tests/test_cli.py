"""The command line as a user runs it: one clear message and a non-zero exit for bad input, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
TINY_CLI = ["model=tiny-random", "data.max_train_samples=16", "data.max_eval_samples=4", "data.task_eval_samples=2",
            "data.max_new_tokens=4", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
            "trainer.eval_strategy=no"]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # tests never reach a hub
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "qlora_lab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    for needle in needles:
        assert needle in out, (needle, out[-2000:])


def test_usage_and_unknown_command():
    usage = run_cli("--help")
    assert usage.returncode == 0
    assert all(f"  {c} " in usage.stdout for c in ("train", "merge", "chat", "bench", "report"))
    assert_clean_failure(run_cli("trian"), "unknown command 'trian'")


@pytest.mark.parametrize("command, field", [("merge", "check_prompts: 4"), ("chat", "max_new_tokens")])
def test_merge_and_chat_help_show_their_own_fields_only(cli_here, command, field):
    out = cli_here(command, "--help").stdout
    assert f"qlora-lab {command} run=" in out and field in out and "adapter:" not in out and "trainer" not in out


@pytest.mark.integration
def test_train_writes_a_complete_run_dir(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *TINY_CLI, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qlora_lab run report" in proc.stdout
    assert (run / ".hydra/config.yaml").is_file() and (run / "adapter/adapter_model.safetensors").is_file()
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    assert not list(run.glob(".*tmp*")), "temporary folders left behind"
    # the CLI re-executed itself with the allocator that allocator=auto stands for here (mimalloc on Linux CPU)
    from qlora_lab.cpu import allocator

    assert json.loads((run / "environment.json").read_text())["allocator"] == allocator.resolve("auto")


@pytest.mark.integration  # a CLI process (imports + Hydra: ~7 s): the hub kept offline as a user's would be
def test_a_hub_id_that_cannot_be_loaded_fails_clearly_in_a_real_process(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *TINY_CLI, "model.name_or_path=no-such-org/no-such-model", f"hydra.run.dir={run}")
    assert_clean_failure(proc, "error:", "could not load model.name_or_path='no-such-org/no-such-model'",
                         "Fix: check the hub id")
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()


# The bad-input tests below run the CLI's main in this process (conftest.cli_here): the same path, no import cost.
@pytest.mark.parametrize("args, needles", [
    (["model.name_or_path=/no/such/model"], ["model.name_or_path='/no/such/model'", "no such folder"]),
    (["data=file", f"data.path={DATA}/missing.jsonl"], ["missing.jsonl", "file not found"]),
    (["data=file"], ["data.path is required"]),
    (["adapter.r=0", "quant.method=nf5"], ["2 problem(s)", "adapter.r=0", "Did you mean 'nf4'"]),
    (["allocator=mimaloc"], ["allocator='mimaloc' is not one of", "Did you mean 'mimalloc'"]),
    # keys outside the schema, appended (+) or not: one list, the closest field, exit 2 (not SFTConfig's TypeError)
    (["+adapter.alhpa=64", "trainer.learning_rte=1e-4", "+model._target_=os.system"],
     ["3 problem(s)", "adapter.alhpa: no such setting in adapter", "Did you mean adapter.alpha? Fix: adapter.alpha=64",
      "trainer.learning_rte: no such setting in trainer", "Did you mean trainer.learning_rate?",
      "model._target_: no such setting in model"]),
])
def test_config_errors(cli_here, tmp_path, args, needles):
    run = tmp_path / "run"
    assert_clean_failure(cli_here("train", *TINY_CLI, *args, f"hydra.run.dir={run}"), "error:", *needles)
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()


@pytest.mark.parametrize("file, needles", [
    ("malformed.jsonl", ["malformed.jsonl:3: malformed JSON"]),
    ("wrong_columns.jsonl", ["cannot tell the data format", "['answer', 'question']", "data.columns"]),
])
def test_data_errors(cli_here, tmp_path, file, needles):
    run = tmp_path / "run"
    assert_clean_failure(cli_here("train", *TINY_CLI, "data=file", f"data.path={DATA / file}",
                                 f"hydra.run.dir={run}"), *needles)
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("override, needles", [
    ("trainer.max_steps=abc", ["trainer.max_steps=abc", "could not be converted to Integer"]),
    ("adapter=lorra", ["lorra", "Available options"]),
])
def test_bad_overrides(cli_here, tmp_path, override, needles):
    assert_clean_failure(cli_here("train", override, f"hydra.run.dir={tmp_path}/run"), *needles, code=1)


@pytest.mark.parametrize("earlier, needle", [("completed", "holds a completed run"), ("preempted", "malformed")])
def test_a_failed_rerun_keeps_the_earlier_results(cli_here, tmp_path, earlier, needle):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(f'{{"status": "{earlier}", "global_step": 7}}')
    assert_clean_failure(cli_here("train", *TINY_CLI, "data=file", f"data.path={DATA / 'malformed.jsonl'}",
                                  f"hydra.run.dir={run}"), needle)
    assert json.loads((run / "metrics.json").read_text()) == {"status": earlier, "global_step": 7}
    assert not (run / "environment.json").exists() or earlier != "completed"


def test_merge_and_chat_of_a_missing_run_fail_clearly(cli_here, tmp_path):
    assert_clean_failure(cli_here("merge", f"run={tmp_path}/nope"), "no such run directory")
    assert_clean_failure(cli_here("merge"), "run is required: add run=... to the command")
    assert_clean_failure(cli_here("chat", f"run={tmp_path}/nope", "prompt=hi"), "neither a run directory")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("setup, args, needles", [
    ("json", ["data=file"], ["malformed JSON"]),
    ("txt", ["data=file"], ["unsupported file type '.txt'"]),
    ("nocfg", [], ["without config.json"]),
    ("readonly", [], ["is not writable"]),
    ("readonly_run_dir", [], ["hydra.run.dir='/proc/qlora-lab-test-run' cannot be created or written"]),
    (None, ["trainer.lr_scheduler_type=sideways"], ["invalid trainer settings", "sideways"]),
    (None, ["trainer.max_length=8", "data.max_train_samples=8"], ["no training example has a trainable token"]),
    (None, ["adapter=full"], ["adapter=full with quant.method=nf4"]),
    (None, ["trainer.fp16=true", "trainer.bf16=true"], ["choose one"]),
])
def test_more_bad_inputs(cli_here, tmp_path, setup, args, needles):
    run = "/proc/qlora-lab-test-run" if setup == "readonly_run_dir" else tmp_path / "run"  # Hydra would mkdir it
    extra = list(args)
    if setup == "json":
        (tmp_path / "d.json").write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": }]')
        extra.append(f"data.path={tmp_path / 'd.json'}")
    elif setup == "txt":
        (tmp_path / "d.txt").write_text("hello")
        extra.append(f"data.path={tmp_path / 'd.txt'}")
    elif setup == "nocfg":
        (tmp_path / "model").mkdir()
        extra.append(f"model.name_or_path={tmp_path / 'model'}")
    elif setup == "readonly":  # /proc refuses new entries even to root
        extra.append("output_dir=/proc/qlora-lab-test-run")
    assert_clean_failure(cli_here("train", *TINY_CLI, *extra, f"hydra.run.dir={run}"), *needles)


def test_a_sweeper_storage_optuna_cannot_open_is_refused_up_front(monkeypatch):
    from importlib import metadata

    from qlora_lab.cli import sweeper_storage_problem

    versions = {"optuna": "2.10.1", "sqlalchemy": "2.1.9"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])
    storage = ["-m", "sweep=optuna_lr_rank", "hydra.sweeper.storage=sqlite:///optuna.db"]
    assert "pip install 'sqlalchemy>=1.4,<2'" in sweeper_storage_problem(storage)
    assert sweeper_storage_problem(["-m", "sweep=optuna_lr_rank"]) is None  # in-memory study: fine
    versions["sqlalchemy"] = "1.4.54"
    assert sweeper_storage_problem(storage) is None


@pytest.mark.integration
def test_optuna_sweep_with_sqlite_storage(tmp_path):
    """The [sweep] extra's SQLAlchemy opens the study database (with SQLAlchemy 2 the command refuses it)."""
    from importlib import metadata

    args = ["train", "-m", "sweep=optuna_lr_rank", "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", *TINY_CLI, "trainer.max_steps=1",
            "data.task_eval_samples=0", "score_before=false", "trainer.save_strategy=no",
            f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = run_cli(*args)
    if int(metadata.version("sqlalchemy").split(".")[0]) >= 2:
        assert_clean_failure(proc, "cannot open a database with SQLAlchemy")
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best value" in proc.stdout + proc.stderr and (tmp_path / "optuna.db").stat().st_size > 0
