"""torchrun on CPU (gloo): one run dir, rank-0 artifacts, and the same adapter as one process with the same global
batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import ROOT

pytestmark = pytest.mark.integration
# fp32 and no dropout, so that 2 ranks x batch 2 and 1 process x batch 4 must agree to float rounding
COMMON = ["model=tiny-random", "model.dtype=float32", "trainer.bf16=false", "adapter.dropout=0",
          "data.max_train_samples=32", "data.task_eval_samples=2", "data.max_new_tokens=4", "trainer.max_steps=3",
          "trainer.logging_steps=1",
          "trainer.eval_strategy=no", "trainer.save_strategy=no",
          # plain SGD: weights move linearly with the gradients (Adam would amplify rounding-level sign flips)
          "trainer.optim=sgd", "trainer.learning_rate=0.5", "trainer.lr_scheduler_type=constant"]


def env() -> dict:
    # CPU + gloo on every machine (a 1-GPU box cannot hold 2 CUDA ranks)
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_torchrun_two_ranks_matches_one_process_with_the_same_global_batch(tmp_path, quant):
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "qlora_lab",
                          "train", *COMMON, f"quant={quant}", "trainer.per_device_train_batch_size=2"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # both ranks agreed on one run dir
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3

    single = tmp_path / "single"
    one = subprocess.run([sys.executable, "-m", "qlora_lab", "train", *COMMON, f"quant={quant}",
                          "trainer.per_device_train_batch_size=4", f"hydra.run.dir={single}"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(run / "adapter/adapter_model.safetensors")
    b = load_file(single / "adapter/adapter_model.safetensors")
    # fp32: gradients all-reduced across ranks sum in another order (measured 4e-5 after 3 steps at lr 0.5);
    # QLoRA adapters are bf16: a few bf16 ulps apart
    tol = 1e-4 if quant == "none" else 2e-2
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=tol), (k, (a[k].float() - b[k].float()).abs().max())
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    # the same trajectory, step by step (losses and gradient norms are all-reduced over ranks)
    hist = [trajectory(d) for d in (run, single)]
    # QLoRA's gradient norms are bf16: one ulp (2^-8 relative) apart at most
    assert len(hist[0]) == 6 and hist[0] == pytest.approx(hist[1], rel=1e-3 if quant == "none" else 8e-3)
    # the "before" scores ran in both (an evaluate() before train() once kept DDP from wrapping the model)
    before = [json.loads((d / "metrics.json").read_text()) for d in (run, single)]
    assert before[0]["eval_loss_before"] == pytest.approx(before[1]["eval_loss_before"], rel=1e-4)
    assert before[0]["task_score_before"] == before[1]["task_score_before"]


def trajectory(run_dir) -> list[float]:
    """Loss and gradient norm of every logged step."""
    return [v for e in json.loads((run_dir / "log_history.json").read_text()) if "loss" in e
            for v in (e["loss"], e["grad_norm"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_slurm(tmp_path, job_id: str) -> dict:
    """A one-node SLURM allocation on this machine: srun runs its command once, scontrol names localhost."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": job_id,
            "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
            "MASTER_PORT": str(free_port())}


def test_slurm_sbatch_torchrun_and_submitit_tasks_train_the_same_two_rank_run(tmp_path):
    """The two SLURM paths on a fake one-node allocation, 2 CPU ranks each: examples/slurm/train_multigpu.sbatch
    (srun → torchrun, c10d rendezvous) and launcher=slurm_multigpu's callback (2 submitit tasks → RANK,
    WORLD_SIZE)."""
    overrides = [*COMMON, "quant=none", "trainer.per_device_train_batch_size=2"]
    sbatch_run = tmp_path / "sbatch_run"
    slurm = fake_slurm(tmp_path, "101")
    proc = subprocess.run(["bash", str(ROOT / "examples/slurm/train_multigpu.sbatch"), *overrides],
                          env={**slurm, "GPUS_PER_NODE": "2", "PYTHON": sys.executable, "RUN_DIR": str(sbatch_run)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # what submitit does with tasks_per_node=2: the same job function in 2 processes, told apart by SLURM_PROCID
    tasks_run = tmp_path / "tasks_run"
    tasks = [subprocess.Popen([sys.executable, "-m", "qlora_lab", "train", "launcher=slurm_multigpu", *overrides,
                               f"hydra.run.dir={tasks_run}"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**slurm, "SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "2",
                                   "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}) for i in range(2)]
    for task in tasks:
        _, err = task.communicate(timeout=600)
        assert task.returncode == 0, err[-3000:]

    for run in (sbatch_run, tasks_run):
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    assert len(trajectory(sbatch_run)) == 6 and trajectory(sbatch_run) == pytest.approx(trajectory(tasks_run), rel=1e-4)
