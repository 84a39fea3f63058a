"""Linear weight gradients held in bf16 between backward and the optimizer step (full fine-tuning
under bf16 autocast): the same numbers as fp32 gradients, half the memory."""

from __future__ import annotations

import functools

import torch
from torch import nn


class Bf16WeightGrads:
    """Gradients of Linear weights held in bf16 between backward and the optimizer step.

    Under bf16 autocast a Linear weight's gradient is a bf16 matmul result that autograd casts
    to fp32, so a bf16 copy holds the same numbers in half the memory (full fine-tuning of
    SmolLM2-135M: -212 MB at the end of backward, where the peak is with checkpointing).
    Bias-free ``nn.Linear`` layers run as ``HeldGradLinear`` under bf16 autocast and hand over
    the bf16 result itself; any other trainable fp32 Linear weight has a hook that moves its
    gradient out of ``.grad`` as backward produces it: the first time, it checks that the
    conversion is exact, and a weight whose gradient is not (say, a layer run in fp32) keeps
    fp32 gradients. A second gradient in the same step (gradient accumulation, a weight used
    twice) is added in fp32 as autograd would. ``clip_and_step`` then does what clip_grad_norm_
    and one optimizer step do, with the same numbers, upcasting a few tensors at a time.
    """

    def __init__(self, model: nn.Module, chunk_numel: int = 16 * 2**20):
        self.grads: dict[nn.Parameter, torch.Tensor] = {}
        self.checked: set[nn.Parameter] = set()
        self.fp32_only: set[nn.Parameter] = set()  # failed the exactness check
        self.chunk_numel = chunk_numel
        embed = model.get_input_embeddings().weight
        linears = [
            m for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.dtype == torch.float32
            and m.weight is not embed  # a tied head also gets the embedding's fp32 gradient
        ]  # fmt: skip
        self.handles = [m.weight.register_post_accumulate_grad_hook(self._take) for m in linears]
        self.rerouted = [m for m in linears if type(m) is nn.Linear and m.bias is None]
        for module in self.rerouted:  # an instance attribute: nn.Module.__call__ finds it first
            module.forward = functools.partial(self._linear_forward, module)

    def _linear_forward(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if (torch.is_grad_enabled() and torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == torch.bfloat16):  # fmt: skip
            return HeldGradLinear.apply(x, module.weight, self)
        return nn.Linear.forward(module, x)

    def _take(self, param: nn.Parameter) -> None:
        grad = param.grad
        if grad is None:  # HeldGradLinear's weight: its gradient is held already
            return
        param.grad = None
        self.add(param, grad, exact=False)

    def add(self, param: nn.Parameter, grad: torch.Tensor, exact: bool) -> None:
        """Hold ``grad`` for ``param``; ``exact``: ``grad`` is the bf16 matmul result itself."""
        previous = self.grads.get(param)
        if previous is not None:  # a second gradient this step: add in fp32, as autograd would
            self.grads[param] = previous.float() + grad
            return
        low = grad if exact else grad.to(torch.bfloat16)
        if param not in self.checked:
            self.checked.add(param)
            if not exact and not torch.equal(low.float(), grad):
                self.fp32_only.add(param)
        self.grads[param] = grad.float() if param in self.fp32_only else low

    def clip_and_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> float:
        """``clip_grad_norm_(params, max_norm)`` then ``optimizer.step()`` with the same numbers: the
        norm of the per-tensor norms of the fp32 gradients in parameter order, every gradient times
        the clamped coefficient, each parameter updated once (AdamW skips those without a gradient)."""
        # a bf16 gradient's norm accumulates in fp32: the same number as the norm of its fp32 upcast
        held = [self.grads.get(p, p.grad) for p in params]
        norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in held if g is not None]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms else torch.zeros(())
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        clips = coef.item() < 1.0  # times 1.0 changes no bit: skip that pass over every gradient
        pending = [p for p in params if p.grad is not None]  # gradients not held here, in fp32
        if clips:
            for p in pending:
                p.grad.mul_(coef)
        numel = 0
        for p in params:
            if p in self.grads:
                p.grad = self.grads.pop(p).float()
                if clips:
                    p.grad.mul_(coef)
                pending.append(p)
                numel += p.numel()
            if numel >= self.chunk_numel:
                self._step(optimizer, pending)
                pending, numel = [], 0
        if pending:
            self._step(optimizer, pending)
        return total.item()

    @staticmethod
    def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        optimizer.step()
        for p in params:
            p.grad = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.rerouted:
            del module.forward


class HeldGradLinear(torch.autograd.Function):
    """A bias-free Linear under bf16 autocast that hands its bf16 weight gradient to ``held``.

    The forward is the call autocast's linear makes (cast input and weight to bf16, ``mm`` with
    the transposed weight), and the backward the two ``mm`` calls autograd's makes, with the
    weight cast again as ``recast_saved_weight_casts`` does. Autograd would then cast the bf16
    weight gradient to fp32 and ``Bf16WeightGrads`` back to bf16; here it is held as it comes:
    the same numbers, two passes over every weight fewer per step (twin test in test_train.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, held: Bf16WeightGrads) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x2d = x.to(torch.bfloat16).reshape(-1, x.shape[-1])  # (N, in)
            out = x2d.mm(weight.to(torch.bfloat16).t())  # (N, out)
        ctx.save_for_backward(x2d)
        ctx.weight, ctx.held, ctx.x_shape = weight, held, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x2d,), weight = ctx.saved_tensors, ctx.weight
        grad2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad2d.mm(weight.to(grad.dtype)).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        ctx.held.add(weight, grad2d.t().mm(x2d), exact=True)  # (out, in) bf16
        return grad_x, None, None
