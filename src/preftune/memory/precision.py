"""Which precision a run computes in: the weights' dtype and the autocast dtype, if any."""

from __future__ import annotations

import torch

from preftune.config import TrainConfig


def precision_name(cfg: TrainConfig) -> str:
    """Part of the reference cache key: cached log-probs are only reused at the same precision."""
    amp = "bf16" if cfg.training.bf16 else "fp16" if cfg.training.fp16 else "none"
    return f"weights={cfg.model.dtype}|autocast={amp}"


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if cfg.training.bf16 else torch.float16 if cfg.training.fp16 else None
