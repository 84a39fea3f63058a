"""Turn a :class:`PreferencePair` into token ids, exactly right.

Every pair becomes ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` such that
``prompt_ids + chosen_ids`` is the chosen sequence the model is trained on, and
``prompt_ids`` is exactly what :func:`render_prompt` gives at generation time.

Chat models (the tokenizer has a chat template)
    A string prompt becomes one user message; ``system_prompt`` (if given) is put in
    front as a system message, unless a message-list prompt already has one. The
    prompt ids are the template rendered with ``add_generation_prompt=True``. The
    completion is the template rendered with the assistant reply added, minus the
    prompt text in front. It ends with the template's end-of-turn token (e.g.
    ``<|im_end|>``); text the template writes after that token (e.g. ``"\\n"``) is cut
    off. If the template writes no special token after the reply, the tokenizer's EOS
    is appended. Rendered text is tokenized with ``add_special_tokens=False``, so the
    only BOS is the one the template writes itself (never two).

Plain-text models (no chat template)
    The prompt is tokenized normally (with a BOS if the tokenizer adds one), the
    completion without special tokens, and the tokenizer's EOS is appended (as TRL
    does, and with TRL 1.16's ids whenever the prompt ends on a token boundary). A
    message-list prompt is rendered as its message contents joined by ``"\\n\\n"``
    (``system_prompt``, if given, comes first as one more message), so a single user
    message gives exactly the same ids as the same text as a plain string prompt.

The prompt is always an exact prefix
    The full text is tokenized once and split after the prompt's ids. When that is
    impossible -- tokens merge across the boundary (prompt ``"The ca"``, reply
    ``"t sat"``), or the template renders the prompt differently when a reply follows --
    the sequence is built as ``prompt_ids + ids(completion text)``, so the model is
    trained on the same context it sees when generating.

Length limits, in plain words
    * ``max_length`` caps the whole sequence: prompt + the longer of the two replies.
    * ``max_prompt_length`` (off by default) caps the prompt alone. A prompt that is too
      long loses tokens from its START (the end of the prompt, right before the reply,
      is what matters most); a leading BOS token is kept.
    * Then the replies are cut from their END to fit in ``max_length - len(prompt)``.
    * A pair is dropped (counted in ``TokenizeStats.dropped_truncated``) when no reply
      token would fit, e.g. a prompt longer than ``max_length`` with
      ``max_prompt_length`` off. Pairs that lost any token are kept with
      ``truncated=True`` (counted in ``TokenizeStats.truncated``).
    * ``None`` turns a limit off.

Pairs whose chosen and rejected ids are identical (after truncation) carry no
preference signal (zero gradient) and are dropped, counted in ``dropped_identical``.

Text that spells a special token
    Data text (message contents, replies, the system prompt) may spell one of the
    tokenizer's special tokens: ``<|im_end|>``, ``<|im_start|>assistant``. With
    ``special_tokens_in_text="literal"`` (the default) it is tokenized as the plain text it
    is (the tokenizer's ``split_special_tokens``), so a data row cannot end a turn or open a
    new one; only the special tokens the chat template writes itself are control tokens.
    ``"error"`` stops at the first such pair, naming it and the field; ``"parse"`` reads
    them as control tokens (what tokenizing the rendered text does). Every mode counts the
    pairs in ``TokenizeStats.special_tokens_in_text``. A text that spells no special token
    gets exactly the ids it always got: the literal path is taken only for texts that need it
    (it tokenizes the rendered text piece by piece between the template's own special
    tokens, the pieces the tokenizer splits the text into anyway; a tokenizer that does not
    tokenize those pieces independently, such as a SentencePiece one adding its prefix space
    only at the start of the text, is found on the text itself and named in an error). A
    plain-model reply that ends with the EOS text keeps that EOS (TRL's rule: no second one).

Bounded work
    With ``max_length`` set, a text longer than ``MAX_CHARS_PER_TOKEN`` characters per token
    of ``max_length`` is an error before anything is tokenized: nearly all of it would be
    cut, and tokenizing 20 MB to keep 128 tokens takes minutes and gigabytes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from preftune.errors import PreftuneError
from preftune.text_ids import SPECIAL_TOKEN_MODES, Ctx, has_chat_template, make_ctx, protect, text_ids  # noqa: F401
from preftune.types import Message, PreferencePair, TokenizedPair

__all__ = [
    "MAX_CHARS_PER_TOKEN",
    "SPECIAL_TOKEN_MODES",
    "DropReason",
    "TokenizeStats",
    "has_chat_template",
    "render_prompt",
    "tokenize_pair",
    "tokenize_pair_with_reason",
    "tokenize_pairs",
]

# Stands in for the reply when rendering the template once to learn what it writes
# around an assistant reply (the end-of-turn suffix). Letters only, so `| trim` and
# similar filters leave it alone.
_SENTINEL = "PreftuneReplySentinelQzx"

# Joins message contents when a message-list prompt meets a tokenizer without a template.
PLAIN_MESSAGE_SEPARATOR = "\n\n"

# No token of any tokenizer spans this many characters: a text longer than this many characters per
# token of max_length keeps under 0.1% of itself after truncation.
MAX_CHARS_PER_TOKEN = 1024

class DropReason(str, enum.Enum):
    """Why :func:`tokenize_pair_with_reason` dropped a pair."""

    TRUNCATED = "truncated"  # no completion token fits within the length limits
    IDENTICAL = "identical"  # chosen ids == rejected ids: zero gradient


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_pairs`; ``total == kept + dropped_truncated + dropped_identical``."""

    total: int = 0
    kept: int = 0
    truncated: int = 0  # kept pairs that lost tokens to the length limits
    dropped_truncated: int = 0
    dropped_identical: int = 0
    special_tokens_in_text: int = 0  # pairs whose text spells a special token (see special_tokens_in_text)


