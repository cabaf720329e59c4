"""Scale-out executed on CPU ranks (gloo), each against one process with the same global batch:

- FSDP through ``accelerate launch`` with the shipped FSDP config (LoRA on a float base; QLoRA with the 4-bit weights
  stored in the model's dtype), the adapter gathered onto rank 0 and accepted by ``qlora-lab merge``;
- two torchrun "nodes" on this machine meeting at a c10d rendezvous, with the sbatch script's own command line;
- SIGTERM to one rank of two: both stop at the same step with one checkpoint, and the rerun resumes on 2 ranks.

accelerate 1.15 does not shard on CPU ranks by itself (tests/shims/sharding_on_cpu/sitecustomize.py says where);
the FSDP tests lift that one gate and run everything after it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_cli import ROOT
from tests.test_distributed import COMMON, env, fake_slurm, free_port, trajectory
from tests.test_reliability import ChildOutput

pytestmark = pytest.mark.integration
SHIM = ROOT / "tests/shims/sharding_on_cpu"
# the held-out task score generates on rank 0 alone, which the validator refuses under FSDP (validate.py)
BASE = [*COMMON, "data.task_eval_samples=0"]


def run(args: list[str], cwd: Path, extra_env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 4 (= 2 ranks x 2): the reference run per quantization, trained once for the module."""
    done: dict[str, Path] = {}

    def reference(quant: str, *extra: str) -> Path:
        key = " ".join([quant, *extra])
        if key not in done:
            out = tmp_path_factory.mktemp("single")
            run([sys.executable, "-m", "qlora_lab", "train", *BASE, *quant_args(quant), *extra,
                 "trainer.per_device_train_batch_size=4", f"hydra.run.dir={out / 'run'}"], out)
            done[key] = out / "run"
        return done[key]

    return reference


def quant_args(quant: str) -> list[str]:
    # FSDP shards floating-point tensors of one dtype per unit: the 4-bit weights stored in the model's dtype
    return ["quant=nf4", "quant.quant_storage=float32"] if quant == "nf4" else ["quant=none"]


def assert_same_run(a_dir: Path, b_dir: Path, quant: str) -> None:
    """Same adapter (to float rounding of a different all-reduce order) and the same losses / gradient norms."""
    a = load_file(a_dir / "adapter/adapter_model.safetensors")
    b = load_file(b_dir / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    tol = 1e-4 if quant == "none" else 2e-2  # QLoRA adapters are bf16 (tests/test_distributed.py)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=tol), (k, (a[k].float() - b[k].float()).abs().max())
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    hist = [trajectory(d) for d in (a_dir, b_dir)]
    assert len(hist[0]) == len(hist[1]) > 0
    assert hist[0] == pytest.approx(hist[1], rel=1e-3 if quant == "none" else 8e-3)


def cpu_fsdp_config(tmp_path: Path, version: int) -> Path:
    """conf/accelerate/fsdp_qlora.yml as shipped, for CPU ranks: use_cpu, and no parameter offload (the parameters
    are in CPU RAM already; FSDP2's CPUOffloadPolicy pins memory, which needs an accelerator)."""
    conf = yaml.safe_load((ROOT / "conf/accelerate/fsdp_qlora.yml").read_text())
    conf["use_cpu"] = True
    conf["fsdp_config"]["fsdp_offload_params"] = False
    conf["fsdp_config"]["fsdp_version"] = version
    path = tmp_path / f"fsdp{version}_cpu.yml"
    path.write_text(yaml.safe_dump(conf))
    return path


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fsdp2_two_ranks_match_one_process_and_save_one_mergeable_adapter(tmp_path, single, quant):
    config = cpu_fsdp_config(tmp_path, 2)
    out = tmp_path / "fsdp"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                "2", "--main_process_port", str(free_port()), "-m", "qlora_lab", "train", *BASE, *quant_args(quant),
                "trainer.per_device_train_batch_size=2", f"hydra.run.dir={out}"], tmp_path,
               {"PYTHONPATH": f"{SHIM}:{ROOT}", "QLORA_LAB_TEST_FSDP_ON_CPU": "1"})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"] == "FSDP2", proc.stderr[-3000:]
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    assert_same_run(out, single(quant), quant)
    # the adapter folder is the one a single process writes, and merge takes it
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(
        p.name for p in (single(quant) / "adapter").iterdir())
    run([sys.executable, "-m", "qlora_lab", "merge", f"run={out}"], tmp_path)
    assert (out / "merged/config.json").is_file() and list((out / "merged").glob("*.safetensors"))


def test_an_fsdp_config_on_cpu_ranks_trains_as_data_parallel_and_says_so(tmp_path):
    """Without the test shim: what accelerate 1.15 does with an FSDP config on CPU ranks (state.py)."""
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_fsdp_config(tmp_path, 2)),
                "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "qlora_lab", "train", *BASE,
                "quant=none", "trainer.max_steps=1", "trainer.per_device_train_batch_size=2",
                f"hydra.run.dir={out}"], tmp_path)
    assert json.loads((out / "metrics.json").read_text())["distributed"] == "DDP"
    assert "launched for FSDP, but accelerate runs this as DDP" in proc.stdout + proc.stderr


DEEPSPEED = importlib.util.find_spec("deepspeed")


