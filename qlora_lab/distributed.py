"""Multi-process runs (torchrun / accelerate launch): one shared run dir, rank-0-only artifacts.

The training itself is distributed by the Trainer (accelerate): DDP, FSDP or DeepSpeed as launched. This module
only fixes what Hydra cannot know: every rank composes its own config, and ``${now:...}`` in the default run dir
can differ between ranks by a second. Before Hydra starts, rank 0's timestamp is broadcast over the process group
(which accelerate then reuses) and passed to every rank as ``hydra.run.dir``.

SLURM through submitit (``launcher=slurm_multigpu``): submitit starts one process per GPU itself, without torchrun;
:class:`SlurmTasksAsRanks` turns SLURM's task ids into the torch.distributed environment in each of them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

import torch
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def shared_run_dir(args: list[str]) -> list[str]:
    """``args`` plus ``hydra.run.dir=outputs/<rank 0's time>`` when launched on several processes without one."""
    if world_size() < 2 or "-m" in args or "--multirun" in args or any(a.startswith("hydra.run.dir=") for a in args):
        return args
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    stamp = [dt.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    return [*args, f"hydra.run.dir=outputs/{stamp[0]}"]


def export_slurm_ranks() -> bool:
    """Under a submitit SLURM job with several tasks and no torchrun/accelerate launcher: export the torch.distributed
    environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = the job's first host, MASTER_PORT =
    derived from the job id unless set) from SLURM's task ids. Returns whether it did.

    Neither submitit nor hydra-submitit-launcher does this by itself: submitit starts ``tasks_per_node`` copies of the
    job function per node and offers ``submitit.helpers.TorchDistributedEnvironment`` for the job to call.
    CUDA_VISIBLE_DEVICES is left alone: every task sees the node's GPUs and takes the one of its LOCAL_RANK, as under
    torchrun (so the cluster must not bind one GPU per task).
    """
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    # overwrite: a MASTER_PORT / MASTER_ADDR already set is kept by TorchDistributedEnvironment itself (port) or
    # replaced by the job's first host (address)
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    log.info("SLURM task → rank %d of %d (local rank %d), rendezvous at %s:%s", env.rank, env.world_size,
             env.local_rank, env.master_addr, env.master_port)
    return True


class SlurmTasksAsRanks(Callback):
    """Hydra callback of ``launcher=slurm_multigpu``: the tasks of one SLURM job become the ranks of one run.

    ``on_job_start`` runs in every task, after Hydra has set up the job (its run dir is the same for all tasks of a
    job) and before ``train`` builds the Trainer, which then initialises the process group from the exported
    environment exactly as under torchrun.
    """

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        try:
            export_slurm_ranks()
        except Exception as e:  # Hydra turns a callback's Exception into a warning: the tasks would then train apart
            raise SystemExit(f"error: could not set up torch.distributed from SLURM's task ids: {e}") from e