# ---------------------------------------------------------------------------------------
# Tokenizer facts, computed once per tokenizer call site
# ---------------------------------------------------------------------------------------


@dataclass
class _Texts:
    """A pair's texts as they go into the template (placeholders in literal mode)."""

    prompt: Any
    chosen: str
    rejected: str
    system_prompt: str | None
    spells_special: bool  # some text spells a special token


def _pair_texts(ctx: Ctx, pair: PreferencePair, system_prompt: str | None, where: str | None) -> _Texts:
    found = False

    def one(text: Any, label: str, reply: bool = False) -> Any:
        nonlocal found
        if not isinstance(text, str):
            return text
        eos = ctx.eos_text
        if reply and not ctx.chat and eos and text.endswith(eos):
            # plain models, as TRL: a reply that already ends with the EOS text ends with EOS (no second one)
            return one(text[: -len(eos)], label) + eos
        new, hit = protect(ctx, text)
        if hit:
            found = True
            if ctx.mode == "error":
                assert ctx.special_re is not None
                token = ctx.special_re.search(text).group()
                raise PreftuneError(
                    f"{label} spells the special token {token!r}; set special_tokens_in_text: literal to read it "
                    "as plain text, or parse to read it as the control token",
                    where if label != "system_prompt" else None,
                )
        return new

    prompt = pair.prompt
    if isinstance(prompt, str):
        prompt = one(prompt, "field 'prompt'")
    elif isinstance(prompt, list):
        prompt = [
            {**m, "content": one(m.get("content"), f"prompt message {i}")} if isinstance(m, dict) else m
            for i, m in enumerate(prompt, start=1)
        ]
    chosen = one(pair.chosen, "field 'chosen'", reply=True)
    rejected = one(pair.rejected, "field 'rejected'", reply=True)
    system = one(system_prompt, "system_prompt") if system_prompt is not None else None
    return _Texts(prompt, chosen, rejected, system, found)


