import pytest
import torch
import torch.nn.functional as F

from preftune.kernels.short_row_attention import SHORT_ROW_MAX, ShortRowAttention, enable_short_row_attention
from preftune.config import ModelConfig
from preftune.forward import forward_fast
from preftune.modeling import build_policy_and_reference
from preftune.types import TokenizedPair


def packed_mask(rows: int, length: int) -> torch.Tensor:
    """(R, 1, L, L) like pack_pairs makes: per row a pair [prompt | chosen | rejected] whose
    rejected tokens skip the chosen ones, then padding that sees only itself."""
    mask = torch.zeros(rows, length, length, dtype=torch.bool)
    i = torch.arange(length)
    for r in range(rows):
        used = length - 3 * r  # rows get shorter: padding at the end
        prompt, chosen = used // 2, used // 4
        causal = (i[:, None] >= i[None, :]) & (i[:, None] < used) & (i[None, :] < used)
        rejected_q = (i[:, None] >= prompt + chosen) & (i[:, None] < used)
        chosen_k = (i[None, :] >= prompt) & (i[None, :] < prompt + chosen)
        mask[r] = causal & ~(rejected_q & chosen_k)
    mask |= torch.eye(length, dtype=torch.bool)[None]
    return mask[:, None]


def inputs(rows=3, heads=6, kv_heads=2, length=37, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, length, dim, generator=g)
    k = torch.randn(rows, kv_heads, length, dim, generator=g)
    v = torch.randn(rows, kv_heads, length, dim, generator=g)
    grad = torch.randn(rows, heads, length, dim, generator=g)
    return q, k, v, grad, packed_mask(rows, length)


def sdpa(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask)  # fmt: skip


def outputs_and_grads(fn, q, k, v, grad, dtype):
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(dtype))
    return [t.detach() for t in (out, q.grad, k.grad, v.grad)]


def test_short_row_attention_equals_sdpa_in_fp32():
    """In fp32 (its structure alone: grouped heads without repeating keys, the packed mask,
    the scale, the softmax gradient from <dO, O>) output and q/k/v gradients equal torch's
    scaled_dot_product_attention with repeated keys to 1e-5."""
    q, k, v, grad, mask = inputs()
    scale = q.shape[-1] ** -0.5
    want = outputs_and_grads(lambda q, k, v: sdpa(q, k, v, mask), q, k, v, grad, torch.float32)
    got = outputs_and_grads(lambda q, k, v: ShortRowAttention.apply(q, k, v, mask, scale, torch.float32),
                            q, k, v, grad, torch.float32)  # fmt: skip
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_short_row_attention_bf16_error_is_the_flash_kernels():
    """In bf16 both torch's CPU kernel and ShortRowAttention round; against an fp64 computation
    of the same bf16 inputs, the largest error of each output and gradient (relative to its
    largest value) is at most 1.5x the flash kernel's own, and below 2e-2."""
    q, k, v, grad, mask = inputs(rows=4, heads=9, kv_heads=3, length=152, dim=64)
    q, k, v, grad = (t.bfloat16().double() for t in (q, k, v, grad))  # the exact values bf16 holds
    scale = q.shape[-1] ** -0.5
    exact = outputs_and_grads(lambda q, k, v: sdpa(q, k, v, mask), q, k, v, grad, torch.float64)
    flash = outputs_and_grads(lambda q, k, v: sdpa(q, k, v, mask), q, k, v, grad, torch.bfloat16)
    short = outputs_and_grads(lambda q, k, v: ShortRowAttention.apply(q, k, v, mask, scale, torch.bfloat16),
                              q, k, v, grad, torch.bfloat16)  # fmt: skip
    for name, e, f, s in zip(("out", "dq", "dk", "dv"), exact, flash, short):
        flash_err = ((f.double() - e).abs().max() / e.abs().max()).item()
        short_err = ((s.double() - e).abs().max() / e.abs().max()).item()
        assert short_err <= 1.5 * flash_err and short_err < 2e-2, (name, short_err, flash_err)


PAIRS = [
    TokenizedPair([5, 6, 7, 8, 9], [10, 11, 12], [13, 14]),
    TokenizedPair([20, 21], [22, 23, 24, 25], [26]),
    TokenizedPair([30, 31, 32, 33], [34], [35, 36, 37]),
]


