import math

import torch

from preftune.batching import collate_padded
from preftune.logprobs import completion_logps
from preftune.types import TokenizedPair


def test_hand_computed_logps_shift_and_mask():
    """Vocabulary of 2, sequence [0, 1, 1], completion = the last two tokens.

    logits at position 0 = [0, 0]      -> predicts token 1 with log(1/2) = -0.693147
    logits at position 1 = [0, ln 3]   -> predicts token 1 with log(3/4) = -0.287682
    logits at position 2 are unused (nothing follows).
    Sum = -0.980829; with the first completion token masked out (prompt) only -0.287682 counts.
    Mean logit over the vocabulary: position 0 -> 0, position 1 -> ln(3)/2 = 0.549306.
    """
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1, 1]])
    full = completion_logps(logits, ids, torch.tensor([[0, 1, 1]]))
    assert full.logps.item() == pytest_approx(-0.980829)
    assert full.tokens.item() == 2
    assert full.logits_sum.item() == pytest_approx(0.549306)
    last = completion_logps(logits, ids, torch.tensor([[0, 0, 1]]))
    assert last.logps.item() == pytest_approx(-0.287682)
    assert last.tokens.item() == 1


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-5)


def test_prompt_and_padding_never_count():
    """Changing logits at prompt or padding positions leaves the completion log-probs unchanged."""
    torch.manual_seed(0)
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10]), TokenizedPair([5], [8, 9, 11, 12], [13, 14])]
    batch = collate_padded(pairs, pad_token_id=0)
    logits = torch.randn(4, batch.input_ids.shape[1], 20)
    base = completion_logps(logits, batch.input_ids, batch.completion_mask)
    noisy = logits.clone()
    for row in range(4):
        comp = batch.completion_mask[row].nonzero().flatten()
        first, last = comp[0].item(), comp[-1].item()
        noisy[row, : first - 1] += torch.randn_like(noisy[row, : first - 1]) * 10  # prompt positions
        noisy[row, last:] += torch.randn_like(noisy[row, last:]) * 10  # last token and padding
    changed = completion_logps(noisy, batch.input_ids, batch.completion_mask)
    assert torch.allclose(base.logps, changed.logps, atol=1e-5)
    assert base.tokens.tolist() == [2, 4, 1, 2]


def test_collate_layout():
    pairs = [TokenizedPair([1, 2], [3], [4, 5])]
    b = collate_padded(pairs, pad_token_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b.completion_mask.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert b.num_pairs == 1 and b.num_tokens == 7
