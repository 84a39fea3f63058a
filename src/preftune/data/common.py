"""Shared by the data modules: one-line errors that name the file and line, readable type names."""

from __future__ import annotations

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

