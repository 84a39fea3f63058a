"""Model forwards that turn a batch of pairs into per-pair completion log-probs.

Every path returns a ``PairForward``; the simple padded path is the reference the
fast paths are tested against.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from preftune.batching import PaddedBatch, collate_padded
from preftune.kernels.short_row_attention import ATTENTION_NAME as SHORT_ROW_ATTENTION
from preftune.kernels.tied_head import TiedHeadProjection
from preftune.kernels.token_logps import TokenLogps, token_logps
from preftune.logprobs import SequenceLogps, completion_logps
from preftune.modeling import unwrap_peft
from preftune.packing import PackedRows, additive_mask, pack_pairs, packed_token_count
from preftune.types import TokenizedPair
from preftune.util import model_device

__all__ = [
    "FAST", "PACKED_FULL_LOGITS", "PADDED", "PairForward", "TiedHeadProjection", "TokenLogps", "chunked_head_logps",
    "fast_path_mode", "forward_fast", "forward_packed", "forward_padded", "packed_token_count", "unsupported_reason",
]  # fmt: skip


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


# ---------------------------------------------------------------- fast path
#
# Shared prompt + packed rows (see packing.py) through the model body only, then the LM head on
# just the N positions that predict completion tokens, a chunk at a time. Equal to
# ``forward_padded(model, collate_padded(pairs, pad))`` up to float rounding.
#
# What it needs, and what happens otherwise (``fast_path_mode`` says which path a model gets):
#   FAST                both of the below, and the head is plain: logits == lm_head(body(x))
#   PACKED_FULL_LOGITS  the attention takes a custom 4-D mask, but the head does more than
#                       lm_head (a config field in _HEAD_EXTRAS: final-logit softcapping, logit
#                       scaling; or the probe saw a difference): packed rows through the whole
#                       model, full logits (R, L, V) of the packed rows, then gather
#   PADDED              anything else -> forward_padded: attention other than sdpa/eager (and
#                       kernels/short_row_attention.py's sdpa variant; flash/flex ignore or
#                       reject a dense 4-D mask), chunked attention,
#                       PEFT prompt learning (virtual tokens), a sliding window shorter than a
#                       pair's longest sequence, or a model that failed the probe.
# The probe runs once per model (and attention implementation): 3 synthetic pairs through the
# padded path and the fast variants, in eval mode, without autocast; the first variant that
# agrees is used from then on. It catches heads and attention quirks no config field names.
#
# Cost note: sdpa/eager do the full L x L attention work of a row whatever the mask, so a row
# of k pairs pays k^2 times one pair's attention; hence the default row budget (None) is the
# longest pair, see packing.plan_rows and bench/fastpath_micro.py.

FAST = "fast"
PACKED_FULL_LOGITS = "packed_full_logits"
PADDED = "padded"

_MASKABLE_ATTENTION = ("sdpa", "eager", SHORT_ROW_ATTENTION)  # the last: sdpa, some calls as ShortRowAttention
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_probe_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[str, str]]" = weakref.WeakKeyDictionary()
log = logging.getLogger(__name__)


def forward_fast(
    model: nn.Module,
    pairs: list[TokenizedPair],
    *,
    pad_token_id: int,
    max_tokens_per_row: int | None = None,
    chunk_size: int = 1024,
    row_length_multiple: int = 1,
) -> PairForward:
    """Per-pair completion log-probs (same order as ``pairs``) from packed shared-prompt rows.

    ``max_tokens_per_row`` caps the tokens of a row (None: the longest pair's P + C + R, so
    shorter pairs only fill what would be padding; a pair longer than the cap gets a row of its
    own; a huge value puts every pair in one row). ``chunk_size`` is how many positions go through the LM
    head at once; with more than one chunk and gradients on, each chunk's logits are recomputed
    in backward instead of kept, so at most one (chunk_size, V) block of logits is alive.
    ``row_length_multiple`` pads the rows to a multiple of that many tokens (fewer distinct shapes).
    """
    device = model_device(model)
    mode = fast_path_mode(model, pairs)
    if mode == PADDED:
        return forward_padded(model, collate_padded(pairs, pad_token_id).to(device))
    packed = pack_pairs(pairs, pad_token_id=pad_token_id, max_tokens_per_row=max_tokens_per_row, device=device,
                        row_length_multiple=row_length_multiple)  # fmt: skip
    return forward_packed(model, packed, full_logits=mode == PACKED_FULL_LOGITS, chunk_size=chunk_size)


def forward_packed(model: nn.Module, packed: PackedRows, *, full_logits: bool = False, chunk_size: int = 1024) -> PairForward:
    """Run already packed rows; no checks (``forward_fast`` decides whether this is exact)."""
    base, decoder, head = _parts(model)
    mask = packed.attention_mask  # bool: what sdpa takes, whatever the compute dtype
    if _attn_implementation(base) == "eager":  # eager adds the mask to the scores
        mask = additive_mask(mask, base.get_input_embeddings().weight.dtype)
    inputs = dict(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)
    if full_logits or decoder is None or head is None:
        logits = base(**inputs).logits  # (R, L, V)
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, packed.pred_index)  # (N, V)
        per_token, mean_logits = token_logps(flat, packed.target_ids)
    else:
        # a model sharded by FSDP2 scores through its registered method, so its root's weights
        # (embedding, final norm, head) are gathered around the call (distributed.shard_model)
        score = getattr(base, SCORE_METHOD, None) or (lambda *args: score_positions(base, *args))
        per_token, mean_logits = score(inputs, packed.pred_index, packed.target_ids, chunk_size)
    return _per_sequence(packed, per_token, mean_logits)


SCORE_METHOD = "preftune_score_positions"


def score_positions(base: nn.Module, inputs: dict, pred_index: Tensor, target_ids: Tensor, chunk_size: int,
                    tied_projection: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Decoder body, then the LM head on the ``pred_index`` positions only: (N,) log-probs of
    ``target_ids`` and (N,) vocabulary-mean logits."""
    _, decoder, head = _parts(base)
    hidden = decoder(**inputs)[0]  # (R, L, H), after the final norm
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_index)  # (N, H)
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    tied = tied_projection and embed is not None and getattr(head, "weight", None) is embed.weight
    per_token, mean_logits = chunked_head_logps(head, hidden, target_ids, chunk_size, tied=tied)
    if per_token.numel() == 0:  # nothing to score: keep the graph connected anyway
        per_token = per_token + hidden.sum() * 0
    return per_token, mean_logits


