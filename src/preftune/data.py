"""Load preference pairs from the files users already have.

Every input is normalized to :class:`preftune.types.PreferencePair`:

* ``prompt`` -- a plain ``str`` for text-completion data (the *standard* format with a
  string prompt), otherwise a list of ``{"role", "content"}`` messages ending with a user
  message (a leading system message and earlier turns are allowed).
* ``chosen`` / ``rejected`` -- the assistant replies as text.
* ``source`` -- where the pair came from, used in errors and later warnings:

  ========================  ==========================================================
  file type                 ``source``
  ========================  ==========================================================
  ``.jsonl``                ``data.jsonl:7`` -- 1-based line number
  ``.json`` (array)         ``prefs.json:14 (record 3)`` -- line where the record's
                            ``{`` starts, and its 1-based index in the array
  ``.json`` (JSON Lines)    ``prefs.json:7`` -- as for ``.jsonl``
  ``.csv``                  ``data.csv:4`` -- line where the row starts; the header is
                            line 1, so the first data row is line 2 (the same number a
                            spreadsheet shows as the row number unless a cell spans
                            several lines)
  ``.parquet``              ``data.parquet row 3`` -- 1-based record index
  ``save_to_disk`` dir      ``ds row 3`` (``Dataset``) or ``ds/train row 3``
                            (``DatasetDict``, split ``train``) -- 1-based record index
  ========================  ==========================================================

The same content in any format normalizes to the same pair: alpaca
``{"instruction": "Hi", "input": "", ...}``, conversational
``{"prompt": [{"role": "user", "content": "Hi"}], ...}`` and sharegpt
``{"conversations": [{"from": "human", "value": "Hi"}], ...}`` all give
``prompt=[{"role": "user", "content": "Hi"}]``; a system prompt becomes a leading
``{"role": "system"}`` message.  Standard string prompts stay strings (the tokenizer stage
wraps them as a user message when the model has a chat template).

Bad data raises :class:`PreftuneError` with one line naming the file, the line/row and
the field.  Pairs whose chosen and rejected replies are identical are *not* rejected here;
the tokenizer stage drops and counts them.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.types import Message, PreferencePair

__all__ = [
    "FORMATS",
    "FILE_TYPES",
    "load_pairs",
    "load_llamafactory",
    "detect_format",
    "split_eval",
]

FORMATS = ("standard", "conversational", "alpaca", "sharegpt")
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")

_FORMAT_HINT = "set format: standard|conversational|alpaca|sharegpt"
_FILE_TYPES_HINT = "use .json, .jsonl, .csv, .parquet or a save_to_disk directory"

# Canonical field names.  ``columns`` maps these to the file's own column names.
_CANONICAL = ("prompt", "chosen", "rejected", "instruction", "input", "system", "history", "conversations")
# LLaMA-Factory spellings accepted in ``columns``.
_COLUMN_ALIASES = {"query": "input", "messages": "conversations"}

_SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}

_WS = re.compile(r"[ \t\n\r]*")


# --------------------------------------------------------------------------- helpers


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


def _error(message: str, where: str | None) -> PreftuneError:
    return PreftuneError(_one_line(message), where)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _keys_list(record: dict) -> str:
    keys = [_one_line(str(k)) for k in record]
    if not keys:
        return "none"
    shown = ", ".join(keys[:12])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")


# --------------------------------------------------------------------------- field spec


@dataclass
class _Spec:
    """How to read one file's records: the format, field names and sharegpt tags."""

    fmt: str
    # canonical name -> the record's key; None means "not used"
    names: dict[str, str | None]
    # canonical names the user mapped explicitly (for error messages)
    mapped: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str | None] = field(default_factory=lambda: dict(_SHAREGPT_TAGS))

    def name(self, canonical: str) -> str | None:
        return self.names.get(canonical)

    def missing(self, canonical: str) -> str:
        key = self.names[canonical]
        if canonical in self.mapped:
            return f"field '{key}' is missing (columns maps {self.mapped[canonical]} to it)"
        return f"field '{key}' is missing"


def _default_names() -> dict[str, str | None]:
    return {name: name for name in _CANONICAL}


