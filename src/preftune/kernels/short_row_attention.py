"""Attention for short packed rows on CPU under bf16.

torch's CPU attention backward (its flash kernel) is slow on short rows: on SmolLM2-135M's shapes
(4 rows of 152 tokens, 9 query and 3 key/value heads of 64) it took 10.0 ms a layer against 4.7 ms
for ``ShortRowAttention`` below, which keeps the bf16 attention probabilities from the forward
(``H * L * 2`` bytes per token and layer) and so needs five plain matmuls in backward; forwards
2.9 and 3.2 ms. At 256 tokens a row both took 19.4 ms in all, and the flash kernel keeps nothing
quadratic, so longer rows stay with it.

The numbers are the flash kernel's to bf16 rounding (scores, softmax and the probability
gradient in fp32, the matmuls that make bf16 results in bf16, as the kernel does); in fp32 the
function equals ``scaled_dot_product_attention`` to 1e-6 (tests/test_attention.py).

An enabled model runs under its own attention implementation, ``ATTENTION_NAME``, registered
with transformers' ``AttentionInterface`` (and its masks made as for "sdpa"): each call that
``applies`` takes ``ShortRowAttention``, every other call goes to transformers' "sdpa" function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from preftune.modeling import unwrap_peft

SHORT_ROW_MAX = 256  # longest row (tokens) that takes ShortRowAttention
ENABLED_ATTR = "_preftune_short_row_attention"
ATTENTION_NAME = "preftune_short_rows"  # the attn_implementation an enabled model runs under


class ShortRowAttention(torch.autograd.Function):
    """softmax(mask(q k^T * scale)) v for (B, H, L, D) queries and (B, Hkv, L, D) keys/values.

    Grouped-query heads are handled without repeating keys and values: the G = H / Hkv query
    heads that share a key head are stacked into one (G * L, D) block. ``mask`` is a boolean
    (B, 1, L, L), True where a query may attend.
    Computes in ``dtype`` (bf16 or fp32) with fp32 scores and softmax.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        with torch.autocast(q.device.type, enabled=False):
            contiguous = torch.contiguous_format
            q, k, v = (t.to(dtype, memory_format=contiguous) for t in (q, k, v))  # queries come transposed
            q_grouped = q.reshape(batch, kv_heads, group * length, dim)
            scores = torch.matmul(q_grouped.float(), k.float().transpose(-1, -2))  # (B, Hkv, G*L, L) fp32
            # no in-place op on a matmul's output: selective checkpointing keeps it and hands it back on rerun
            scores = scores.view(batch, kv_heads, group, length, length) * scale
            scores.masked_fill_(~mask[:, :, None], torch.finfo(torch.float32).min)  # a row with no key: uniform, not NaN
            probs = torch.softmax(scores, dim=-1).to(dtype).view(batch, kv_heads, group * length, length)
            out = torch.matmul(probs, v).view(batch, heads, length, dim)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs, out = ctx.saved_tensors
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype).reshape(batch, kv_heads, group * length, dim)
            grad_out32 = grad_out.float()
            grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)  # sums the G query heads: (B, Hkv, L, D)
            grad_probs = torch.matmul(grad_out32, v.float().transpose(-1, -2))  # (B, Hkv, G*L, L) fp32
            # softmax backward: p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = <dO, O> row by row
            row_dot = (grad_out32 * out.reshape(grad_out.shape).float()).sum(-1, keepdim=True)
            grad_scores = grad_probs.sub_(row_dot).mul_(probs).to(q.dtype)  # scale goes on dq, dk below
            grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale).view(batch, heads, length, dim)
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.reshape(batch, kv_heads, group * length, dim))
            grad_k.mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None


def compute_dtype(query: Tensor) -> torch.dtype:
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def applies(module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, dropout: float, kwargs: dict) -> bool:
    """Whether this attention call takes ShortRowAttention: a module it was enabled on, on CPU in
    bf16, a boolean (B, 1, L, L) mask over a short row, nothing else asked. Calls without gradients
    (the reference log-probs, evaluation) take it too: the reference and the policy then round
    alike, so the step-1 loss stays at log 2 instead of showing two kernels' bf16 noise."""
    if not getattr(module, ENABLED_ATTR, False) or query.device.type != "cpu":
        return False
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or dropout:
        return False
    if any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "cache", "s_aux")):
        return False  # extras transformers' sdpa function handles (or refuses) itself
    length = query.shape[2]
    return (key.shape[2] == length <= SHORT_ROW_MAX and mask.shape[-2:] == (length, length)
            and query.shape[1] % key.shape[1] == 0 and compute_dtype(query) == torch.bfloat16)  # fmt: skip


def sdpa_or_short_rows(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as ``ATTENTION_NAME``: ShortRowAttention where it applies,
    transformers' "sdpa" function otherwise (looked up at each call, as the model would)."""
    if applies(module, query, key, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = ShortRowAttention.apply(query, key, value, attention_mask, scale, torch.bfloat16)
        return out.transpose(1, 2).contiguous(), None  # (B, L, H, D), as transformers' sdpa returns
    sdpa = _attention_functions["sdpa"]
    return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


_attention_functions: dict = {}  # transformers' ALL_ATTENTION_FUNCTIONS, once registered


def register_short_row_attention() -> None:
    """Make ``ATTENTION_NAME`` known to transformers: the attention function, and masks as sdpa's."""
    global _attention_functions
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _attention_functions = ALL_ATTENTION_FUNCTIONS
    AttentionInterface.register(ATTENTION_NAME, sdpa_or_short_rows)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable_short_row_attention(model: nn.Module) -> int:
    """Mark this model's decoder attention layers as the ones ShortRowAttention may take, and run a
    model on "sdpa" under ``ATTENTION_NAME`` (other implementations never reach it); returns how
    many layers were marked. Other models in the process keep transformers' own functions."""
    base = unwrap_peft(model)
    if base.config._attn_implementation == "sdpa":
        register_short_row_attention()
        base.set_attn_implementation(ATTENTION_NAME)
    layers = 0
    for module in model.modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "scaling"):  # a decoder attention layer
            setattr(module, ENABLED_ATTR, True)
            layers += 1
    return layers


def disable_short_row_attention(model: nn.Module) -> None:
    """Undo ``enable_short_row_attention``: the model runs transformers' "sdpa" again."""
    base = unwrap_peft(model)
    if base.config._attn_implementation == ATTENTION_NAME:
        base.set_attn_implementation("sdpa")
    for module in model.modules():
        if hasattr(module, ENABLED_ATTR):
            delattr(module, ENABLED_ATTR)