def chunked_head_logps(
    head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int = 1024, *, tied: bool = False
) -> tuple[Tensor, Tensor]:
    """log p(target) and vocabulary-mean logit, (N,) each in fp32, from (N, H) hidden states.

    Projects ``chunk_size`` rows at a time; never builds more than a (chunk_size, V) block.
    ``tied``: the head's weight is also the input embedding's (see ``TiedHeadProjection``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n = hidden.shape[0]
    recompute = n > chunk_size and torch.is_grad_enabled()
    logps, means = [], []
    for start in range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            lp, mean = checkpoint(_head_chunk, head, h, t, use_reentrant=False)
        elif tied and TiedHeadProjection.applies(head, h):
            lp, mean = token_logps(TiedHeadProjection.apply(h, head.weight), t)
        else:
            lp, mean = _head_chunk(head, h, t)
        logps.append(lp)
        means.append(mean)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(means)


def fast_path_mode(model: nn.Module, pairs: list[TokenizedPair] | None = None) -> str:
    """FAST, PACKED_FULL_LOGITS or PADDED: the path ``forward_fast`` takes for this model (and pairs)."""
    reason = unsupported_reason(model)
    if reason is None and pairs:
        window = _sliding_window(_parts(model)[0].config)
        longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
        if window is not None and longest > window:
            reason = f"a sequence of {longest} tokens exceeds the sliding window ({window})"
    if reason is not None:
        _log_once(model, reason)
        return PADDED
    impl = _attn_implementation(_parts(model)[0])
    cached = _probe_cache.get(model)
    if cached is None or cached[0] != impl:
        cached = (impl, _probe(model))
        _probe_cache[model] = cached
    return cached[1]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the packed layout cannot be used with this model, or None if it can (probe aside)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "PEFT prompt learning adds virtual tokens the packed mask does not know about"
    base, _, _ = _parts(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(base, "get_input_embeddings"):
        return "not a transformers model"
    impl = _attn_implementation(base)
    if impl not in _MASKABLE_ATTENTION:
        return f"attention implementation {impl!r} does not take a custom 4-D mask (sdpa and eager do)"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attention_chunk_size", None) is not None:
        return "chunked attention"
    return None


# ---------------------------------------------------------------- helpers


def head_extra(config) -> str | None:
    """The config field that says logits != lm_head(hidden) (softcapping, scaling), if any."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _HEAD_EXTRAS:
        value = getattr(text, name, None)
        if value is not None and value != 1:
            return name
    return None


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """(causal LM, its decoder body, its LM head); PEFT wrappers are looked through."""
    base = unwrap_peft(model)
    decoder = head = None
    if hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
        if decoder is base:  # a bare body, not a causal LM
            decoder = None
    elif isinstance(getattr(base, "model", None), nn.Module):
        decoder = base.model
    if hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
    return base, decoder, head


