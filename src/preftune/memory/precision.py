"""Which precision a run computes in: the weights' dtype and the autocast dtype, if any.

``resolve_precision`` turns the config's ``bf16`` / ``fp16`` (true, false or auto) into the
autocast the run uses, once, before anything reads them (hardware.py decides ``auto``); every
later reader (row-length multiple, compaction, short-row attention, bf16 weight gradients, the
reference cache key) then follows the chosen precision.
"""

from __future__ import annotations

import dataclasses

import torch

from preftune import hardware
from preftune.config import TrainConfig


def resolve_precision(cfg: TrainConfig, device: torch.device, cpu: hardware.CpuInfo | None = None,
                      ) -> tuple[TrainConfig, hardware.Precision]:  # fmt: skip
    """``cfg`` with ``bf16`` / ``fp16`` as booleans for ``device``, and the decision with its reason."""
    t = cfg.training
    precision = hardware.choose_precision(t.bf16, t.fp16, device, cpu)
    training = dataclasses.replace(t, bf16=precision.bf16, fp16=precision.fp16)
    return dataclasses.replace(cfg, training=training), precision


def _amp(cfg: TrainConfig) -> str:
    """bf16, fp16 or none. fp16 "auto" is never chosen; bf16 "auto" must be resolved first."""
    t = cfg.training
    if t.bf16 is True or t.fp16 is True:
        return "bf16" if t.bf16 is True else "fp16"
    if t.bf16 == "auto":
        raise ValueError("bf16 is still 'auto': call resolve_precision(cfg, device) first")
    return "none"


def precision_name(cfg: TrainConfig) -> str:
    """Part of the reference cache key: cached log-probs are only reused at the same precision."""
    return f"weights={cfg.model.dtype}|autocast={_amp(cfg)}"


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[_amp(cfg)]
