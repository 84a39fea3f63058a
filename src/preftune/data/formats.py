"""Detect a record's format and convert it to a :class:`PreferencePair`.

Four formats: standard (string ``prompt``, ``chosen``, ``rejected``), conversational
(``{role, content}`` messages, with an explicit or an implicit prompt), alpaca
(``instruction``, ``input``, ``system``, ``history``) and sharegpt (``conversations`` of
``{from, value}`` turns, with renamable tags).  A :class:`Spec` says which format a file is
in and which of the record's keys hold each canonical field (``columns`` in the config, or a
LLaMA-Factory ``dataset_info.json`` entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from preftune.data.common import data_error, keys_list, type_name
from preftune.types import Message, PreferencePair
from preftune.util import did_you_mean

FORMATS = ("standard", "conversational", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant")

_FORMAT_HINT = "set format: standard|conversational|alpaca|sharegpt"

# Canonical field names.  ``columns`` maps these to the file's own column names.
CANONICAL = ("prompt", "chosen", "rejected", "instruction", "input", "system", "history", "conversations")
# LLaMA-Factory spellings accepted in ``columns``.
_COLUMN_ALIASES = {"query": "input", "messages": "conversations"}

SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}


# --------------------------------------------------------------------------- field spec


@dataclass
class Spec:
    """How to read one file's records: the format, field names and sharegpt tags."""

    fmt: str
    # canonical name -> the record's key; None means "not used"
    names: dict[str, str | None]
    # canonical names the user mapped explicitly (for error messages)
    mapped: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str | None] = field(default_factory=lambda: dict(SHAREGPT_TAGS))

    def name(self, canonical: str) -> str | None:
        return self.names.get(canonical)

    def missing(self, canonical: str) -> str:
        key = self.names[canonical]
        if canonical in self.mapped:
            return f"field '{key}' is missing (columns maps {self.mapped[canonical]} to it)"
        return f"field '{key}' is missing"


def default_names() -> dict[str, str | None]:
    return {name: name for name in CANONICAL}


