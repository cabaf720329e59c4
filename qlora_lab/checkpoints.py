"""Trainer checkpoints a resume can trust: on disk before they count as complete, and checked before they are used.

transformers 5.24's ``Trainer._save_checkpoint`` writes a checkpoint-N folder in this order: the model (adapter)
weights, optimizer and scheduler, scaler, RNG state, then ``trainer_state.json``, then it deletes the checkpoints
beyond ``save_total_limit``. It fsyncs nothing, so after a crash of the machine or a full disk a folder can hold
``trainer_state.json`` (the mark of a complete save) beside a truncated weights or optimizer file, and resuming from
it ends in a traceback (``SafetensorError: header too small``). Hence:

- :func:`fsync_tree` — :class:`qlora_lab.sft.QloraSFTTrainer` syncs every file of the folder before
  ``trainer_state.json`` is written, and that file and the folder right after, before an older checkpoint is deleted;
- :func:`problem` — what makes a folder unusable for a resume: a file the resume needs that is missing, or one that
  does not open (safetensors header and coverage, torch's zip directory and pickle, JSON). Cheap: tensors are
  memory-mapped, not read.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
# the weight files Trainer._load_from_checkpoint accepts (transformers 5.24), any one of them
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "pytorch_model.bin.index.json")
# the files the Trainer torch.loads on a resume, with weights_only=True (optimizer, scheduler, scaler, RNG state)
TORCH_LOADED = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "adapter_model.bin", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def problem(folder: Path, model_only: bool = False) -> str | None:
    """Why a resume cannot use the checkpoint ``folder``, or None if every file it reads is there and opens.

    ``model_only``: the run saves checkpoints without optimizer, scheduler and RNG state (trainer.save_only_model).
    """
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE} (its save was interrupted)"
    names = {p.name for p in folder.iterdir()}
    dirs = {p.name for p in folder.iterdir() if p.is_dir()}
    # FSDP and DeepSpeed write their own folders (pytorch_model_fsdp_0/, optimizer_0/, global_step123/)
    sharded = any(d.startswith(("pytorch_model_fsdp", "global_step")) for d in dirs)
    if not sharded and not names & set(WEIGHTS) and not any((folder / d / "adapter_config.json").is_file()
                                                              for d in dirs):
        return "no model or adapter weights (" + " / ".join(WEIGHTS[:2]) + ") in it"
    if not model_only and not any(d.startswith("global_step") for d in dirs):
        # without these the Trainer resumes silently with a fresh optimizer, schedule and random state
        if not names & {"optimizer.pt", "optimizer.bin"} and not any(d.startswith("optimizer") for d in dirs):
            return "optimizer.pt is missing"
        if "scheduler.pt" not in names:
            return "scheduler.pt is missing"
        if not any(n.startswith("rng_state") and n.endswith(".pth") for n in names):
            return "rng_state.pth is missing"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            why = _unreadable(folder / index)
            if why:
                return f"{index} is damaged ({why})"
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return f"{missing[0]} (listed in {index}) is missing"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        why = _unreadable(path)
        if why:
            return f"{path.relative_to(folder)} is damaged ({why})"
    return None


def _unreadable(path: Path) -> str | None:
    """Why ``path`` does not open as what its name says it is, or None (also for kinds not checked here)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            # reads the header and checks that it covers the file exactly: a truncated file fails here
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        elif path.suffix in TORCH_SUFFIXES:
            # torch.save writes a zip whose directory is at the end, so any truncation loses it
            if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
                return "not a complete torch file: its zip directory is missing, so it was cut short"
            if path.name in TORCH_LOADED or (path.name.startswith("rng_state") and path.suffix == ".pth"):
                _torch_load(path)
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
    return None


def _torch_load(path: Path) -> None:
    """Load ``path`` as the Trainer would on a resume (weights_only, numpy allowed for the RNG state), memory-mapped
    so that the tensors are not read."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then each folder under it and ``folder`` itself (their entries)."""
    dirs = []
    for root, subdirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        dirs.append(Path(root))
    for d in reversed(dirs):
        fsync_path(d)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
