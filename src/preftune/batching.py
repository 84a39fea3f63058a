"""Batches of tokenized pairs.

The simple path: every pair becomes two right-padded rows, ``[prompt | chosen]`` and
``[prompt | rejected]``; the first half of the rows are the chosen sequences. The fast
path (shared prompt, packed rows) produces the same per-pair log-probs from another layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from preftune.types import TokenizedPair


@dataclass
class PaddedBatch:
    input_ids: Tensor  # (2B, T): B chosen rows then B rejected rows
    attention_mask: Tensor  # (2B, T)
    completion_mask: Tensor  # (2B, T): 1 on completion tokens only
    num_pairs: int

    def to(self, device) -> "PaddedBatch":
        return PaddedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.num_pairs,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_padded(pairs: list[TokenizedPair], pad_token_id: int) -> PaddedBatch:
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    completion = [[0] * len(p.prompt_ids) + [1] * len(p.chosen_ids) for p in pairs] + [
        [0] * len(p.prompt_ids) + [1] * len(p.rejected_ids) for p in pairs
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, comp) in enumerate(zip(rows, completion)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, : len(row)] = torch.tensor(comp)
    return PaddedBatch(input_ids, attention_mask, completion_mask, len(pairs))
