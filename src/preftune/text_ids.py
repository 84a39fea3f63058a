"""Text to token ids for the chat template, with the data's special-token strings kept as plain text.

``make_ctx`` holds what the tokenizer needs once per call site; ``protect`` replaces every special-token
string inside data text by a placeholder before the template renders; ``text_ids`` tokenizes rendered
text, turning placeholders back into the plain-text tokens of the strings they stand for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import PreftuneError
from preftune.util import special_token_strings


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` has a chat template set."""
    return bool(getattr(tokenizer, "chat_template", None))


# special_tokens_in_text: literal (plain text), error (stop), parse (control tokens).
SPECIAL_TOKEN_MODES = ("literal", "error", "parse")

# In "literal" mode every special-token string inside data text is replaced by a placeholder before the
# template is rendered, so that the text-level steps (rendering, finding the reply, its end-of-turn)
# see only the template's own special tokens, and put back as plain text when the rendered text is
# tokenized. U+FDD0 and U+FDD1 are Unicode noncharacters (reserved for a program's internal use); a
# U+FDD0 already in the data is protected the same way, so no data text can pose as a placeholder.
_PLACEHOLDER_START, _PLACEHOLDER_END = "\ufdd0", "\ufdd1"
_PLACEHOLDER_RE = re.compile("\ufdd0(\\d+)\ufdd1")


@dataclass
class Ctx:
    tokenizer: Any
    chat: bool
    lead_ids: list[int]  # special tokens the tokenizer puts in front of text (BOS), plain path
    eos_id: int | None
    bos_id: int | None
    specials: tuple[str, ...] = field(default_factory=tuple)  # special token strings, longest first
    mode: str = "literal"  # special_tokens_in_text
    eos_text: str | None = None
    special_re: re.Pattern | None = None  # any special-token string, longest first
    protect_re: re.Pattern | None = None  # the same, and the placeholder mark itself (literal mode)
    protected: tuple[str, ...] = ()  # what placeholder i stands for
    special_ids: dict[str, list[int]] = field(default_factory=dict)  # the template's own special tokens


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_ids(ctx: Ctx, text: str, where: str | None = None) -> list[int]:
    """Token ids of rendered text. Without placeholders (clean data, or parse/error mode): the
    tokenizer's own ids of the whole text. With them: the text between the template's special tokens
    is tokenized without parsing special tokens, the placeholders put back as the text they replaced."""
    if ctx.mode != "literal" or _PLACEHOLDER_START not in text:
        return encode(ctx.tokenizer, text)
    # Tokenizing piece by piece gives the tokenizer's own ids only if it tokenizes the text between
    # special tokens independently (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM2 do; a SentencePiece
    # tokenizer that adds a prefix space only at the start of the text does not): checked on this very
    # text with each placeholder as a plain letter, the one thing that differs.
    neutral = _PLACEHOLDER_RE.sub("x", text)
    if _pieces(ctx, neutral, restore=False) != encode(ctx.tokenizer, neutral):
        raise PreftuneError(
            "the text spells a special token, and this tokenizer cannot tokenize it as plain text exactly (it does "
            "not tokenize the text between special tokens independently); set special_tokens_in_text: parse to "
            "read such text as control tokens, or error to find the pairs",
            where,
        )
    return _pieces(ctx, text, restore=True)


def _pieces(ctx: Ctx, text: str, restore: bool) -> list[int]:
    assert ctx.special_re is not None
    out: list[int] = []
    pos = 0
    for m in ctx.special_re.finditer(text):
        out += _literal_ids(ctx, text[pos : m.start()], restore)
        special = m.group()
        if special not in ctx.special_ids:  # the tokenizer's own reading of the template's special token
            ctx.special_ids[special] = encode(ctx.tokenizer, special)
        out += ctx.special_ids[special]
        pos = m.end()
    return out + _literal_ids(ctx, text[pos:], restore)


def _literal_ids(ctx: Ctx, piece: str, restore: bool) -> list[int]:
    if not piece:
        return []
    if restore:
        piece = _PLACEHOLDER_RE.sub(lambda m: ctx.protected[int(m.group(1))], piece)
    return list(ctx.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer adds in FRONT of text with its normal special tokens (BOS).

    Trailing additions (a tokenizer configured to also add EOS) are ignored: a prompt
    must not end with EOS.
    """
    probe = "a"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = encode(tokenizer, probe)
    if not plain:
        return []
    for off in range(len(with_special) - len(plain) + 1):
        if with_special[off : off + len(plain)] == plain:
            return with_special[:off]
    return []


def check_mode(mode: Any) -> str:
    if mode not in SPECIAL_TOKEN_MODES:
        raise PreftuneError(f"special_tokens_in_text must be one of {', '.join(SPECIAL_TOKEN_MODES)}, got {mode!r}")
    return mode


def make_ctx(tokenizer: Any, mode: str = "literal") -> Ctx:
    chat = has_chat_template(tokenizer)
    specials = special_token_strings(tokenizer)
    ctx = Ctx(
        tokenizer=tokenizer,
        chat=chat,
        lead_ids=[] if chat else _leading_special_ids(tokenizer),
        eos_id=getattr(tokenizer, "eos_token_id", None),
        bos_id=getattr(tokenizer, "bos_token_id", None),
        specials=specials,
        mode=check_mode(mode),
        eos_text=getattr(tokenizer, "eos_token", None) or None,
    )
    if specials:
        ctx.special_re = re.compile("|".join(map(re.escape, specials)))  # longest first: the longest match wins
        ctx.protected = specials + (_PLACEHOLDER_START,)
        ctx.protect_re = re.compile("|".join(map(re.escape, ctx.protected)))
    return ctx


def protect(ctx: Ctx, text: str) -> tuple[str, bool]:
    """(text for rendering, whether it spells a special token). Literal mode replaces each special
    token string with its placeholder; the other modes leave the text as it is."""
    if ctx.special_re is None:
        return text, False
    if ctx.mode != "literal":
        return text, ctx.special_re.search(text) is not None
    assert ctx.protect_re is not None
    index = {s: i for i, s in enumerate(ctx.protected)}
    found = False

    def placeholder(m: re.Match) -> str:
        nonlocal found
        found = found or m.group() != _PLACEHOLDER_START
        return f"{_PLACEHOLDER_START}{index[m.group()]}{_PLACEHOLDER_END}"

    return ctx.protect_re.sub(placeholder, text), found