def _check_text_lengths(pair: PreferencePair, system_prompt: str | None, max_length: int | None) -> None:
    """A text too long to keep more than a sliver of is refused before it is tokenized."""
    if max_length is None:
        return
    limit = max_length * MAX_CHARS_PER_TOKEN

    def chars(text: Any) -> int:
        return len(text) if isinstance(text, str) else 0

    prompt = pair.prompt
    if isinstance(prompt, list):
        prompt_chars = sum(chars(m.get("content")) for m in prompt if isinstance(m, dict))
    else:
        prompt_chars = chars(prompt)
    texts = [("field 'prompt'", prompt_chars), ("field 'chosen'", chars(pair.chosen)),
             ("field 'rejected'", chars(pair.rejected)), ("system_prompt", chars(system_prompt))]  # fmt: skip
    for label, count in texts:
        if count > limit:
            raise PreftuneError(
                f"{label} has {count:,} characters, more than {MAX_CHARS_PER_TOKEN} per token of max_length "
                f"({max_length}): nearly all of it would be cut; shorten it or raise max_length",
                pair.source or None if label != "system_prompt" else None,  # the config's, not the pair's
            )


def _require_eos(ctx: Ctx, where: str | None) -> int:
    if ctx.eos_id is None:
        raise PreftuneError(
            "the tokenizer has no EOS token, so completions cannot be ended; "
            "set tokenizer.eos_token or use a chat template that ends turns with a special token",
            where,
        )
    return ctx.eos_id


# ---------------------------------------------------------------------------------------
# Prompt rendering
# ---------------------------------------------------------------------------------------


def _prompt_messages(prompt: str | list[Message], system_prompt: str | None, where: str | None) -> list[Message]:
    if isinstance(prompt, str):
        messages: list[Message] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise PreftuneError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}", where)
    if system_prompt is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _apply_template(ctx: Ctx, messages: list[Message], *, generation: bool, where: str | None) -> str:
    try:
        text = ctx.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except PreftuneError:
        raise
    except Exception as exc:  # jinja TemplateError / raise_exception in the template, bad roles, ...
        raise PreftuneError(f"chat template failed: {exc}", where) from exc
    if not isinstance(text, str):
        raise PreftuneError("chat template did not render to a string", where)
    return text


def _render_prompt(
    ctx: Ctx, prompt: str | list[Message], system_prompt: str | None, where: str | None
) -> tuple[list[Message], str, list[int]]:
    """(messages, prompt text, prompt ids) for generation."""
    messages = _prompt_messages(prompt, system_prompt, where)
    if ctx.chat:
        text = _apply_template(ctx, messages, generation=True, where=where)
        return messages, text, text_ids(ctx, text, where)
    if isinstance(prompt, str) and system_prompt is None:
        text = prompt  # the common case, spelled out: no joining involved
    else:
        text = PLAIN_MESSAGE_SEPARATOR.join(str(m.get("content", "")) for m in messages)
    return messages, text, ctx.lead_ids + text_ids(ctx, text, where)


def render_prompt(
    prompt: str | list[Message],
    tokenizer: Any,
    system_prompt: str | None = None,
    *,
    special_tokens_in_text: str = "literal",
) -> list[int]:
    """Prompt token ids as used for generation: the same ``prompt_ids`` that
    :func:`tokenize_pair` produces before truncation (chat template with
    ``add_generation_prompt=True``, or plain text with the tokenizer's BOS)."""
    ctx = make_ctx(tokenizer, special_tokens_in_text)
    texts = _pair_texts(ctx, PreferencePair(prompt, "", ""), system_prompt, None)
    return _render_prompt(ctx, texts.prompt, texts.system_prompt, None)[2]


# ---------------------------------------------------------------------------------------
# Completion rendering
# ---------------------------------------------------------------------------------------


def _common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _first_special(ctx: Ctx, text: str) -> tuple[int, str] | None:
    """Earliest special-token string in ``text`` (longest wins at the same position)."""
    best: tuple[int, str] | None = None
    for s in ctx.specials:
        i = text.find(s)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _last_special_before_whitespace(ctx: Ctx, text: str) -> int | None:
    """End offset of the last special token in ``text`` followed only by whitespace."""
    best: int | None = None
    for s in ctx.specials:
        i = text.rfind(s)
        if i != -1 and not text[i + len(s) :].strip():
            end = i + len(s)
            if best is None or end > best:
                best = end
    return best


