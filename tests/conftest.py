"""Shared fixtures: compose train configs like the CLI does, and a tiny-model training run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from qlora_lab.config import CONF_DIR, register_configs
from qlora_lab.validate import appendable_overrides

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# prepared data of the tests' runs: a fresh cache per test session (the model cache stays shared)
os.environ["QLORA_LAB_DATA_CACHE"] = tempfile.mkdtemp(prefix="qlora-lab-data-cache-")
# `make test` runs the suite in pytest-xdist workers (one per core, up to 4): each worker, and the CLI and rank
# processes it starts, gets its share of the cores, not all of them each (oversubscribed OpenMP threads spin)
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(min(_THREADS, torch.get_num_threads()))
register_configs()

# Small but real training settings for the tiny random model: seconds per run.
TINY = [
    "model=tiny-random",
    "data.max_train_samples=32",
    "data.max_eval_samples=8",
    "data.task_eval_samples=4",
    "data.max_new_tokens=8",
    "trainer.max_steps=3",
    "trainer.per_device_train_batch_size=4",
    "trainer.learning_rate=1e-3",
    "trainer.logging_steps=1",
    "trainer.eval_strategy=no",
    "trainer.save_steps=2",
]


def compose_train(overrides: list[str] = (), output_dir: Path | None = None) -> DictConfig:
    """The train config the CLI would build for ``overrides`` (output_dir set since no Hydra run dir exists)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # as qlora_lab.cli does: a key outside the schema is composed, for the validator to report
        cfg = compose(config_name="train", overrides=appendable_overrides("train", list(overrides)))
    with open_dict(cfg):
        cfg.output_dir = str(output_dir) if output_dir else "/nonexistent-run-dir"
    return cfg


@pytest.fixture
def captured(monkeypatch):
    """Keep the trainer that train() builds ("trainer") and every parameter as it was when training started
    ("before": after all adapter initialisation — LoftQ, PiSSA residuals — and before the first step)."""
    from transformers import Trainer

    from qlora_lab import trainer as trainer_mod

    box = {}
    build, real_train = trainer_mod.build_trainer, Trainer.train

    def spy(*args, **kwargs):
        box["trainer"] = build(*args, **kwargs)
        return box["trainer"]

    def snapshot_then_train(self, *args, **kwargs):
        box["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "build_trainer", spy)
    monkeypatch.setattr(Trainer, "train", snapshot_then_train)
    return box


@pytest.fixture
def cli_here(capfd, monkeypatch):
    """Run ``qlora-lab <args>`` through the CLI's own ``main`` in this process; a CompletedProcess as
    ``tests.test_cli.run_cli`` returns. The same code path as the command line (argument checks, Hydra composition,
    the command's error handling and exit code) without the ~7 s of imports a new process pays: for the tests of
    bad input that stop before training. The process-level parts (the allocator's re-exec, a clean environment, the
    hub kept offline) stay covered by the subprocess tests. Hydra's logging handlers and run config are undone after
    each call so that no later test logs into this one's run directory."""
    from hydra.core.hydra_config import HydraConfig

    from qlora_lab import cli

    def run(*args: str) -> subprocess.CompletedProcess:
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        hydra_cfg = HydraConfig.instance().cfg
        monkeypatch.setattr(sys, "argv", sys.argv[:])  # the CLI hands Hydra its overrides through sys.argv
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        capfd.readouterr()
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
                    handler.close()
            root.setLevel(level)
            HydraConfig.instance().cfg = hydra_cfg
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["qlora-lab", *args], code, out, err)

    return run


# The longest files first (2-core CPU, seconds alone): xdist's --dist loadfile hands each worker a whole file as it
# frees up, so a long file started last would be the run's tail.
LONGEST_FIRST = ("test_export.py", "test_scaleout.py", "test_e2e.py", "test_bench.py", "test_sweeps.py",
                 "test_distributed.py", "test_objectives.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