def user_columns(columns: dict[str, str] | None, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """Validate ``columns``: ({canonical name: file column}, {canonical name: name the user wrote})."""
    if columns is None:
        return {}, {}
    if not isinstance(columns, dict):
        raise data_error(f"columns must be a mapping like {{prompt: question}}, got {type_name(columns)}", where)
    allowed = list(CANONICAL) + list(_COLUMN_ALIASES)
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for key, value in columns.items():
        if key not in allowed:
            raise data_error(
                f"columns: unknown name '{key}'{did_you_mean(str(key), allowed)} (use {', '.join(allowed)})",
                where,
            )
        if not isinstance(value, str) or not value:
            raise data_error(f"columns: '{key}' must name a column (a non-empty string), got {type_name(value)}", where)
        canonical = _COLUMN_ALIASES.get(key, key)
        if canonical in out:
            raise data_error(f"columns: '{origin[canonical]}' and '{key}' both name the {canonical} column", where)
        out[canonical] = value
        origin[canonical] = key
    return out, origin


def check_format_name(fmt: Any, where: str) -> str:
    if not isinstance(fmt, str):
        raise data_error(f"format must be a string, got {type_name(fmt)}", where)
    name = fmt.strip().lower()
    if name == "auto" or name in FORMATS:
        return name
    options = ("auto",) + FORMATS
    hint = did_you_mean(name, options) or f" (use {', '.join(options)})"
    raise data_error(f"unknown format '{fmt}'{hint}", where)


# --------------------------------------------------------------------------- format detection


def detect_format(record: dict, where: str) -> str:
    """Tell the format of one record from its keys (the first record decides for a file).

    ``conversations`` -> sharegpt; ``instruction`` -> alpaca; a string ``prompt`` ->
    standard; a list ``prompt`` (or no prompt and list ``chosen``: implicit prompt) ->
    conversational.
    """
    if not isinstance(record, dict):
        raise data_error(f"expected an object with fields, got {type_name(record)}", where)
    if "completion" in record and "label" in record and "chosen" not in record:
        raise data_error(
            "this looks like unpaired preference data (prompt, completion, label); "
            "DPO needs a 'chosen' and a 'rejected' reply for each prompt",
            where,
        )
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    prompt = record.get("prompt")
    if prompt is not None:
        if isinstance(prompt, str):
            return "standard"
        if isinstance(prompt, (list, tuple)):
            return "conversational"
        raise data_error(f"field 'prompt' must be a string or a list of messages, got {type_name(prompt)}", where)
    chosen = record.get("chosen")
    if isinstance(chosen, (list, tuple)):
        return "conversational"  # no prompt: chosen/rejected are whole conversations
    if "chosen" in record or "rejected" in record:
        return "standard"  # the standard parser then says which field is missing
    raise data_error(f"cannot tell the format (keys: {keys_list(record)}); {_FORMAT_HINT}", where)


def detect_with_columns(record: Any, spec_names: dict[str, str | None], user: dict[str, str], where: str) -> str:
    if user.keys() & {"instruction", "input", "history"}:
        return "alpaca"
    if "conversations" in user:
        return "sharegpt"
    if not isinstance(record, dict):
        raise data_error(f"expected an object with fields, got {type_name(record)}", where)
    view = {canon: record[key] for canon, key in spec_names.items() if key is not None and key in record}
    if not view:
        raise data_error(f"cannot tell the format (keys: {keys_list(record)}); {_FORMAT_HINT}", where)
    return detect_format(view, where)


# --------------------------------------------------------------------------- value checks


def _completion(value: Any, field_name: str, where: str) -> str:
    if not isinstance(value, str):
        raise data_error(f"field '{field_name}' must be a string, got {type_name(value)}", where)
    if not value.strip():
        raise data_error(f"empty completion in field '{field_name}'", where)
    return value


def _messages(value: Any, field_name: str, where: str) -> list[Message]:
    """A list of {role, content} messages, normalized to exactly those two keys."""
    if not isinstance(value, (list, tuple)):
        raise data_error(f"field '{field_name}' must be a list of messages, got {type_name(value)}", where)
    out: list[Message] = []
    for i, msg in enumerate(value, start=1):
        label = f"field '{field_name}' message {i}"
        if not isinstance(msg, dict):
            raise data_error(f"{label} must be an object with 'role' and 'content', got {type_name(msg)}", where)
        if msg.get("role") is None:
            hint = " (sharegpt {from, value} messages need format: sharegpt)" if "from" in msg else ""
            raise data_error(f"{label} has no 'role'{hint}", where)
        role = msg["role"]
        if not isinstance(role, str):
            raise data_error(f"{label} 'role' must be a string, got {type_name(role)}", where)
        if role not in ROLES:
            raise data_error(f"{label} has role '{role}'; use system, user or assistant", where)
        if "content" not in msg or msg["content"] is None:
            raise data_error(f"{label} has no 'content'", where)
        content = msg["content"]
        if not isinstance(content, str):
            hint = " (content parts are not supported; use plain text)" if isinstance(content, list) else ""
            raise data_error(f"{label} 'content' must be a string, got {type_name(content)}{hint}", where)
        out.append({"role": role, "content": content})
    return out


def _check_prompt(msgs: list[Message], what: str, where: str) -> list[Message]:
    """A prompt: non-empty, system only first, ending with a user message."""
    if not msgs:
        raise data_error(f"{what} has no messages", where)
    for i, msg in enumerate(msgs[1:], start=2):
        if msg["role"] == "system":
            raise data_error(f"{what} message {i} is a system message; a system message may only come first", where)
    if msgs[-1]["role"] != "user":
        raise data_error(
            f"{what} must end with a user message, but message {len(msgs)} is from {msgs[-1]['role']}", where
        )
    return msgs


# --------------------------------------------------------------------------- per-format parsers


def _required(record: dict, spec: Spec, canonical: str, where: str) -> Any:
    key = spec.names[canonical]
    if key is None or key not in record:
        raise data_error(spec.missing(canonical), where)
    return record[key]


def _optional(record: dict, spec: Spec, canonical: str) -> Any:
    key = spec.names.get(canonical)
    if key is None:
        return None
    return record.get(key)


def _optional_text(record: dict, spec: Spec, canonical: str, where: str) -> str:
    value = _optional(record, spec, canonical)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise data_error(f"field '{spec.names[canonical]}' must be a string, got {type_name(value)}", where)
    return value


def _parse_standard(record: dict, spec: Spec, where: str) -> PreferencePair:
    prompt = _required(record, spec, "prompt", where)
    if not isinstance(prompt, str):
        hint = " (a list of messages is the conversational format)" if isinstance(prompt, (list, tuple)) else ""
        raise data_error(f"field '{spec.names['prompt']}' must be a string, got {type_name(prompt)}{hint}", where)
    chosen = _completion(_required(record, spec, "chosen", where), spec.names["chosen"], where)
    rejected = _completion(_required(record, spec, "rejected", where), spec.names["rejected"], where)
    return PreferencePair(prompt, chosen, rejected, where)


def _conversational_reply(value: Any, field_name: str, where: str) -> str:
    if isinstance(value, str):  # prompt as messages, replies as plain text: unambiguous
        return _completion(value, field_name, where)
    if isinstance(value, dict):  # a single message not wrapped in a list
        value = [value]
    msgs = _messages(value, field_name, where)
    if not msgs:
        raise data_error(f"field '{field_name}' has no messages", where)
    if len(msgs) > 1:
        raise data_error(
            f"field '{field_name}' must hold exactly one assistant message, got {len(msgs)} messages "
            "(put earlier turns in the prompt)",
            where,
        )
    if msgs[0]["role"] != "assistant":
        raise data_error(f"field '{field_name}' message 1 has role '{msgs[0]['role']}'; expected assistant", where)
    return _completion(msgs[0]["content"], field_name, where)


def _parse_conversational(record: dict, spec: Spec, where: str) -> PreferencePair:
    prompt_key = spec.names["prompt"]
    chosen_key, rejected_key = spec.names["chosen"], spec.names["rejected"]
    raw_chosen = _required(record, spec, "chosen", where)
    raw_rejected = _required(record, spec, "rejected", where)
    raw_prompt = record.get(prompt_key) if prompt_key is not None else None

    if raw_prompt is not None:  # explicit prompt
        if isinstance(raw_prompt, str):
            raise data_error(
                f"field '{prompt_key}' must be a list of messages, got string (a text prompt is the standard format)",
                where,
            )
        prompt = _check_prompt(_messages(raw_prompt, prompt_key, where), f"field '{prompt_key}'", where)
        chosen = _conversational_reply(raw_chosen, chosen_key, where)
        rejected = _conversational_reply(raw_rejected, rejected_key, where)
        return PreferencePair(prompt, chosen, rejected, where)

    # Implicit prompt: chosen and rejected are whole conversations; their common prefix is
    # the prompt and what follows must be exactly one assistant reply each.
    if isinstance(raw_chosen, str) or isinstance(raw_rejected, str):
        raise data_error(f"field '{prompt_key}' is missing", where)
    chosen_msgs = _messages(raw_chosen, chosen_key, where)
    rejected_msgs = _messages(raw_rejected, rejected_key, where)
    for key, msgs in ((chosen_key, chosen_msgs), (rejected_key, rejected_msgs)):
        if not msgs:
            raise data_error(f"field '{key}' has no messages", where)
    shared = 0
    limit = min(len(chosen_msgs), len(rejected_msgs)) - 1  # keep one reply on each side
    while shared < limit and chosen_msgs[shared] == rejected_msgs[shared]:
        shared += 1
    if shared < limit or len(chosen_msgs) != len(rejected_msgs):
        rule = (
            f"no '{prompt_key}' field, so '{chosen_key}' and '{rejected_key}' must be the same conversation "
            "except for the last (assistant) message"
        )
        if shared < limit:
            raise data_error(f"{rule}, but they differ at message {shared + 1}", where)
        raise data_error(
            f"{rule}, but '{chosen_key}' has {len(chosen_msgs)} messages and '{rejected_key}' has {len(rejected_msgs)}",
            where,
        )
    for key, msgs in ((chosen_key, chosen_msgs), (rejected_key, rejected_msgs)):
        if msgs[-1]["role"] != "assistant":
            raise data_error(f"field '{key}' must end with an assistant message, got {msgs[-1]['role']}", where)
    if shared == 0:
        raise data_error(
            f"no '{prompt_key}' field and '{chosen_key}' and '{rejected_key}' share no messages, so there is no prompt",
            where,
        )
    prompt = _check_prompt(
        chosen_msgs[:shared], f"the prompt shared by '{chosen_key}' and '{rejected_key}'", where
    )
    chosen = _completion(chosen_msgs[-1]["content"], chosen_key, where)
    rejected = _completion(rejected_msgs[-1]["content"], rejected_key, where)
    return PreferencePair(prompt, chosen, rejected, where)


def _history(value: Any, field_name: str, where: str) -> list[Message]:
    if value is None or value == "":
        return []
    if not isinstance(value, (list, tuple)):
        raise data_error(f"field '{field_name}' must be a list of [user, assistant] pairs, got {type_name(value)}", where)
    out: list[Message] = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            got = f"a list of {len(turn)}" if isinstance(turn, (list, tuple)) else type_name(turn)
            raise data_error(f"field '{field_name}' item {i} must be a [user, assistant] pair, got {got}", where)
        for role, text in zip(("user", "assistant"), turn):
            if not isinstance(text, str):
                got = type_name(text)
                raise data_error(f"field '{field_name}' item {i} {role} text must be a string, got {got}", where)
            out.append({"role": role, "content": text})
    return out


def _parse_alpaca(record: dict, spec: Spec, where: str) -> PreferencePair:
    instruction = _required(record, spec, "instruction", where)
    if instruction is None:
        instruction = ""
    if not isinstance(instruction, str):
        raise data_error(f"field '{spec.names['instruction']}' must be a string, got {type_name(instruction)}", where)
    query = _optional_text(record, spec, "input", where)
    system = _optional_text(record, spec, "system", where)
    history = _history(_optional(record, spec, "history"), spec.names.get("history") or "history", where)
    chosen = _completion(_required(record, spec, "chosen", where), spec.names["chosen"], where)
    rejected = _completion(_required(record, spec, "rejected", where), spec.names["rejected"], where)
    # LLaMA-Factory: user content is "instruction\ninput", leaving out empty parts.
    content = "\n".join(part for part in (instruction, query) if part)
    prompt: list[Message] = [{"role": "system", "content": system}] if system else []
    prompt += history
    prompt.append({"role": "user", "content": content})
    return PreferencePair(prompt, chosen, rejected, where)


def _sharegpt_reply(value: Any, field_name: str, tags: dict[str, str | None], where: str) -> str:
    if isinstance(value, str):
        return _completion(value, field_name, where)
    role_tag, content_tag, assistant = tags["role_tag"], tags["content_tag"], tags["assistant_tag"]
    if not isinstance(value, dict):
        raise data_error(
            f"field '{field_name}' must be an object like {{\"{role_tag}\": \"{assistant}\", \"{content_tag}\": ...}}, "
            f"got {type_name(value)}",
            where,
        )
    if role_tag not in value:
        raise data_error(f"field '{field_name}' has no '{role_tag}'", where)
    if value[role_tag] != assistant:
        raise data_error(f"field '{field_name}' has {role_tag} '{value[role_tag]}'; expected '{assistant}'", where)
    if content_tag not in value:
        raise data_error(f"field '{field_name}' has no '{content_tag}'", where)
    return _completion(value[content_tag], field_name, where)


def _parse_sharegpt(record: dict, spec: Spec, where: str) -> PreferencePair:
    tags = spec.tags
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    user_tag, assistant_tag, system_tag = tags["user_tag"], tags["assistant_tag"], tags["system_tag"]
    tool_tags = {t for t in (tags.get("observation_tag"), tags.get("function_tag")) if t}
    conv_key = spec.names["conversations"]
    conversation = _required(record, spec, "conversations", where)
    if not isinstance(conversation, (list, tuple)):
        raise data_error(f"field '{conv_key}' must be a list of messages, got {type_name(conversation)}", where)

    turns: list[tuple[int, str, str]] = []  # (1-based index, tag, text)
    for i, msg in enumerate(conversation, start=1):
        label = f"field '{conv_key}' message {i}"
        if not isinstance(msg, dict):
            got = type_name(msg)
            raise data_error(f"{label} must be an object with '{role_tag}' and '{content_tag}', got {got}", where)
        if msg.get(role_tag) is None:
            hint = ""
            if "role" in msg and role_tag != "role":
                hint = " ({role, content} messages are the conversational format)"
            raise data_error(f"{label} has no '{role_tag}'{hint}", where)
        if content_tag not in msg or msg[content_tag] is None:
            raise data_error(f"{label} has no '{content_tag}'", where)
        text = msg[content_tag]
        if not isinstance(text, str):
            raise data_error(f"{label} '{content_tag}' must be a string, got {type_name(text)}", where)
        turns.append((i, msg[role_tag], text))

    system = ""
    if system_tag and turns and turns[0][1] == system_tag:
        system = turns[0][2]
        turns = turns[1:]
    else:
        system = _optional_text(record, spec, "system", where)

    if not turns:
        raise data_error(f"field '{conv_key}' has no {user_tag} message", where)
    prompt: list[Message] = [{"role": "system", "content": system}] if system else []
    for n, (i, tag, text) in enumerate(turns):
        expected = user_tag if n % 2 == 0 else assistant_tag
        if tag in tool_tags:
            raise data_error(f"field '{conv_key}' message {i} is a '{tag}' turn; tool calls are not supported", where)
        if tag != expected:
            raise data_error(
                f"field '{conv_key}' message {i} is from '{tag}', expected '{expected}' "
                f"(turns alternate {user_tag}, {assistant_tag}, ... and end with {user_tag})",
                where,
            )
        prompt.append({"role": "user" if tag == user_tag else "assistant", "content": text})
    if len(turns) % 2 == 0:
        raise data_error(
            f"field '{conv_key}' must end with a '{user_tag}' message, but the last is from '{assistant_tag}'", where
        )
    chosen = _sharegpt_reply(_required(record, spec, "chosen", where), spec.names["chosen"], tags, where)
    rejected = _sharegpt_reply(_required(record, spec, "rejected", where), spec.names["rejected"], tags, where)
    return PreferencePair(prompt, chosen, rejected, where)


_PARSERS = {
    "standard": _parse_standard,
    "conversational": _parse_conversational,
    "alpaca": _parse_alpaca,
    "sharegpt": _parse_sharegpt,
}


def convert(records: list[tuple[str, Any]], spec: Spec) -> list[PreferencePair]:
    parse = _PARSERS[spec.fmt]
    pairs = []
    for where, record in records:
        if not isinstance(record, dict):
            raise data_error(f"expected an object with fields, got {type_name(record)}", where)
        pairs.append(parse(record, spec, where))
    return pairs

