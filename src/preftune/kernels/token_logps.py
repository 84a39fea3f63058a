"""log p(target) from (n, V) logits, a block of rows at a time (the chunked LM head's last step)."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(n, V) logits -> log p(target), vocabulary-mean logit; fp32 like ``completion_logps``."""
    return TokenLogps.apply(logits, targets)


class TokenLogps(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits) in fp32, a block of rows at a time.

    The same numbers as ``logits.float()`` -> gather - logsumexp under autograd, but the fp32
    (n, V) copies (the cast, the exponentials, the gradient's zeros and scatter) exist only per
    block of ``BLOCK_ROWS`` rows, which stays in cache; autograd's version makes ~10 passes over
    n x V fp32 in memory. Saves the logits as given (bf16 under autocast) and the (n,) logsumexp.
    """

    BLOCK_ROWS = 32  # 32 x 49152 fp32 = 6 MB

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:  # (n, V), (n,) -> (n,), (n,)
        n = logits.shape[0]
        lse = logits.new_empty(n, dtype=torch.float32)
        token = logits.new_empty(n, dtype=torch.float32)
        mean = logits.new_empty(n, dtype=torch.float32)
        for start in range(0, n, TokenLogps.BLOCK_ROWS):
            rows = slice(start, start + TokenLogps.BLOCK_ROWS)
            block = logits[rows].float()  # (b, V)
            lse[rows] = torch.logsumexp(block, dim=-1)
            token[rows] = block.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
            mean[rows] = block.mean(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(mean)
        return token - lse, mean

    @staticmethod
    def backward(ctx, grad_logps: Tensor, _grad_mean: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], TokenLogps.BLOCK_ROWS):
            rows = slice(start, start + TokenLogps.BLOCK_ROWS)
            g = grad_logps[rows].unsqueeze(-1)  # (b, 1)
            block = (logits[rows].float() - lse[rows].unsqueeze(-1)).exp_().mul_(-g)  # -g * softmax
            block.scatter_add_(-1, targets[rows].unsqueeze(-1), g)  # + g at the target
            grad[rows] = block
        return grad, None