def _attn_implementation(base: nn.Module) -> str | None:
    config = getattr(base, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def _sliding_window(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _head_chunk(head: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return token_logps(head(hidden), targets)


def _per_sequence(packed: PackedRows, token_logps: Tensor, mean_logits: Tensor) -> PairForward:
    b = packed.num_pairs
    zeros = torch.zeros(2 * b, dtype=torch.float32, device=token_logps.device)
    logps = zeros.index_add(0, packed.seq_index, token_logps)
    tokens = zeros.index_add(0, packed.seq_index, torch.ones_like(token_logps.detach()))
    logits_sum = zeros.index_add(0, packed.seq_index, mean_logits)
    return PairForward(
        chosen=SequenceLogps(logps[:b], tokens[:b], logits_sum[:b]),
        rejected=SequenceLogps(logps[b:], tokens[b:], logits_sum[b:]),
    )


_PROBE_PAIRS = [  # 3 pairs, budget 10: rows [8 + pad 2] and [6 + 4]; 1-token prompt/answers included
    ([3, 4, 5], [6, 7], [8, 9, 10]),
    ([11, 12], [13, 14, 15], [16]),
    ([17], [18], [19, 20]),
]


def _probe(model: nn.Module) -> str:
    """Try the fast variants on synthetic pairs against the padded path; the first that agrees wins."""
    base, decoder, head = _parts(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    vocab = getattr(config, "vocab_size", None) or 32
    pairs = [TokenizedPair([t % vocab for t in p], [t % vocab for t in c], [t % vocab for t in r]) for p, c, r in _PROBE_PAIRS]
    device = model_device(model)
    dtype = base.get_input_embeddings().weight.dtype
    # weights in a lower precision than the embeddings (compact_frozen_linears) only run under autocast
    lowest = min((p.dtype for p in model.parameters() if p.is_floating_point()), key=lambda d: torch.finfo(d).bits)
    mixed = torch.finfo(lowest).bits < torch.finfo(dtype).bits
    exact = dtype in (torch.float32, torch.float64) and not mixed
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=lowest, enabled=mixed):
            ref = forward_padded(model, collate_padded(pairs, 0).to(device))
            packed = pack_pairs(pairs, pad_token_id=0, max_tokens_per_row=10, device=device)
            plain_head = decoder is not None and head is not None and head_extra(base.config) is None
            candidates = ([(FAST, False)] if plain_head else []) + [(PACKED_FULL_LOGITS, True)]
            for mode, full in candidates:
                try:
                    out = forward_packed(model, packed, full_logits=full, chunk_size=4)
                except Exception as err:  # noqa: BLE001 - any failure means "not this variant"
                    log.info("fast path variant %s failed its probe: %s", mode, err)
                    continue
                if _close(out, ref, exact):
                    if mode != FAST:
                        log.warning("the LM head is not a plain projection; the fast path keeps full logits")
                    return mode
            log.warning("the packed fast path disagreed with the padded path on this model; using padded batches")
            return PADDED
    finally:
        for m, training in modes:
            m.training = training


def _close(a: PairForward, b: PairForward, exact: bool) -> bool:
    atol, rtol = (1e-3, 1e-4) if exact else (5e-2, 2e-2)
    return all(
        torch.allclose(x.float(), y.float(), atol=atol, rtol=rtol)
        for x, y in [(a.chosen.logps, b.chosen.logps), (a.rejected.logps, b.rejected.logps),
                     (a.chosen.tokens, b.chosen.tokens), (a.rejected.tokens, b.rejected.tokens)]
    )  # fmt: skip


_logged: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _log_once(model: nn.Module, reason: str) -> None:
    if _logged.get(model) != reason:
        _logged[model] = reason
        log.warning("fast forward path off (%s); using padded batches", reason)
