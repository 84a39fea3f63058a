"""Log-probabilities of completion tokens: shift, mask, sum.

Only completion tokens count: prompt tokens and padding are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SequenceLogps:
    """Per-sequence sums over completion tokens (all shape (N,))."""

    logps: Tensor  # sum of log p(token | prefix)
    tokens: Tensor  # number of completion tokens
    logits_sum: Tensor  # sum over completion positions of the vocabulary-mean logit (TRL's logits/*)


def completion_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> SequenceLogps:
    """Sum of log-probs of the completion tokens of each sequence.

    logits: (N, T, V) for positions 0..T-1; input_ids, completion_mask: (N, T).
    Position t's logits predict token t+1, so labels are shifted left by one.
    """
    logits = logits[:, :-1].float()  # (N, T-1, V), log-softmax in fp32
    labels = input_ids[:, 1:]  # (N, T-1)
    mask = completion_mask[:, 1:].to(logits.dtype)  # (N, T-1)
    token_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    token_logps = token_logits - torch.logsumexp(logits, dim=-1)
    return SequenceLogps(
        logps=(token_logps * mask).sum(-1),
        tokens=mask.sum(-1),
        logits_sum=(logits.detach().mean(-1) * mask).sum(-1),
    )
