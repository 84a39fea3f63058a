"""Model forwards that turn a batch of pairs into per-pair completion log-probs.

Every path returns a ``PairForward``; the simple padded path is the reference the
fast paths are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from preftune.batching import PaddedBatch
from preftune.logprobs import SequenceLogps, completion_logps


@dataclass
class PairForward:
    chosen: SequenceLogps  # each field (B,)
    rejected: SequenceLogps


def forward_padded(model: nn.Module, batch: PaddedBatch) -> PairForward:
    """Simple path: one forward over the 2B right-padded rows, full logits."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits  # (2B, T, V)
    seq = completion_logps(logits, batch.input_ids, batch.completion_mask)
    b = batch.num_pairs
    return PairForward(
        chosen=SequenceLogps(seq.logps[:b], seq.tokens[:b], seq.logits_sum[:b]),
        rejected=SequenceLogps(seq.logps[b:], seq.tokens[b:], seq.logits_sum[b:]),
    )
