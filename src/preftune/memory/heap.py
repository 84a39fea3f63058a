"""The process's memory: handing freed heap back to the OS, and reading the RSS and its peaks."""

from __future__ import annotations

import ctypes
import resource

import torch


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def return_free_memory() -> None:
    """Hand the heap memory glibc keeps after ``free`` back to the OS (costs a re-fault of it later)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return None


class HeapTrimmer:
    """glibc keeps freed heap chunks for reuse and they fragment: without a trim the RSS between
    steps creeps up by tens of MB a step, and the peak with it (SmolLM2-135M LoRA, bench/vs_trl.py
    case a: +390 MB over 8 steps). Trimming every step costs ~10% of step time (the memory is
    faulted back in), so trim only once the RSS after a step has grown ``slack_mb`` past the
    first step after the last trim."""

    def __init__(self, slack_mb: float = 256.0):
        self.slack_mb = slack_mb
        self.floor: float | None = None
        self.trims = 0

    def after_step(self) -> None:
        rss = current_rss_mb() if _malloc_trim is not None else None
        if rss is None:
            return
        if self.floor is None:
            self.floor = rss
        elif rss > self.floor + self.slack_mb:
            return_free_memory()
            self.trims += 1
            self.floor = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_gpu_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