@pytest.mark.skipif(DEEPSPEED is None, reason="deepspeed is not installed (pip install --no-build-isolation deepspeed)")
@pytest.mark.parametrize("stage, quant", [(2, "none"), (3, "nf4")])
def test_deepspeed_zero_two_ranks_match_one_process(tmp_path, single, stage, quant):
    """conf/accelerate/deepspeed_zero{2,3}.yml on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo). Changed for CPU:
    use_cpu, and mixed_precision 'no' (the shipped bf16 would make the fp32 comparison meaningless)."""
    conf = yaml.safe_load((ROOT / f"conf/accelerate/deepspeed_zero{stage}.yml").read_text())
    conf.update(use_cpu=True, mixed_precision="no")
    config = tmp_path / "deepspeed.yml"
    config.write_text(yaml.safe_dump(conf))
    out = tmp_path / "run"
    where = str(Path(DEEPSPEED.origin).parent.parent)  # deepspeed's site dir, wherever it was installed
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                "2", "--main_process_port", str(free_port()), "-m", "qlora_lab", "train", *BASE, *quant_args(quant),
                "trainer.per_device_train_batch_size=2", f"hydra.run.dir={out}"], tmp_path,
               {"PYTHONPATH": f"{ROOT}:{where}"})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"] == f"DeepSpeed ZeRO-{stage}", proc.stdout[-3000:]
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    assert_same_run(out, single(quant), quant)


def test_two_nodes_on_one_machine_train_one_run_like_one_process(tmp_path, single):
    """examples/slurm/train_multigpu.sbatch started twice, as node 0 and node 1 of a fake 2-node allocation (stub
    srun / scontrol): each runs its torchrun line (--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d
    --rdzv_endpoint localhost:PORT), the two meet at the rendezvous and train into one shared run dir: one adapter,
    equal to one process with the same global batch."""
    out = tmp_path / "shared_run"
    slurm = {**fake_slurm(tmp_path, "4242"), "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "1",
             "PYTHON": sys.executable, "RUN_DIR": str(out)}
    # the stub srun, also recording the command it runs
    (tmp_path / "bin/srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                       'echo "$@" >> "$(dirname "$0")/srun.log"\nexec "$@"\n')
    nodes = [subprocess.Popen(["bash", str(ROOT / "examples/slurm/train_multigpu.sbatch"), *BASE, "quant=none",
                               "trainer.per_device_train_batch_size=2"], cwd=tmp_path,
                              env={**slurm, "SLURM_NODEID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for i in range(2)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            end_group(node)
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    launched = [" ".join(line.split()) for line in (tmp_path / "bin/srun.log").read_text().splitlines()]
    assert len(launched) == 2 and all("torch.distributed.run --nnodes 2 --nproc_per_node 1 --rdzv_id 4242 "
                                      "--rdzv_backend c10d --rdzv_endpoint localhost:" in line for line in launched)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3 and metrics["distributed"] == "DDP"
    assert [p.name for p in out.glob("adapter*")] == ["adapter"]
    assert_same_run(out, single("none"), "none")


def test_sigterm_to_one_of_two_ranks_stops_both_at_one_step_and_the_rerun_resumes_on_two(tmp_path):
    """SIGTERM to rank 1 only: both ranks stop at the same step boundary (the flag is all-reduced every step),
    one checkpoint, both exit 143; the same command again resumes on 2 ranks and ends where an uninterrupted
    2-rank run ends."""
    out = tmp_path / "run"
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qlora_lab", "train",
           *[o for o in BASE if not o.startswith(("trainer.max_steps", "trainer.save_strategy"))],
           "quant=none", "trainer.per_device_train_batch_size=2", "trainer.save_strategy=steps",
           "trainer.save_steps=1000"]
    launcher = subprocess.Popen([*two, "trainer.max_steps=100", f"hydra.run.dir={out}"], cwd=tmp_path, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = ChildOutput(launcher)
    try:
        if not output.wait_for("'loss'", timeout=300):  # training under way (rank 0 logs every step)
            pytest.fail("no training step was logged within 300 s:\n" + output.text()[-3000:])
        os.kill(worker_pid(launcher.pid, rank=1), signal.SIGTERM)
        launcher.wait(timeout=300)
    finally:
        end_group(launcher)
    text = output.text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "preempted" and metrics["signal"] == "SIGTERM", text[-3000:]
    step = metrics["global_step"]
    assert 0 < step < 100
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == [f"checkpoint-{step}"]
    # every rank exited 143 at that step; torchrun reports its failed workers and exits 1 (torch/distributed/run.py)
    exits = set(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (\d+)", text))
    assert launcher.returncode == 1 and exits == {("0", "143"), ("1", "143")}, text[-3000:]
    assert text.count(f"stopped by SIGTERM at step {step}") == 2, text[-3000:]

    run([*two, f"trainer.max_steps={step + 2}", f"hydra.run.dir={out}"], tmp_path)
    final = json.loads((out / "metrics.json").read_text())
    assert final["status"] == "completed" and final["resumed_from"].endswith(f"checkpoint-{step}")
    assert final["world_size"] == 2 and final["global_step"] == step + 2
    whole = tmp_path / "whole"
    run([*two, f"trainer.max_steps={step + 2}", f"hydra.run.dir={whole}"], tmp_path)
    a = load_file(out / "adapter/adapter_model.safetensors")
    b = load_file(whole / "adapter/adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    assert trajectory(out)[-4:] == pytest.approx(trajectory(whole)[-4:], rel=1e-4)


def worker_pid(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of the torchrun worker process with RANK=rank (torchrun starts its workers as its children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.5)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


def end_group(proc: subprocess.Popen) -> None:
    """Kill a launcher started with start_new_session=True and every process it started (its workers too, which a
    kill of the launcher alone would leave running when a test fails)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the launcher and all its workers have exited
    proc.wait()
