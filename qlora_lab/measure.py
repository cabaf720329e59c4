"""A run's peak memory: CUDA's max allocated, else the process's peak RSS (Linux: reset per run, so the jobs of a
sweep that share one process each get their own)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch


def reset_peak() -> None:
    """Start this run's peak-memory window (several multirun jobs share one process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb() -> float:
    """Peak memory since reset_peak: CUDA max allocated, else the process's peak RSS, in MiB."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # lifetime peak (KiB on Linux)


def limit_cuda_memory(budget_gb) -> float | None:
    """Cap this process's CUDA memory at ``budget_gb`` GiB (a number; "auto" or None: no cap) with
    ``torch.cuda.set_per_process_memory_fraction``, so that a run or a bench on a large card fails where the smaller
    card would (the caching allocator raises OutOfMemoryError past the fraction). Returns the fraction set, or None
    (no CUDA, or no number: then any earlier cap of this process is lifted, so that a sweep's jobs sharing one
    process do not inherit it). The device is this process's: LOCAL_RANK under torchrun/accelerate, else 0."""
    if not torch.cuda.is_available():
        return None
    device = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    if not isinstance(budget_gb, (int, float)) or isinstance(budget_gb, bool):
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        return None
    total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    fraction = min(1.0, float(budget_gb) / total_gb)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
