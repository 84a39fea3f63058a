"""The fast forward (shared prompt, packed rows, chunked LM head) against the simple padded path.

Every twin test compares per-pair log-probs, token counts, mean logits and the parameter
gradients of a loss built from the log-probs, in fp32, to 1e-5 (gradients: 1e-5 of each
tensor's largest entry).
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from preftune import forward as fwd
from preftune.batching import collate_padded
from preftune.forward import (
    FAST,
    PACKED_FULL_LOGITS,
    PADDED,
    TokenLogps,
    chunked_head_logps,
    fast_path_mode,
    forward_fast,
    forward_packed,
    forward_padded,
    packed_token_count,
)
from preftune.packing import pack_pairs, plan_rows
from preftune.types import TokenizedPair

TOL = dict(atol=1e-5, rtol=1e-5)

# (prompt, chosen, rejected) lengths; 1-token prompts and answers included
SHAPES = [(6, 4, 5), (1, 3, 2), (5, 1, 4), (4, 3, 1), (1, 1, 1), (8, 6, 2)]


def sharpen(model):
    """Random init (std 0.02) gives near-uniform predictions; a wider one makes mistakes visible."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model


def llama(tok, attn="sdpa"):
    model = sharpen(make_model(tok))
    model.set_attn_implementation(attn)
    return model


def qwen2(tok):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
    return sharpen(Qwen2ForCausalLM(config).float().eval())


MODELS = {"llama": llama, "llama-eager": lambda tok: llama(tok, "eager"), "qwen2": qwen2}


def make_pairs(shapes=SHAPES, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in shapes]


def run(model, fn):
    """fn() -> PairForward; returns it and the gradients of a loss that weighs every pair/side differently."""
    model.zero_grad(set_to_none=True)
    out = fn()
    b = out.chosen.logps.shape[0]
    w = torch.arange(1, b + 1, dtype=torch.float32)
    loss = (w * out.chosen.logps).sum() - (w.flip(0) * 0.5 * out.rejected.logps).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(a, b, tol=TOL):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for side in ("chosen", "rejected"):
        x, y = getattr(out_a, side), getattr(out_b, side)
        torch.testing.assert_close(x.logps, y.logps, **tol)
        torch.testing.assert_close(x.tokens, y.tokens, **tol)
        torch.testing.assert_close(x.logits_sum, y.logits_sum, **tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        # 1e-5 of the tensor's own scale: gradients here reach ~100, fp32 rounding of sums in a
        # different order (other shapes, other kernels) alone gives ~1e-6 relative
        scale = max(1.0, grads_b[name].abs().max().item())
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        assert err <= tol["atol"] * scale, f"{name}: max abs diff {err:.3g}, scale {scale:.3g}"


def padded(model, pairs, pad):
    return run(model, lambda: forward_padded(model, collate_padded(pairs, pad)))


def fast(model, pairs, pad, **kw):
    return run(model, lambda: forward_fast(model, pairs, pad_token_id=pad, **kw))


# ---------------------------------------------------------------- layout


def test_layout_positions_mask_and_labels():
    """[p0 p1 | c0 | r0 r1]: rejected positions restart after the prompt; r0 is predicted from p1."""
    rows = pack_pairs([TokenizedPair([1, 2], [3], [4, 5])], pad_token_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 2, 3]]
    allowed = rows.attention_mask[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],  # p0
        [1, 1, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0],  # c0
        [1, 1, 0, 1, 0],  # r0: prompt and itself, not c0
        [1, 1, 0, 1, 1],  # r1
    ]
    # (predicting position, token, sequence): chosen of pair 0 is sequence 0, rejected is 1
    triples = list(zip(rows.pred_index.tolist(), rows.target_ids.tolist(), rows.seq_index.tolist()))
    assert triples == [(1, 3, 0), (1, 4, 1), (3, 5, 1)]
    assert rows.num_tokens == packed_token_count([TokenizedPair([1, 2], [3], [4, 5])]) == 5