def run_tiny(model_dir, *, enable: bool, bf16: bool = True, pairs=PAIRS, checkpointing=False):
    torch.manual_seed(0)
    cfg = ModelConfig(finetuning_type="full", gradient_checkpointing=checkpointing)
    model, _ = build_policy_and_reference(cfg, str(model_dir), torch.device("cpu"), need_reference=False)
    model.train()
    layers = enable_short_row_attention(model) if enable else 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward_fast(model, pairs, pad_token_id=0)
    (out.chosen.logps.sum() - 0.5 * out.rejected.logps.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out.chosen.logps, out.rejected.logps]).detach(), grads, layers


@pytest.fixture
def calls(monkeypatch):
    counted = []
    apply = ShortRowAttention.apply
    monkeypatch.setattr(ShortRowAttention, "apply", lambda *a: counted.append(a[0].shape) or apply(*a))
    return counted


def test_enabled_model_takes_short_rows_under_bf16(tiny_model_dir, calls):
    """On an enabled model the packed fast path's attention runs as ShortRowAttention under bf16
    autocast (log-probs and gradients as the flash kernel's, to bf16 rounding), also without
    gradients (reference log-probs must round as the policy's); not in fp32, not on a model it
    was not enabled on."""
    plain_logps, plain_grads, _ = run_tiny(tiny_model_dir, enable=False)
    assert calls == []
    logps, grads, layers = run_tiny(tiny_model_dir, enable=True)
    assert layers == 2 and len(calls) == 2  # one call per decoder layer
    torch.testing.assert_close(logps, plain_logps, rtol=2e-2, atol=2e-2)
    for name in plain_grads:
        scale = plain_grads[name].abs().max()
        torch.testing.assert_close(grads[name] / scale, plain_grads[name] / scale, rtol=0, atol=3e-2, msg=name)
    calls.clear()
    run_tiny(tiny_model_dir, enable=True, bf16=False)
    assert calls == []
    model, _ = build_policy_and_reference(ModelConfig(), str(tiny_model_dir), torch.device("cpu"), False)
    enable_short_row_attention(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward_fast(model, PAIRS, pad_token_id=0)
    assert len(calls) == 2
    assert torch.equal(torch.cat([out.chosen.logps, out.rejected.logps]), logps)  # same rounding as with grad


def test_long_rows_stay_with_sdpa(tiny_model_dir, calls):
    """A row longer than SHORT_ROW_MAX tokens keeps transformers' sdpa function (while a row of
    SHORT_ROW_MAX tokens on the same model takes ShortRowAttention, so the spy does count)."""
    longest_short = TokenizedPair(list(range(3, 3 + SHORT_ROW_MAX - 3)), [300, 301], [302])
    run_tiny(tiny_model_dir, enable=True, pairs=[longest_short])
    assert len(calls) == 2 and calls[0][2] == SHORT_ROW_MAX  # one call per decoder layer, (B, H, L, D)
    calls.clear()
    long_pair = TokenizedPair(list(range(3, 3 + SHORT_ROW_MAX)), [300, 301], [302])
    run_tiny(tiny_model_dir, enable=True, pairs=[long_pair])
    assert calls == []


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_short_rows_under_checkpointing_same_numbers(tiny_model_dir, calls, mode):
    """Checkpointing reruns the layers in backward with gradients on, so they take ShortRowAttention
    again: log-probs and gradients equal the run without checkpointing bit for bit."""
    plain_logps, plain_grads, _ = run_tiny(tiny_model_dir, enable=True)
    calls.clear()
    logps, grads, _ = run_tiny(tiny_model_dir, enable=True, checkpointing=mode)
    assert len(calls) >= 2
    assert torch.equal(logps, plain_logps)
    assert grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)


def test_enabling_registers_an_implementation_and_leaves_sdpa_alone(tiny_model_dir):
    """Enabling (twice) registers ATTENTION_NAME with transformers and switches only that model to
    it; transformers' own "sdpa" entry is untouched, and disabling switches the model back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from preftune.kernels.short_row_attention import ATTENTION_NAME, disable_short_row_attention, sdpa_or_short_rows

    model, _ = build_policy_and_reference(ModelConfig(), str(tiny_model_dir), torch.device("cpu"), False)
    other, _ = build_policy_and_reference(ModelConfig(), str(tiny_model_dir), torch.device("cpu"), False)
    assert enable_short_row_attention(model) == enable_short_row_attention(model) == 2
    assert model.config._attn_implementation == ATTENTION_NAME and other.config._attn_implementation == "sdpa"
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] is sdpa_or_short_rows
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    disable_short_row_attention(model)
    assert model.config._attn_implementation == "sdpa"