@dataclass
class _TurnShape:
    """What the template writes around an assistant reply, learned from a sentinel render."""

    before: str | None  # full text up to where the reply content starts
    after: str | None  # text the template writes after the reply content


def _turn_shape(ctx: Ctx, messages: list[Message], where: str | None) -> _TurnShape:
    text = _apply_template(ctx, messages + [{"role": "assistant", "content": _SENTINEL}], generation=False, where=where)
    i = text.find(_SENTINEL)
    if i == -1 or text.find(_SENTINEL, i + 1) != -1:
        return _TurnShape(None, None)
    return _TurnShape(text[:i], text[i + len(_SENTINEL) :])


def _chat_completion_text(
    ctx: Ctx, messages: list[Message], prompt_text: str, reply: str, shape: _TurnShape, where: str | None
) -> tuple[str, bool]:
    """(completion text, whether EOS must be appended) for one reply, chat path."""
    full = _apply_template(ctx, messages + [{"role": "assistant", "content": reply}], generation=False, where=where)
    if full.startswith(prompt_text):
        start = len(prompt_text)
    else:
        # The template renders the prompt differently when a reply follows (e.g. the
        # generation prompt carries an empty thought block the full conversation drops).
        # The completion starts where the two renderings part, but never inside the reply.
        start = _common_prefix_len(prompt_text, full)
        if shape.before is not None and full.startswith(shape.before):
            start = min(start, len(shape.before))
    comp = full[start:]

    after = shape.after
    if after is not None and comp.endswith(after):
        content_end = len(comp) - len(after)
        hit = _first_special(ctx, after)
        if hit is not None:
            j, tok = hit
            return comp[: content_end + j + len(tok)], False
        return comp[:content_end], True
    # Unknown shape (template transforms the sentinel or the suffix depends on the reply):
    # keep through the last special token that only whitespace follows.
    end = _last_special_before_whitespace(ctx, comp)
    if end is not None:
        return comp[:end], False
    return comp, True


def _split_completion(
    ctx: Ctx, prompt_text: str, prompt_ids: list[int], comp_text: str, where: str | None = None
) -> list[int]:
    """Completion ids such that ``prompt_ids + result`` is the training sequence.

    Tokenizes the full text once and splits after the prompt when the prompt ids are a
    prefix; otherwise (merge across the boundary) tokenizes the completion on its own.
    """
    full_ids = ctx.lead_ids + text_ids(ctx, prompt_text + comp_text, where)
    n = len(prompt_ids)
    if full_ids[:n] == prompt_ids:
        return full_ids[n:]
    return text_ids(ctx, comp_text, where)


def _completion_ids(
    ctx: Ctx,
    messages: list[Message],
    prompt_text: str,
    prompt_ids: list[int],
    reply: str,
    shape: _TurnShape | None,
    where: str | None,
) -> list[int]:
    if ctx.chat:
        assert shape is not None
        comp_text, append_eos = _chat_completion_text(ctx, messages, prompt_text, reply, shape, where)
    else:
        comp_text, append_eos = reply, True
    ids = _split_completion(ctx, prompt_text, prompt_ids, comp_text, where)
    if append_eos:
        eos = _require_eos(ctx, where)
        if not ids or ids[-1] != eos:  # TRL: no second EOS when the text already ends with it
            ids.append(eos)
    return ids


# ---------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------


def _check_limits(max_length: int | None, max_prompt_length: int | None) -> None:
    if max_length is not None and max_length < 2:
        raise PreftuneError(f"max_length must be at least 2 (one prompt and one reply token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise PreftuneError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise PreftuneError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}): "
            "max_length counts the prompt AND the reply, so no reply token would fit"
        )


def _cut_prompt(ctx: Ctx, prompt_ids: list[int], max_prompt_length: int | None) -> list[int]:
    if max_prompt_length is None or len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    if ctx.bos_id is not None and prompt_ids and prompt_ids[0] == ctx.bos_id:
        keep = max_prompt_length - 1
        return [prompt_ids[0]] + (prompt_ids[-keep:] if keep > 0 else [])
    return prompt_ids[-max_prompt_length:]


