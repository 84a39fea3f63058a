"""Packed rows for the fast path: shared prompt, several pairs per row, no padding between them.

Each pair becomes one segment ``[prompt | chosen | rejected]`` (P + C + R tokens) instead of
two padded rows ``[prompt | chosen]`` and ``[prompt | rejected]`` (2P + C + R tokens plus padding).
Segments are laid side by side in a row; a 4-D mask keeps them apart:

    query \\ key   prompt  chosen  rejected  (same segment; other segments never)
    prompt        causal    -        -
    chosen        all     causal     -
    rejected      all       -      causal

Position ids restart at 0 for every segment, and the rejected tokens continue from the end of
the prompt (rejected token k sits at position P + k, as in its padded row). With the same
tokens visible at the same positions, every hidden state equals the one of the padded path.

Which position predicts which token (position t predicts token t + 1 in the padded rows):
chosen token j is predicted from the position before it, the first one from the last prompt
token; rejected token j > 0 from the rejected token before it, and rejected token 0 also from
the last prompt token, not from the last chosen token right before it in the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from preftune.types import TokenizedPair


@dataclass
class PackedRows:
    """R rows of length L, plus N (position, token) pairs that say what gets scored.

    ``seq_index`` numbers the 2B sequences like ``collate_padded``: pair i's chosen is i, its
    rejected is B + i, whatever row the pair landed in.
    """

    input_ids: Tensor  # (R, L) long
    position_ids: Tensor  # (R, L) long
    attention_mask: Tensor  # (R, 1, L, L) bool, True = query may attend to key
    pred_index: Tensor  # (N,) flat index into the R*L positions whose output predicts...
    target_ids: Tensor  # (N,) ...this token,
    seq_index: Tensor  # (N,) ...of this sequence, in [0, 2B)
    num_pairs: int
    num_tokens: int  # real tokens fed, sum of P + C + R (padding excluded)

    def to(self, device) -> "PackedRows":
        return PackedRows(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.attention_mask.to(device),
            self.pred_index.to(device),
            self.target_ids.to(device),
            self.seq_index.to(device),
            self.num_pairs,
            self.num_tokens,
        )

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def row_length(self) -> int:
        return self.input_ids.shape[1]


def segment_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def packed_token_count(pairs: list[TokenizedPair]) -> int:
    """Tokens the fast path feeds the model: P + C + R per pair."""
    return sum(segment_length(p) for p in pairs)


def plan_rows(lengths: list[int], max_tokens_per_row: int | None) -> list[list[int]]:
    """Group segment indices into rows of at most ``max_tokens_per_row`` tokens.

    First-fit decreasing; a segment longer than the budget gets a row of its own (pairs are
    never split). Indices within a row are sorted. ``None`` means the longest segment: rows are
    never longer than the longest pair, shorter pairs share rows to fill what would be padding.
    That default is deliberate: sdpa/eager do the full L x L attention work of a row whatever
    the mask, so a row of k pairs pays about k^2 times one pair's attention, which can cost more
    than the padding it saves (bench/fastpath_micro.py). Pass a larger budget to pack harder.
    """
    if not lengths:
        return []
    if max_tokens_per_row is None:
        max_tokens_per_row = max(lengths)
    if max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be positive, got {max_tokens_per_row}")
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, u in enumerate(used):
            if u + lengths[i] <= max_tokens_per_row:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return [sorted(r) for r in rows]


def pack_pairs(
    pairs: list[TokenizedPair],
    *,
    pad_token_id: int,
    max_tokens_per_row: int | None = None,
    device: torch.device | str | None = None,
    row_length_multiple: int = 1,
) -> PackedRows:
    """Lay the pairs out as shared-prompt segments in as few rows as the budget allows.

    The (R, 1, L, L) mask is built on ``device`` (default CPU), so it never crosses the bus.
    L is rounded up to a multiple of ``row_length_multiple`` with padding.
    """
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    b = len(pairs)
    rows = plan_rows([segment_length(p) for p in pairs], max_tokens_per_row)
    width = max(sum(segment_length(pairs[i]) for i in row) for row in rows)
    width = -(-width // row_length_multiple) * row_length_multiple
    n_rows = len(rows)

    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    # Per token: segment number within its row (-1 = padding) and branch (0 prompt, 1 chosen, 2 rejected).
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    branch = torch.zeros((n_rows, width), dtype=torch.long)
    pred: list[int] = []
    target: list[int] = []
    seq: list[int] = []

    for r, row in enumerate(rows):
        o = 0  # offset of the current segment in the row
        for s, i in enumerate(row):
            p, c, rj = pairs[i].prompt_ids, pairs[i].chosen_ids, pairs[i].rejected_ids
            n_p, n_c, n_r = len(p), len(c), len(rj)
            n = n_p + n_c + n_r
            input_ids[r, o : o + n] = torch.tensor(p + c + rj, dtype=torch.long)
            position_ids[r, o : o + n_p + n_c] = torch.arange(n_p + n_c)
            position_ids[r, o + n_p + n_c : o + n] = torch.arange(n_p, n_p + n_r)
            segment[r, o : o + n] = s
            branch[r, o + n_p : o + n_p + n_c] = 1
            branch[r, o + n_p + n_c : o + n] = 2
            base = r * width + o
            last_prompt = base + n_p - 1
            # With an empty prompt the first completion token has no predecessor; the padded
            # path leaves it unscored too (its completion mask is shifted by one).
            for j in range(1 if n_p == 0 else 0, n_c):
                pred.append(base + n_p + j - 1)
                target.append(c[j])
                seq.append(i)
            for j in range(1 if n_p == 0 else 0, n_r):
                pred.append(last_prompt if j == 0 else base + n_p + n_c + j - 1)
                target.append(rj[j])
                seq.append(b + i)
            o += n

    device = torch.device("cpu") if device is None else torch.device(device)
    segment, branch = segment.to(device), branch.to(device)
    q = torch.arange(width, device=device)
    causal = q[None, :, None] >= q[None, None, :]  # (1, L, L): key index <= query index
    same_segment = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    branch_q, branch_k = branch[:, :, None], branch[:, None, :]
    visible_branch = (branch_k == 0) | (branch_k == branch_q)  # the prompt, or the query's own answer
    allowed = causal & same_segment & visible_branch
    allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]  # padding sees itself: no empty softmax rows
    return PackedRows(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=allowed[:, None],  # (R, 1, L, L)
        pred_index=torch.tensor(pred, dtype=torch.long, device=device),
        target_ids=torch.tensor(target, dtype=torch.long, device=device),
        seq_index=torch.tensor(seq, dtype=torch.long, device=device),
        num_pairs=b,
        num_tokens=packed_token_count(pairs),
    )


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask -> float mask to add to attention scores: 0 where allowed, dtype-min elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
