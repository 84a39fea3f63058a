"""Plain records passed between the data, tokenization and training stages."""

from __future__ import annotations

from dataclasses import dataclass

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair, normalized from any input format.

    ``prompt`` is a plain string (text-completion data) or a list of chat messages
    ending with a user turn (system message and earlier turns allowed).
    ``chosen``/``rejected`` are the assistant replies as text.
    ``source`` says where the pair came from, e.g. ``data.jsonl:12``.
    """

    prompt: str | list[Message]
    chosen: str
    rejected: str
    source: str = ""


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; ``prompt_ids + chosen_ids`` is the full chosen sequence."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    source: str = ""