def _tokenize_pair(
    ctx: Ctx,
    pair: PreferencePair,
    system_prompt: str | None,
    max_length: int | None,
    max_prompt_length: int | None,
) -> tuple[TokenizedPair | None, DropReason | None, bool]:
    """(pair or None, why it was dropped, whether its text spells a special token)."""
    where = pair.source or None
    _check_text_lengths(pair, system_prompt, max_length)
    texts = _pair_texts(ctx, pair, system_prompt, where)
    tp, reason = _tokenize_texts(ctx, pair, texts, max_length, max_prompt_length, where)
    return tp, reason, texts.spells_special


def _tokenize_texts(
    ctx: Ctx,
    pair: PreferencePair,
    texts: _Texts,
    max_length: int | None,
    max_prompt_length: int | None,
    where: str | None,
) -> tuple[TokenizedPair | None, DropReason | None]:
    messages, prompt_text, prompt_ids = _render_prompt(ctx, texts.prompt, texts.system_prompt, where)
    shape = _turn_shape(ctx, messages, where) if ctx.chat else None
    chosen = _completion_ids(ctx, messages, prompt_text, prompt_ids, texts.chosen, shape, where)
    rejected = _completion_ids(ctx, messages, prompt_text, prompt_ids, texts.rejected, shape, where)
    if chosen == rejected:
        return None, DropReason.IDENTICAL

    cut_prompt = _cut_prompt(ctx, prompt_ids, max_prompt_length)
    truncated = len(cut_prompt) < len(prompt_ids)
    if max_length is not None:
        room = max_length - len(cut_prompt)
        if room <= 0:
            return None, DropReason.TRUNCATED
        if len(chosen) > room or len(rejected) > room:
            truncated = True
            chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            return None, DropReason.IDENTICAL
    if not chosen or not rejected:  # cannot happen (completions end with EOT/EOS); kept as a guard
        return None, DropReason.TRUNCATED
    return (
        TokenizedPair(
            prompt_ids=cut_prompt,
            chosen_ids=chosen,
            rejected_ids=rejected,
            truncated=truncated,
            source=pair.source,
        ),
        None,
    )


def tokenize_pair_with_reason(
    pair: PreferencePair,
    tokenizer: Any,
    *,
    system_prompt: str | None = None,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    special_tokens_in_text: str = "literal",
) -> tuple[TokenizedPair | None, DropReason | None]:
    """Like :func:`tokenize_pair`, also saying why a pair was dropped (``None`` when kept)."""
    _check_limits(max_length, max_prompt_length)
    ctx = make_ctx(tokenizer, special_tokens_in_text)
    return _tokenize_pair(ctx, pair, system_prompt, max_length, max_prompt_length)[:2]


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: Any,
    *,
    system_prompt: str | None = None,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    special_tokens_in_text: str = "literal",
) -> TokenizedPair | None:
    """Token ids of one pair, or ``None`` when it is dropped (see the module docstring)."""
    return tokenize_pair_with_reason(
        pair, tokenizer, system_prompt=system_prompt, max_length=max_length, max_prompt_length=max_prompt_length,
        special_tokens_in_text=special_tokens_in_text,
    )[0]  # fmt: skip


def tokenize_pairs(
    pairs: Iterable[PreferencePair],
    tokenizer: Any,
    *,
    system_prompt: str | None = None,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    special_tokens_in_text: str = "literal",
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize many pairs; returns the kept ones (in order) and counts of what happened."""
    _check_limits(max_length, max_prompt_length)
    ctx = make_ctx(tokenizer, special_tokens_in_text)
    stats = TokenizeStats()
    out: list[TokenizedPair] = []
    for pair in pairs:
        stats.total += 1
        tp, reason, spells_special = _tokenize_pair(ctx, pair, system_prompt, max_length, max_prompt_length)
        stats.special_tokens_in_text += int(spells_special)
        if reason is DropReason.TRUNCATED:
            stats.dropped_truncated += 1
        elif reason is DropReason.IDENTICAL:
            stats.dropped_identical += 1
        else:
            assert tp is not None
            stats.kept += 1
            stats.truncated += int(tp.truncated)
            out.append(tp)
    return out, stats