def test_layout_two_pairs_and_padding():
    pairs = [TokenizedPair([1], [2], [3]), TokenizedPair([4, 5], [6], [7])]
    one = pack_pairs(pairs, pad_token_id=0, max_tokens_per_row=100)
    assert one.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert one.position_ids.tolist() == [[0, 1, 1, 0, 1, 2, 2]]
    mask = one.attention_mask[0, 0]
    assert not mask[3:, :3].any() and not mask[:3, 3:].any()  # no attention across pairs
    assert one.seq_index.tolist() == [0, 2, 1, 3]  # chosen i -> i, rejected i -> B + i
    two = pack_pairs(pairs, pad_token_id=0)  # default budget: the longest pair (4 tokens)
    assert two.input_ids.tolist() == [[4, 5, 6, 7], [1, 2, 3, 0]]  # longest first
    assert two.attention_mask[1, 0, 3].tolist() == [False, False, False, True]  # padding sees itself only
    assert two.pred_index.tolist() == [1, 1, 4, 4]
    assert two.seq_index.tolist() == [1, 3, 0, 2]


def test_plan_rows_budget():
    assert plan_rows([3, 5, 2], 100) == [[0, 1, 2]]
    assert plan_rows([3, 5, 2, 4], None) == [[1], [3], [0, 2]]  # None: budget = longest (5)
    assert plan_rows([3, 5, 2, 4], 7) == [[1, 2], [0, 3]]  # first-fit decreasing
    assert plan_rows([9, 2], 4) == [[0], [1]]  # an oversize pair gets a row of its own
    with pytest.raises(ValueError):
        plan_rows([1], 0)


def test_token_count():
    pairs = make_pairs()
    assert packed_token_count(pairs) == sum(p + c + r for p, c, r in SHAPES)
    assert packed_token_count(pairs) < collate_padded(pairs, 0).num_tokens


# ---------------------------------------------------------------- twins


