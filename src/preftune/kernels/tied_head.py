"""The LM head's projection for a trainable head tied to the input embedding (full fine-tuning
under autocast): its bf16 weight gradient is held, not widened to fp32 at once.

``chunked_head_logps`` (forward.py) calls ``TiedHeadProjection.apply`` where ``applies`` says so;
the first call on a weight registers ``TiedHeadProjection._add_held`` as a gradient hook on that
weight (the embedding's gradient arrives through it), and the hook adds in what was held.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn


class TiedHeadProjection(torch.autograd.Function):
    """The LM head's matmul under autocast, for a trainable head tied to the input embedding.

    Plain autograd turns the head's bf16 weight gradient into fp32 at once (V x H: 113 MB on
    SmolLM2-135M) and holds it for the whole backward, until the embedding's gradient arrives
    at the end to be added. Here the bf16 gradient is held instead, and a hook on the weight
    adds it to the embedding's gradient before accumulation: the same fp32 sum of the same two
    values, so the same numbers (twin test in tests/test_packing.py). The forward is the call
    autocast makes (both cast to bf16, ``mm`` with the transposed weight), the gradients the
    ``mm`` calls autograd's backward makes.
    """

    enabled = True  # the twin test switches it off
    ADD_ROWS = 4096  # the fp32 += bf16 add upcasts this many rows at a time, not all V

    @staticmethod
    def applies(head: nn.Module, hidden: Tensor) -> bool:
        weight = getattr(head, "weight", None)
        device = hidden.device.type
        return (TiedHeadProjection.enabled and type(head) is nn.Linear and head.bias is None and torch.is_grad_enabled()
                and weight.requires_grad and torch.is_autocast_enabled(device) and hidden.dim() == 2
                and torch.get_autocast_dtype(device) != weight.dtype)  # fmt: skip

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor) -> Tensor:  # (n, H), (V, H) -> (n, V)
        dtype = torch.get_autocast_dtype(hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            logits = torch.mm(h, weight.to(dtype).t())
        ctx.save_for_backward(h)
        ctx.weight = weight  # the parameter itself: the held gradients live on it
        ctx.hidden_dtype = hidden.dtype
        if not hasattr(weight, "_preftune_head_grads"):
            weight._preftune_head_grads = []
            weight.register_hook(functools.partial(TiedHeadProjection._add_held, weakref.ref(weight)))
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,), weight = ctx.saved_tensors, ctx.weight
        grad_hidden = grad.mm(weight.to(grad.dtype)).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        weight._preftune_head_grads.append(grad.t().mm(h))  # (V, H) in bf16
        return grad_hidden, None

    @staticmethod
    def _add_held(weight_ref, grad: Tensor) -> Tensor:
        """Runs on the weight's incoming gradient (the embedding's), before accumulation."""
        held, rows = weight_ref()._preftune_head_grads, TiedHeadProjection.ADD_ROWS
        while held:  # in place, into autograd's own buffer; fp32 += bf16 computes in fp32
            part = held.pop()
            for start in range(0, part.shape[0], rows):
                grad[start : start + rows].add_(part[start : start + rows])
        return grad
