"""Shared by the data modules: one-line errors that name the file and line, readable type names."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from preftune.errors import PreftuneError
from preftune.util import type_name  # noqa: F401  (the data modules' type names)


def one_line(text: str) -> str:
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


def data_error(message: str, where: str | None) -> PreftuneError:
    return PreftuneError(one_line(message), where)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def keys_list(record: dict) -> str:
    keys = [one_line(str(k)) for k in record]
    if not keys:
        return "none"
    shown = ", ".join(keys[:12])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")



# --------------------------------------------------------------------------- strict JSON
# json's defaults let bad input through or out as a traceback: a duplicate key silently keeps the last
# value, a number longer than Python's int-conversion limit raises a bare ValueError, a lone surrogate
# ("\ud800") decodes into a str no tokenizer can encode, and deep nesting raises RecursionError.


class JsonValueError(ValueError):
    """A JSON value this project refuses; the message says which and where inside the record."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_in(text: str) -> str | None:
    """The first lone surrogate in ``text``, escaped (``'\\ud800'``), or None."""
    m = _SURROGATE.search(text)
    return None if m is None else f"\\u{ord(m.group()):04x}"


def _check_string(value: Any, key: str) -> None:
    """No lone surrogate in ``value``, a string or strings in lists (objects are checked as they are
    decoded, by :func:`_object`)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            bad = surrogate_in(item)
            if bad is not None:
                raise JsonValueError(f"field '{one_line(key)}' holds a lone surrogate ('{bad}'), which is not text")
        elif isinstance(item, list):
            stack.extend(item)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        shown = surrogate_in(key)
        if shown is not None:
            raise JsonValueError(f"a field name holds a lone surrogate ('{shown}'), which is not text")
        if key in out:
            raise JsonValueError(f"field '{one_line(key)}' appears twice in one object")
        _check_string(value, key)
        out[key] = value
    return out


def _int(text: str) -> int:
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    if limit and digits > limit:
        raise JsonValueError(f"a number with {digits} digits (at most {limit} are read)")
    return int(text)


STRICT_JSON = json.JSONDecoder(object_pairs_hook=_object, parse_int=_int)


def strict_json_problem(exc: BaseException) -> str | None:
    """The one-line problem for an exception from :data:`STRICT_JSON`, None when it is a syntax error
    (``json.JSONDecodeError``, which callers report with its line and column)."""
    if isinstance(exc, JsonValueError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deeply (lists or objects inside each other beyond Python's recursion limit)"
    if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError):
        return first_line(exc)
    return None


def loads_strict(text: str, where: str) -> Any:
    """``json.loads`` through :data:`STRICT_JSON`: every refusal is a one-line error naming ``where``."""
    try:
        return STRICT_JSON.decode(text)
    except json.JSONDecodeError as e:
        raise data_error(f"invalid JSON ({e.msg}: column {e.colno})", f"{where}:{e.lineno}") from None
    except (ValueError, RecursionError) as e:
        raise data_error(strict_json_problem(e) or first_line(e), where) from None