@pytest.mark.parametrize("arch", MODELS)
def test_shared_prompt_equals_separate(arch, chat_tokenizer):
    """One pair per row: [prompt | chosen | rejected] == [prompt | chosen] and [prompt | rejected]."""
    model, pairs, pad = MODELS[arch](chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    assert fast_path_mode(model) == FAST
    assert_same(fast(model, pairs, pad, max_tokens_per_row=1), padded(model, pairs, pad))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("budget", [None, 24, 10_000])
def test_packed_equals_padded(arch, budget, chat_tokenizer):
    """Default budget (longest pair), a budget that forces several padded rows, all in one row."""
    model, pairs, pad = MODELS[arch](chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    rows = pack_pairs(pairs, pad_token_id=pad, max_tokens_per_row=budget)
    assert rows.num_rows == (1 if budget == 10_000 else 4 if budget is None else 3)
    assert_same(fast(model, pairs, pad, max_tokens_per_row=budget, chunk_size=3), padded(model, pairs, pad))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("multiple", [5, 64])
def test_rounded_row_length_equals_padded(arch, multiple, chat_tokenizer):
    """Rows padded up to a multiple of 5 or 64 tokens (row_length_multiple) give the padded path's numbers."""
    model, pairs, pad = MODELS[arch](chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    plain = pack_pairs(pairs, pad_token_id=pad)
    rows = pack_pairs(pairs, pad_token_id=pad, row_length_multiple=multiple)
    assert rows.row_length % multiple == 0 and plain.row_length < rows.row_length < plain.row_length + multiple
    assert rows.num_tokens == plain.num_tokens and torch.equal(rows.target_ids, plain.target_ids)
    assert_same(fast(model, pairs, pad, row_length_multiple=multiple), padded(model, pairs, pad))


def test_chunked_head_equals_full_logits(chat_tokenizer):
    """Chunks of 3 positions through the LM head == full logits of the same packed rows == padded."""
    model, pairs, pad = llama(chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    rows = pack_pairs(pairs, pad_token_id=pad, max_tokens_per_row=30)
    assert rows.pred_index.numel() > 3
    chunked = run(model, lambda: forward_packed(model, rows, chunk_size=3))
    full = run(model, lambda: forward_packed(model, rows, full_logits=True))
    assert_same(chunked, full)
    assert_same(chunked, padded(model, pairs, pad))


def test_chunked_head_logps_direct():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True)
    hidden = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    lp, mean = chunked_head_logps(head, hidden, targets, chunk_size=3)
    (lp * torch.arange(11.0)).sum().backward()
    g_chunk = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    logits = head(hidden)
    ref = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    (ref * torch.arange(11.0)).sum().backward()
    torch.testing.assert_close(lp, ref, **TOL)
    torch.testing.assert_close(mean, logits.detach().mean(-1), **TOL)
    for a, b in zip(g_chunk, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, TokenLogps.BLOCK_ROWS, TokenLogps.BLOCK_ROWS + 1, 3 * TokenLogps.BLOCK_ROWS - 5])
def test_token_logps_blocks_equal_autograd(dtype, rows):
    """The blocked fp32 log-softmax (forward and backward) == logits.float() -> gather - logsumexp
    under plain autograd, bit for bit, for fp32 and bf16 logits and rows on either side of a block edge."""
    torch.manual_seed(rows)
    logits = (3 * torch.randn(rows, 300)).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (rows,))
    weights = torch.randn(rows)
    as_float = logits.float()
    plain = as_float.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(as_float, -1)
    (plain * weights).sum().backward()
    plain_grad, logits.grad = logits.grad, None
    blocked, mean = TokenLogps.apply(logits, targets)
    (blocked * weights).sum().backward()
    assert torch.equal(blocked, plain)
    assert torch.equal(mean, as_float.detach().mean(-1))
    assert logits.grad.dtype == dtype
    assert torch.equal(logits.grad, plain_grad)


def test_lora_all_linear(chat_tokenizer):
    from peft import LoraConfig, get_peft_model

    pad = chat_tokenizer.pad_token_id
    model = get_peft_model(
        llama(chat_tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    pairs = make_pairs()
    assert fast_path_mode(model) == FAST
    a, b = fast(model, pairs, pad, max_tokens_per_row=24, chunk_size=3), padded(model, pairs, pad)
    assert_same(a, b)
    assert all("lora_" in n for n in a[1]) and len(a[1]) > 4
    with torch.no_grad(), model.disable_adapter():  # the LoRA reference: adapter off
        ref_fast = forward_fast(model, pairs, pad_token_id=pad, chunk_size=3)
        ref_pad = forward_padded(model, collate_padded(pairs, pad))
    torch.testing.assert_close(ref_fast.chosen.logps, ref_pad.chosen.logps, **TOL)
    torch.testing.assert_close(ref_fast.rejected.logps, ref_pad.rejected.logps, **TOL)
    assert not torch.allclose(ref_fast.chosen.logps, a[0].chosen.logps.detach(), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_token_edges(arch, chat_tokenizer):
    """1-token prompts, 1-token answers, and an empty prompt (its first answer token is not scored)."""
    model, pad = MODELS[arch](chat_tokenizer), chat_tokenizer.pad_token_id
    pairs = make_pairs([(1, 1, 5), (1, 5, 1), (1, 1, 1), (3, 1, 1), (0, 3, 2)], seed=3)
    assert_same(fast(model, pairs, pad, chunk_size=2), padded(model, pairs, pad))
    assert_same(fast(model, pairs, pad, max_tokens_per_row=5, chunk_size=2), padded(model, pairs, pad))


def test_lm_head_never_sees_all_positions(chat_tokenizer, monkeypatch):
    """The head gets only completion-predicting rows, at most chunk_size per call; no (B, T, V) tensor."""
    model, pairs, pad = llama(chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    fast_path_mode(model)  # run the one-time probe before counting
    n_completion = sum(c + r for _, c, r in SHAPES)
    rows_per_call = []
    head = model.get_output_embeddings()
    original = head.forward

    def counting(x):
        assert x.dim() == 2, "the head got a (B, T, H) tensor"
        rows_per_call.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(head, "forward", counting)
    with torch.no_grad():
        forward_fast(model, pairs, pad_token_id=pad, chunk_size=4)
    assert max(rows_per_call) <= 4 and sum(rows_per_call) == n_completion
    rows_per_call.clear()
    out = forward_fast(model, pairs, pad_token_id=pad, chunk_size=4)
    assert sum(rows_per_call) == n_completion
    out.chosen.logps.sum().backward()  # backward recomputes each chunk, one at a time
    assert max(rows_per_call) <= 4 and sum(rows_per_call) == 2 * n_completion


def test_masking_matters(chat_tokenizer):
    """Negative control: letting rejected tokens see the chosen ones changes the result."""
    model, pairs, pad = llama(chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    rows = pack_pairs(pairs, pad_token_id=pad, max_tokens_per_row=10_000)
    good = forward_packed(model, rows).rejected.logps
    rows.attention_mask = torch.ones_like(rows.attention_mask).tril()  # plain causal over the row
    leaky = forward_packed(model, rows).rejected.logps
    assert (good - leaky).abs().max() > 1e-2


# ---------------------------------------------------------------- autocast and fallbacks


@pytest.mark.parametrize("arch", MODELS)
def test_bf16_autocast(arch, chat_tokenizer):
    model, pairs, pad = MODELS[arch](chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    fast_path_mode(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fast(model, pairs, pad, max_tokens_per_row=24, chunk_size=3)
        b = padded(model, pairs, pad)
    assert a[0].chosen.logps.dtype == torch.float32
    # bf16 rounds differently in other shapes: seen <= 0.035 nats on |logps| ~ 45 (bf16 vs fp32
    # padded: ~0.06); the masking bug of test_masking_matters is off by more than 1
    torch.testing.assert_close(a[0].chosen.logps, b[0].chosen.logps, atol=0.1, rtol=0.002)
    torch.testing.assert_close(a[0].rejected.logps, b[0].rejected.logps, atol=0.1, rtol=0.002)
    for name in a[1]:
        assert torch.isfinite(a[1][name]).all()
        cos = torch.nn.functional.cosine_similarity(a[1][name].flatten(), b[1][name].flatten(), dim=0)
        assert cos > 0.999, name


def test_non_plain_head_keeps_full_logits(chat_tokenizer):
    """A head that does more than lm_head (here: logits * 2) is caught by the probe."""
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    base = llama(chat_tokenizer)
    model = Scaled(base.config).eval()
    model.load_state_dict(base.state_dict())
    pairs, pad = make_pairs(), chat_tokenizer.pad_token_id
    assert fast_path_mode(model) == PACKED_FULL_LOGITS
    assert_same(fast(model, pairs, pad, max_tokens_per_row=24), padded(model, pairs, pad))


def test_softcapping_config_keeps_full_logits(chat_tokenizer):
    model, pairs, pad = llama(chat_tokenizer), make_pairs(), chat_tokenizer.pad_token_id
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; the fast path must not guess
    assert fwd.head_extra(model.config) == "final_logit_softcapping"
    assert fast_path_mode(model) == PACKED_FULL_LOGITS
    assert_same(fast(model, pairs, pad), padded(model, pairs, pad))


def test_sliding_window_shorter_than_a_pair_falls_back(chat_tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
        max_window_layers=0,
    )  # fmt: skip
    model, pad = sharpen(Qwen2ForCausalLM(config).eval()), chat_tokenizer.pad_token_id
    short, long = make_pairs([(3, 2, 4), (1, 3, 3)]), make_pairs()
    assert fast_path_mode(model, short) == FAST and fast_path_mode(model, long) == PADDED
    assert_same(fast(model, short, pad), padded(model, short, pad))
    assert_same(fast(model, long, pad), padded(model, long, pad))


def test_unsupported_attention_falls_back(chat_tokenizer, monkeypatch):
    model = llama(chat_tokenizer)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert fwd.unsupported_reason(model) is not None
    assert fast_path_mode(model) == PADDED


def test_tied_head_projection_same_gradients(chat_tokenizer, monkeypatch):
    """Full fine-tuning of a tied-embedding model under the training bf16 autocast: holding the
    head's weight gradient in bf16 and adding it to the embedding's before accumulation
    (TiedHeadProjection) gives the log-probs and every gradient of plain autograd bit for bit,
    over two accumulated backward passes (so the sum meets an existing .grad too), with the add
    split in row blocks."""
    from preftune.config import TrainConfig
    from preftune.training import make_autocast

    cfg = TrainConfig()
    cfg.training.bf16 = True
    autocast = make_autocast(cfg, torch.device("cpu"))
    pad = chat_tokenizer.pad_token_id
    calls = []
    apply = fwd.TiedHeadProjection.apply
    monkeypatch.setattr(fwd.TiedHeadProjection, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(fwd.TiedHeadProjection, "ADD_ROWS", 7)

    def run(enabled):
        monkeypatch.setattr(fwd.TiedHeadProjection, "enabled", enabled)
        model = qwen2(chat_tokenizer).train()
        assert model.lm_head.weight is model.get_input_embeddings().weight
        outs = []
        for seed in (0, 1):
            with autocast():
                out = forward_fast(model, make_pairs(seed=seed), pad_token_id=pad)
            (out.chosen.logps.sum() - 0.5 * out.rejected.logps.sum()).backward()
            outs.append(torch.cat([out.chosen.logps, out.rejected.logps]).detach())
        assert getattr(model.lm_head.weight, "_preftune_head_grads", []) == []
        return outs, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_logps, plain_grads = run(False)
    assert not calls
    logps, grads = run(True)
    assert len(calls) == 2
    for a, b in zip(plain_logps, logps):
        assert torch.equal(a, b)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        assert torch.equal(plain_grads[name], grads[name]), name
