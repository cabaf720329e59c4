"""Multi-process runs (torchrun / accelerate launch): one shared run dir, rank-0-only artifacts.

The training itself is distributed by the Trainer (accelerate): DDP, FSDP or DeepSpeed as launched. This module
only fixes what Hydra cannot know: every rank composes its own config, and ``${now:...}`` in the default run dir
can differ between ranks by a second. Before Hydra starts, rank 0's timestamp is broadcast over the process group
(which accelerate then reuses) and passed to every rank as ``hydra.run.dir``.
"""

from __future__ import annotations

import datetime as dt
import os

import torch


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
