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


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def zero_stage(t, problems: list[str] | None = None) -> int | None:
    """The DeepSpeed ZeRO stage this run is launched with, or None without DeepSpeed (read before anything starts:
    the validator's and the plan's view; ``t`` is the ``trainer`` config group). An unreadable config file is added
    to ``problems``.

    ``trainer.deepspeed`` (a JSON file or a mapping, as for TrainingArguments) wins over what ``accelerate launch``
    exports: ACCELERATE_USE_DEEPSPEED=true with ACCELERATE_DEEPSPEED_ZERO_STAGE, or ACCELERATE_DEEPSPEED_CONFIG_FILE
    (accelerate/utils/launch.py, prepare_deepspeed_cmd_env). Without a stage, accelerate's DeepSpeedPlugin uses 2.
    """
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    ds = t.get("deepspeed")
    if not ds and not env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    if not ds and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    source = ds or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if OmegaConf.is_dict(source):
        conf = OmegaConf.to_container(source)
    elif source:
        key = "trainer.deepspeed" if ds else "ACCELERATE_DEEPSPEED_CONFIG_FILE"
        try:
            conf = json.loads(Path(str(source)).expanduser().read_text())
        except (OSError, ValueError) as e:
            if problems is not None:
                problems.append(f"{key}={str(source)!r}: not a readable DeepSpeed JSON config ({e}).")
            return None
    else:
        return 2
    stage = (conf.get("zero_optimization") or {}).get("stage", 0)
    return stage if isinstance(stage, int) else None


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


def stop_signal_on_any_rank(signum: int) -> int:
    """The largest signal number any rank has received (0: none), agreed by all ranks; ``signum`` unchanged in one
    process. Collective: every rank calls it at the same step.

    A scheduler may signal one process only (``kill`` of a rank, a node's own OOM killer), and a rank that stops
    alone leaves the others blocked in the next all-reduce. One scalar all-reduce (MAX) per step makes every rank
    stop at the same step boundary, where the Trainer's control saves one checkpoint (collectively) and ends.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return signum
    # NCCL reduces tensors on the rank's GPU only; gloo on CPU
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([signum], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def sharded_by(trainer) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when the trainer's accelerator shards the model's weights, else None."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def gathered_state_dict(trainer) -> dict | None:
    """The model's whole state dict, gathered from the shards onto rank 0 (CPU), when FSDP or ZeRO-3 shard it;
    None when every rank holds whole weights. Collective: every rank must call it.

    accelerate's ``Accelerator.get_state_dict`` (accelerate/accelerator.py) is the gather transformers' own
    ``Trainer.save_model`` uses: FSDP2 ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` (a full
    dict on rank 0, empty elsewhere), FSDP1 ``FULL_STATE_DICT`` with ``rank0_only``, ZeRO-3
    ``_zero3_consolidated_16bit_state_dict`` (needs ``zero3_save_16bit_model: true``). ``Trainer.save_model`` itself
    gathers under FSDP only when the plugin's ``state_dict_type`` is FULL_STATE_DICT (transformers/trainer.py), and
    the shipped FSDP config keeps SHARDED_STATE_DICT for fast checkpoints; hence the explicit call here.
    """
    if sharded_by(trainer) is None:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def strategy(trainer) -> str:
    """How the trainer's accelerator distributes this run: "FSDP1", "FSDP2", "DeepSpeed ZeRO-<n>", "DDP" or "none"
    (recorded in metrics.json: what ran, not what was asked for)."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "none" if kind == DistributedType.NO else "DDP"


def warn_if_not_sharded(trainer) -> None:
    """Say so when accelerate was launched for FSDP / DeepSpeed but runs plain data parallel.

    accelerate 1.15 ``AcceleratorState.__init__`` (accelerate/state.py) enables FSDP only for GPU-like distributed
    types (its branch lists MULTI_GPU, MULTI_XPU, MULTI_NPU, ...; not MULTI_CPU) and DeepSpeed only ``and not cpu``:
    on CPU ranks both configs silently train as data parallel, every rank holding the whole model.
    """
    asked = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(env, "").strip().lower() in ("1", "true", "yes")]
    got = strategy(trainer)
    if asked and not got.startswith(asked[0][:4]):
        log.warning("launched for %s, but accelerate runs this as %s (device %s): accelerate shards with %s on GPU-like "
                    "devices only, so every rank holds the whole model.", asked[0], got, trainer.args.device, asked[0])