def _user_columns(columns: dict[str, str] | None, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """Validate ``columns``: ({canonical name: file column}, {canonical name: name the user wrote})."""
    if columns is None:
        return {}, {}
    if not isinstance(columns, dict):
        raise _error(f"columns must be a mapping like {{prompt: question}}, got {_type_name(columns)}", where)
    allowed = list(_CANONICAL) + list(_COLUMN_ALIASES)
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for key, value in columns.items():
        if key not in allowed:
            raise _error(
                f"columns: unknown name '{key}'{_did_you_mean(str(key), allowed)} (use {', '.join(allowed)})",
                where,
            )
        if not isinstance(value, str) or not value:
            raise _error(f"columns: '{key}' must name a column (a non-empty string), got {_type_name(value)}", where)
        canonical = _COLUMN_ALIASES.get(key, key)
        if canonical in out:
            raise _error(f"columns: '{origin[canonical]}' and '{key}' both name the {canonical} column", where)
        out[canonical] = value
        origin[canonical] = key
    return out, origin


def _check_format_name(fmt: Any, where: str) -> str:
    if not isinstance(fmt, str):
        raise _error(f"format must be a string, got {_type_name(fmt)}", where)
    name = fmt.strip().lower()
    if name == "auto" or name in FORMATS:
        return name
    options = ("auto",) + FORMATS
    hint = _did_you_mean(name, options) or f" (use {', '.join(options)})"
    raise _error(f"unknown format '{fmt}'{hint}", where)


# --------------------------------------------------------------------------- format detection


def detect_format(record: dict, where: str) -> str:
    """Tell the format of one record from its keys (the first record decides for a file).

    ``conversations`` -> sharegpt; ``instruction`` -> alpaca; a string ``prompt`` ->
    standard; a list ``prompt`` (or no prompt and list ``chosen``: implicit prompt) ->
    conversational.
    """
    if not isinstance(record, dict):
        raise _error(f"expected an object with fields, got {_type_name(record)}", where)
    if "completion" in record and "label" in record and "chosen" not in record:
        raise _error(
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
        raise _error(f"field 'prompt' must be a string or a list of messages, got {_type_name(prompt)}", where)
    chosen = record.get("chosen")
    if isinstance(chosen, (list, tuple)):
        return "conversational"  # no prompt: chosen/rejected are whole conversations
    if "chosen" in record or "rejected" in record:
        return "standard"  # the standard parser then says which field is missing
    raise _error(f"cannot tell the format (keys: {_keys_list(record)}); {_FORMAT_HINT}", where)


def _detect_with_columns(record: Any, spec_names: dict[str, str | None], user: dict[str, str], where: str) -> str:
    if user.keys() & {"instruction", "input", "history"}:
        return "alpaca"
    if "conversations" in user:
        return "sharegpt"
    if not isinstance(record, dict):
        raise _error(f"expected an object with fields, got {_type_name(record)}", where)
    view = {canon: record[key] for canon, key in spec_names.items() if key is not None and key in record}
    if not view:
        raise _error(f"cannot tell the format (keys: {_keys_list(record)}); {_FORMAT_HINT}", where)
    return detect_format(view, where)


# --------------------------------------------------------------------------- value checks


def _completion(value: Any, field_name: str, where: str) -> str:
    if not isinstance(value, str):
        raise _error(f"field '{field_name}' must be a string, got {_type_name(value)}", where)
    if not value.strip():
        raise _error(f"empty completion in field '{field_name}'", where)
    return value


def _messages(value: Any, field_name: str, where: str) -> list[Message]:
    """A list of {role, content} messages, normalized to exactly those two keys."""
    if not isinstance(value, (list, tuple)):
        raise _error(f"field '{field_name}' must be a list of messages, got {_type_name(value)}", where)
    out: list[Message] = []
    for i, msg in enumerate(value, start=1):
        label = f"field '{field_name}' message {i}"
        if not isinstance(msg, dict):
            raise _error(f"{label} must be an object with 'role' and 'content', got {_type_name(msg)}", where)
        if msg.get("role") is None:
            hint = " (sharegpt {from, value} messages need format: sharegpt)" if "from" in msg else ""
            raise _error(f"{label} has no 'role'{hint}", where)
        role = msg["role"]
        if not isinstance(role, str):
            raise _error(f"{label} 'role' must be a string, got {_type_name(role)}", where)
        if role not in ROLES:
            raise _error(f"{label} has role '{role}'; use system, user or assistant", where)
        if "content" not in msg or msg["content"] is None:
            raise _error(f"{label} has no 'content'", where)
        content = msg["content"]
        if not isinstance(content, str):
            hint = " (content parts are not supported; use plain text)" if isinstance(content, list) else ""
            raise _error(f"{label} 'content' must be a string, got {_type_name(content)}{hint}", where)
        out.append({"role": role, "content": content})
    return out


def _check_prompt(msgs: list[Message], what: str, where: str) -> list[Message]:
    """A prompt: non-empty, system only first, ending with a user message."""
    if not msgs:
        raise _error(f"{what} has no messages", where)
    for i, msg in enumerate(msgs[1:], start=2):
        if msg["role"] == "system":
            raise _error(f"{what} message {i} is a system message; a system message may only come first", where)
    if msgs[-1]["role"] != "user":
        raise _error(
            f"{what} must end with a user message, but message {len(msgs)} is from {msgs[-1]['role']}", where
        )
    return msgs


# --------------------------------------------------------------------------- per-format parsers


def _required(record: dict, spec: _Spec, canonical: str, where: str) -> Any:
    key = spec.names[canonical]
    if key is None or key not in record:
        raise _error(spec.missing(canonical), where)
    return record[key]


def _optional(record: dict, spec: _Spec, canonical: str) -> Any:
    key = spec.names.get(canonical)
    if key is None:
        return None
    return record.get(key)


def _optional_text(record: dict, spec: _Spec, canonical: str, where: str) -> str:
    value = _optional(record, spec, canonical)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _error(f"field '{spec.names[canonical]}' must be a string, got {_type_name(value)}", where)
    return value


def _parse_standard(record: dict, spec: _Spec, where: str) -> PreferencePair:
    prompt = _required(record, spec, "prompt", where)
    if not isinstance(prompt, str):
        hint = " (a list of messages is the conversational format)" if isinstance(prompt, (list, tuple)) else ""
        raise _error(f"field '{spec.names['prompt']}' must be a string, got {_type_name(prompt)}{hint}", where)
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
        raise _error(f"field '{field_name}' has no messages", where)
    if len(msgs) > 1:
        raise _error(
            f"field '{field_name}' must hold exactly one assistant message, got {len(msgs)} messages "
            "(put earlier turns in the prompt)",
            where,
        )
    if msgs[0]["role"] != "assistant":
        raise _error(f"field '{field_name}' message 1 has role '{msgs[0]['role']}'; expected assistant", where)
    return _completion(msgs[0]["content"], field_name, where)


def _parse_conversational(record: dict, spec: _Spec, where: str) -> PreferencePair:
    prompt_key = spec.names["prompt"]
    chosen_key, rejected_key = spec.names["chosen"], spec.names["rejected"]
    raw_chosen = _required(record, spec, "chosen", where)
    raw_rejected = _required(record, spec, "rejected", where)
    raw_prompt = record.get(prompt_key) if prompt_key is not None else None

    if raw_prompt is not None:  # explicit prompt
        if isinstance(raw_prompt, str):
            raise _error(
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
        raise _error(f"field '{prompt_key}' is missing", where)
    chosen_msgs = _messages(raw_chosen, chosen_key, where)
    rejected_msgs = _messages(raw_rejected, rejected_key, where)
    for key, msgs in ((chosen_key, chosen_msgs), (rejected_key, rejected_msgs)):
        if not msgs:
            raise _error(f"field '{key}' has no messages", where)
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
            raise _error(f"{rule}, but they differ at message {shared + 1}", where)
        raise _error(
            f"{rule}, but '{chosen_key}' has {len(chosen_msgs)} messages and '{rejected_key}' has {len(rejected_msgs)}",
            where,
        )
    for key, msgs in ((chosen_key, chosen_msgs), (rejected_key, rejected_msgs)):
        if msgs[-1]["role"] != "assistant":
            raise _error(f"field '{key}' must end with an assistant message, got {msgs[-1]['role']}", where)
    if shared == 0:
        raise _error(
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
        raise _error(f"field '{field_name}' must be a list of [user, assistant] pairs, got {_type_name(value)}", where)
    out: list[Message] = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            got = f"a list of {len(turn)}" if isinstance(turn, (list, tuple)) else _type_name(turn)
            raise _error(f"field '{field_name}' item {i} must be a [user, assistant] pair, got {got}", where)
        for role, text in zip(("user", "assistant"), turn):
            if not isinstance(text, str):
                got = _type_name(text)
                raise _error(f"field '{field_name}' item {i} {role} text must be a string, got {got}", where)
            out.append({"role": role, "content": text})
    return out


def _parse_alpaca(record: dict, spec: _Spec, where: str) -> PreferencePair:
    instruction = _required(record, spec, "instruction", where)
    if instruction is None:
        instruction = ""
    if not isinstance(instruction, str):
        raise _error(f"field '{spec.names['instruction']}' must be a string, got {_type_name(instruction)}", where)
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
        raise _error(
            f"field '{field_name}' must be an object like {{\"{role_tag}\": \"{assistant}\", \"{content_tag}\": ...}}, "
            f"got {_type_name(value)}",
            where,
        )
    if role_tag not in value:
        raise _error(f"field '{field_name}' has no '{role_tag}'", where)
    if value[role_tag] != assistant:
        raise _error(f"field '{field_name}' has {role_tag} '{value[role_tag]}'; expected '{assistant}'", where)
    if content_tag not in value:
        raise _error(f"field '{field_name}' has no '{content_tag}'", where)
    return _completion(value[content_tag], field_name, where)


def _parse_sharegpt(record: dict, spec: _Spec, where: str) -> PreferencePair:
    tags = spec.tags
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    user_tag, assistant_tag, system_tag = tags["user_tag"], tags["assistant_tag"], tags["system_tag"]
    tool_tags = {t for t in (tags.get("observation_tag"), tags.get("function_tag")) if t}
    conv_key = spec.names["conversations"]
    conversation = _required(record, spec, "conversations", where)
    if not isinstance(conversation, (list, tuple)):
        raise _error(f"field '{conv_key}' must be a list of messages, got {_type_name(conversation)}", where)

    turns: list[tuple[int, str, str]] = []  # (1-based index, tag, text)
    for i, msg in enumerate(conversation, start=1):
        label = f"field '{conv_key}' message {i}"
        if not isinstance(msg, dict):
            got = _type_name(msg)
            raise _error(f"{label} must be an object with '{role_tag}' and '{content_tag}', got {got}", where)
        if msg.get(role_tag) is None:
            hint = ""
            if "role" in msg and role_tag != "role":
                hint = " ({role, content} messages are the conversational format)"
            raise _error(f"{label} has no '{role_tag}'{hint}", where)
        if content_tag not in msg or msg[content_tag] is None:
            raise _error(f"{label} has no '{content_tag}'", where)
        text = msg[content_tag]
        if not isinstance(text, str):
            raise _error(f"{label} '{content_tag}' must be a string, got {_type_name(text)}", where)
        turns.append((i, msg[role_tag], text))

    system = ""
    if system_tag and turns and turns[0][1] == system_tag:
        system = turns[0][2]
        turns = turns[1:]
    else:
        system = _optional_text(record, spec, "system", where)

    if not turns:
        raise _error(f"field '{conv_key}' has no {user_tag} message", where)
    prompt: list[Message] = [{"role": "system", "content": system}] if system else []
    for n, (i, tag, text) in enumerate(turns):
        expected = user_tag if n % 2 == 0 else assistant_tag
        if tag in tool_tags:
            raise _error(f"field '{conv_key}' message {i} is a '{tag}' turn; tool calls are not supported", where)
        if tag != expected:
            raise _error(
                f"field '{conv_key}' message {i} is from '{tag}', expected '{expected}' "
                f"(turns alternate {user_tag}, {assistant_tag}, ... and end with {user_tag})",
                where,
            )
        prompt.append({"role": "user" if tag == user_tag else "assistant", "content": text})
    if len(turns) % 2 == 0:
        raise _error(
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


def _convert(records: list[tuple[str, Any]], spec: _Spec) -> list[PreferencePair]:
    parse = _PARSERS[spec.fmt]
    pairs = []
    for where, record in records:
        if not isinstance(record, dict):
            raise _error(f"expected an object with fields, got {_type_name(record)}", where)
        pairs.append(parse(record, spec, where))
    return pairs


# --------------------------------------------------------------------------- file readers


def _decode(data: bytes, label: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with BOM (e.g. Windows PowerShell output)
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise _error(f"not valid UTF-16 (at offset {e.start})", label) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : e.start + 1].hex()
        raise _error(
            f"not valid UTF-8 (byte 0x{bad} at offset {e.start}) on line {line}; re-save the file as UTF-8", label
        ) from None


def _read_bytes(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _error(f"cannot read the file ({e.strerror or _first_line(e)})", label) from None


def _json_error(e: json.JSONDecodeError, label: str) -> PreftuneError:
    return _error(f"invalid JSON ({e.msg}: column {e.colno})", f"{label}:{e.lineno}")


def _read_jsonl_text(text: str, label: str) -> list[tuple[str, Any]]:
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        where = f"{label}:{lineno}"
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as e:
            hint = ""
            if stripped in ("[", "{", "[{") or e.pos >= len(stripped):
                hint = "; JSON Lines needs one complete object per line"
            raise _error(f"invalid JSON ({e.msg}: column {e.colno}){hint}", where) from None
        if not isinstance(record, dict):
            hint = " (a JSON array belongs in a .json file)" if isinstance(record, list) else ""
            raise _error(f"expected a JSON object, got {_type_name(record)}{hint}", where)
        records.append((where, record))
    return records


def _json_array_with_lines(text: str) -> list[tuple[int, Any]]:
    """Parse a JSON array, returning (line of the element's start, element) pairs.

    Raises ValueError (or JSONDecodeError) when ``text`` is not a JSON array.
    """
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if text[i : i + 1] != "[":
        raise ValueError("not an array")
    i = _WS.match(text, i + 1).end()
    items: list[tuple[int, Any]] = []
    line, pos = 1, 0
    if text[i : i + 1] == "]":
        end = i + 1
    else:
        while True:
            line += text.count("\n", pos, i)
            pos = i
            value, end = decoder.raw_decode(text, i)
            items.append((line, value))
            i = _WS.match(text, end).end()
            if text[i : i + 1] == ",":
                i = _WS.match(text, i + 1).end()
                continue
            if text[i : i + 1] != "]":
                raise ValueError("expected , or ]")
            end = i + 1
            break
    if _WS.match(text, end).end() != len(text):
        raise ValueError("extra data")
    return items


def _read_json_text(text: str, label: str) -> list[tuple[str, Any]]:
    try:
        items = _json_array_with_lines(text)
    except (ValueError, IndexError):
        items = None
    if items is not None:
        out = []
        for index, (line, record) in enumerate(items, start=1):
            where = f"{label}:{line} (record {index})"
            if not isinstance(record, dict):
                raise _error(f"expected a JSON object, got {_type_name(record)}", where)
            out.append((where, record))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl_text(text, label)  # JSON Lines saved as .json (e.g. Dataset.to_json)
        raise _json_error(e, label) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        hint = f"; the records seem to be under '{lists[0]}': make that list the whole file" if len(lists) == 1 else ""
        raise _error(f"expected a JSON array of records, got an object (keys: {_keys_list(data)}){hint}", label)
    raise _error(f"expected a JSON array of records, got {_type_name(data)}", label)


def _read_csv_text(text: str, label: str) -> list[tuple[str, Any]]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long completions exceed the 128 KiB default
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as e:
            raise _error(f"invalid CSV ({e})", f"{label}:1") from None
        header = [h.strip() for h in header]
        seen = set()
        for name in header:
            if name and name in seen:
                raise _error(f"column '{name}' appears twice in the header", f"{label}:1")
            seen.add(name)
        records = []
        start = reader.line_num + 1
        while True:
            where = f"{label}:{start}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise _error(f"invalid CSV ({e})", where) from None
            start = reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # blank line
            if len(row) > len(header) and not any(c.strip() for c in row[len(header) :]):
                row = row[: len(header)]  # trailing empty cells, as spreadsheets export them
            if len(row) != len(header):
                raise _error(f"row has {len(row)} cells but the header has {len(header)} columns", where)
            records.append((where, dict(zip(header, row))))
        return records
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(path: Path, label: str) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _error(f"not a readable Parquet file ({_first_line(e)})", label) from None
    return [(f"{label} row {i}", row) for i, row in enumerate(rows, start=1)]


def _is_save_to_disk_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_save_to_disk(path: Path, label: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to load user data is a user-facing error
        raise _error(f"cannot load the save_to_disk directory ({_first_line(e)})", label) from None
    prefix = label
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if "train" in loaded:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise _error(
                f"the DatasetDict has splits {', '.join(splits) or 'none'} and none is named 'train'", label
            )
        loaded = loaded[split]
        prefix = f"{label.rstrip('/')}/{split}"
    rows = loaded.to_list()
    return [(f"{prefix} row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_file(path: Path, label: str) -> list[tuple[str, Any]]:
    """Records of one file or save_to_disk directory as (where, record) pairs."""
    if path.is_dir():
        if _is_save_to_disk_dir(path):
            return _read_save_to_disk(path, label)
        raise _error(
            "is a directory but not one written by datasets' save_to_disk "
            f"(no state.json or dataset_dict.json); {_FILE_TYPES_HINT}",
            label,
        )
    if not path.exists():
        hint = ""
        parent = path.parent
        if parent.is_dir():
            try:
                names = [p.name for p in parent.iterdir()]
            except OSError:
                names = []
            hint = _did_you_mean(path.name, names)
        raise _error(f"file not found{hint}", label)
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        shown = suffix or "(no extension)"
        raise _error(f"unsupported file type '{shown}'; {_FILE_TYPES_HINT}", label)
    if suffix == ".parquet":
        return _read_parquet(path, label)
    text = _decode(_read_bytes(path, label), label)
    if not text.strip():
        raise _error("no preference pairs found (the file is empty)", label)
    if suffix == ".jsonl":
        return _read_jsonl_text(text, label)
    if suffix == ".json":
        return _read_json_text(text, label)
    return _read_csv_text(text, label)


def _check_not_csv(path: Path, fmt: str, label: str) -> None:
    if fmt in ("conversational", "sharegpt") and path.suffix.lower() == ".csv" and not path.is_dir():
        raise _error(
            f"the {fmt} format needs lists of messages, which CSV cells cannot hold; use .jsonl, .json or .parquet",
            label,
        )


def _read_nonempty(path: Path, label: str) -> list[tuple[str, Any]]:
    records = _read_file(path, label)
    if not records:
        raise _error("no preference pairs found (the file has no records)", label)
    return records


# --------------------------------------------------------------------------- public API


def load_pairs(
    path: str | Path, format: str = "auto", columns: dict[str, str] | None = None
) -> list[PreferencePair]:
    """Load preference pairs from a .json, .jsonl, .csv, .parquet file or a save_to_disk directory.

    ``format`` is ``"auto"`` (decided from the first record) or one of :data:`FORMATS`.
    ``columns`` maps canonical names (prompt, chosen, rejected, instruction, input, system,
    history, conversations; LLaMA-Factory's query and messages are accepted too) to the
    file's own column names, e.g. ``{"prompt": "question", "chosen": "good"}``.  As in
    LLaMA-Factory, ``prompt`` names the instruction column when the format is alpaca.
    A ``save_to_disk`` ``DatasetDict`` contributes its ``train`` split (or its only split).
    """
    label = str(path)
    fmt = _check_format_name(format, label)
    user, origin = _user_columns(columns, label)
    names = _default_names()
    names.update(user)
    records = _read_nonempty(Path(path).expanduser(), label)
    if fmt == "auto":
        first_where, first = records[0]
        fmt = _detect_with_columns(first, names, user, first_where) if user else detect_format(first, first_where)
    if fmt == "alpaca" and "prompt" in user and "instruction" not in user:
        names["instruction"] = user["prompt"]  # LLaMA-Factory: 'prompt' is the instruction column
        origin["instruction"] = origin["prompt"]
    _check_not_csv(Path(path), fmt, label)
    return _convert(records, _Spec(fmt, names, mapped=origin))


def _read_llamafactory_target(path: Path, label: str, fmt: str) -> list[tuple[str, Any]]:
    """LLaMA-Factory's file_name may be a file or a directory of data files."""
    if path.is_dir() and not _is_save_to_disk_dir(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise _error("the directory has no data files", label)
        records: list[tuple[str, Any]] = []
        for file in files:
            _check_not_csv(file, fmt, str(Path(label) / file.name))
            records += _read_file(file, str(Path(label) / file.name))
        return records
    _check_not_csv(path, fmt, label)
    return _read_file(path, label)


def load_llamafactory(dataset: str, dataset_dir: str | Path) -> list[PreferencePair]:
    """Load LLaMA-Factory preference dataset(s) described in ``dataset_dir/dataset_info.json``.

    ``dataset`` is an entry name, or several separated by commas (concatenated in order).
    The entry needs ``"ranking": true`` and a local ``file_name`` (relative to
    ``dataset_dir``; a file or a directory of files).  ``formatting`` is ``alpaca``
    (default) or ``sharegpt``; ``columns`` and (sharegpt) ``tags`` rename fields with
    LLaMA-Factory's documented defaults: prompt=instruction, query=input,
    messages=conversations, chosen=chosen, rejected=rejected; system and history are read
    only when mapped in ``columns`` (as LLaMA-Factory does); tags from/value/human/gpt/system.
    """
    info_path = Path(dataset_dir).expanduser() / "dataset_info.json"
    info_label = str(Path(dataset_dir) / "dataset_info.json")
    names = [n.strip() for n in dataset.split(",") if n.strip()] if isinstance(dataset, str) else []
    if not names:
        raise _error(f"no dataset name given (got {dataset!r})", info_label)
    if not info_path.is_file():
        raise _error("file not found (dataset_dir must hold LLaMA-Factory's dataset_info.json)", info_label)
    text = _decode(_read_bytes(info_path, info_label), info_label)
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(e, info_label) from None
    if not isinstance(info, dict):
        raise _error(f"expected an object of dataset entries, got {_type_name(info)}", info_label)

    pairs: list[PreferencePair] = []
    for name in names:
        if name not in info:
            entries = sorted(info)
            available = ", ".join(entries[:10]) + (f", ... ({len(entries)} in all)" if len(entries) > 10 else "")
            hint = _did_you_mean(name, entries)
            raise _error(f"no dataset named '{name}'{hint} (available: {available or 'none'})", info_label)
        spec, file_name = _llamafactory_spec(name, info[name], info_label)
        target = Path(dataset_dir).expanduser() / file_name
        records = _read_llamafactory_target(target, str(Path(dataset_dir) / file_name), spec.fmt)
        if not records:
            raise _error("no preference pairs found (the file has no records)", str(Path(dataset_dir) / file_name))
        pairs += _convert(records, spec)
    return pairs


_LF_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "chosen", "rejected")
_LF_UNSUPPORTED_COLUMNS = {
    "tools": "tool use",
    "images": "images",
    "videos": "videos",
    "audios": "audio",
    "kto_tag": "KTO (unpaired) labels",
}


def _llamafactory_spec(name: str, entry: Any, where: str) -> tuple[_Spec, str]:
    what = f"dataset '{name}'"
    if not isinstance(entry, dict):
        raise _error(f"{what} must be an object, got {_type_name(entry)}", where)
    if entry.get("ranking") is not True:
        raise _error(f"{what} is not a preference dataset (its entry needs \"ranking\": true)", where)
    file_name = entry.get("file_name")
    if file_name is None:
        for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
            if key in entry:
                raise _error(
                    f"{what} is loaded through '{key}'; preftune reads local files only: "
                    "download it and set file_name",
                    where,
                )
        raise _error(f"{what} has no 'file_name'", where)
    if not isinstance(file_name, str) or not file_name:
        raise _error(f"{what} 'file_name' must be a string, got {_type_name(file_name)}", where)

    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        hint = _did_you_mean(str(formatting), ["alpaca", "sharegpt"]) or " (use alpaca or sharegpt)"
        raise _error(f"{what} has formatting '{formatting}'{hint}", where)

    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        raise _error(f"{what} 'columns' must be an object, got {_type_name(columns)}", where)
    for key, value in columns.items():
        if key in _LF_UNSUPPORTED_COLUMNS:
            if value:
                raise _error(f"{what} maps column '{key}': {_LF_UNSUPPORTED_COLUMNS[key]} is not supported", where)
            continue
        if key not in _LF_COLUMNS:
            raise _error(f"{what} has unknown column '{key}'{_did_you_mean(key, _LF_COLUMNS)}", where)
        if value is not None and (not isinstance(value, str) or not value):
            raise _error(f"{what} column '{key}' must be a column name, got {_type_name(value)}", where)

    names: dict[str, str | None] = {name_: None for name_ in _CANONICAL}
    names["chosen"] = columns.get("chosen") or "chosen"
    names["rejected"] = columns.get("rejected") or "rejected"
    names["system"] = columns.get("system")  # LLaMA-Factory default: no system column
    if formatting == "alpaca":
        names["instruction"] = columns.get("prompt") or "instruction"
        names["input"] = columns.get("query") or "input"
        names["history"] = columns.get("history")  # LLaMA-Factory default: no history column
        fmt = "alpaca"
    else:
        names["conversations"] = columns.get("messages") or "conversations"
        fmt = "sharegpt"
    lf_to_canonical = {"prompt": "instruction", "query": "input", "messages": "conversations"}
    mapped = {lf_to_canonical.get(k, k): k for k, v in columns.items() if v and k in _LF_COLUMNS}

    tags = dict(_SHAREGPT_TAGS)
    raw_tags = entry.get("tags") or {}
    if not isinstance(raw_tags, dict):
        raise _error(f"{what} 'tags' must be an object, got {_type_name(raw_tags)}", where)
    for key, value in raw_tags.items():
        if key not in tags:
            raise _error(f"{what} has unknown tag '{key}'{_did_you_mean(key, list(tags))}", where)
        if value is not None and not isinstance(value, str):
            raise _error(f"{what} tag '{key}' must be a string, got {_type_name(value)}", where)
        if value is None and key != "system_tag" and key not in ("observation_tag", "function_tag"):
            raise _error(f"{what} tag '{key}' must be a string, got null", where)
        tags[key] = value
    return _Spec(fmt, names, mapped=mapped, tags=tags), file_name


def split_eval(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split ``pairs`` into (train, eval) with a seeded random choice of eval pairs.

    Eval gets ``round(fraction * n)`` pairs, at least 1 when ``fraction > 0`` and
    ``n >= 2``, and at most ``n - 1`` so training keeps at least one pair.  Both lists keep
    the input order.  The same pairs, fraction and seed always give the same split (only
    ``random.Random(seed).random()`` is used, which Python keeps stable across versions).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction):
        raise _error(f"eval fraction must be a number from 0 up to (not including) 1, got {fraction!r}", None)
    if not 0 <= fraction < 1:
        raise _error(f"eval fraction must be from 0 up to (not including) 1, got {fraction}", None)
    n = len(pairs)
    if fraction == 0 or n < 2:
        return list(pairs), []
    n_eval = min(max(1, round(fraction * n)), n - 1)
    rng = random.Random(seed)
    keys = [rng.random() for _ in range(n)]
    chosen = set(sorted(range(n), key=keys.__getitem__)[:n_eval])
    train = [p for i, p in enumerate(pairs) if i not in chosen]
    held = [p for i, p in enumerate(pairs) if i in chosen]
    return train, held
