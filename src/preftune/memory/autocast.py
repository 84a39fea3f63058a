"""The training autocast, and the saved-tensor hooks that keep weight casts out of autograd's memory."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from preftune.config import TrainConfig
from preftune.memory.precision import autocast_dtype


def make_autocast(cfg: TrainConfig, device: torch.device):
    # cache_enabled=False: the cache keeps every weight's low-precision cast until the forward
    # ends; each weight is cast once per forward anyway, and with gradient checkpointing the
    # casts then die layer by layer (-160 MB peak on SmolLM2-135M full fine-tuning, same numbers)
    dtype = autocast_dtype(cfg)
    if dtype is None:
        return nullcontext

    @contextmanager
    def autocast():
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False), recast_saved_weight_casts():
            yield

    return autocast


def recast_saved_weight_casts():
    """Autograd keeps what a matmul needs for backward, and under autocast that includes the
    low-precision cast of every trainable fp32 weight, from the forward until its backward (full
    fine-tuning of SmolLM2-135M: 270 MB). Instead keep a reference to the weight and cast it again
    when backward needs it: the same cast of the same values, so the same numbers."""
    return torch.autograd.graph.saved_tensors_hooks(_pack_weight_cast, _unpack_weight_cast)


def _pack_weight_cast(saved: torch.Tensor):
    base = saved if saved._base is None else saved._base  # linear saves a transposed view of the cast
    cast = base.grad_fn
    if type(cast).__name__ == "ToCopyBackward0":
        source = cast.next_functions[0][0]
        weight = getattr(source, "variable", None)  # AccumulateGrad of a leaf: the parameter itself
        if (weight is not None and weight.shape == base.shape and weight.dtype != base.dtype
                and base.is_contiguous() and weight.is_contiguous()):  # fmt: skip
            return (weight, base.dtype, saved.size(), saved.stride(), saved.storage_offset())
    return saved


def _unpack_weight_cast(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    weight, dtype, size, stride, offset = packed
    return weight.detach().to(dtype).as_strided(size, stride, offset)
