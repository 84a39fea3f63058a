"""Small helpers shared across modules: atomic writes, "did you mean", model device, special tokens."""

from __future__ import annotations

import difflib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import torch



def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden name next to ``path`` that no other writer (thread, process) uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def atomic_write(path: Path, write: Callable[[Path], Any], suffix: str = ".tmp") -> None:
    """Write a file through ``write(tmp_path)`` under a unique temporary name, then rename it into
    place: a reader sees the old file or the new one, never half of one. ``suffix`` keeps the file
    extension a writer may need (matplotlib picks the format from it)."""
    path = Path(path)
    tmp = temporary_sibling(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Fill a directory through ``write(tmp_dir)`` under a unique temporary name and rename it into
    place (an existing ``target`` is moved aside first, then removed): a crash never leaves a
    half-written ``target``."""
    target = Path(target)
    tmp = temporary_sibling(target)
    old = temporary_sibling(target, ".old")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def closest(word: str, options: Iterable[str], cutoff: float = 0.6) -> str | None:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return match[0] if match else None


def did_you_mean(word: str, options: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``options``, or ``""``."""
    hint = closest(word, options, cutoff)
    return f"; did you mean '{hint}'?" if hint else ""


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        import torch  # here, not at the top: config and data import this module without torch

        return torch.device("cpu")


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every special token's text (added special tokens and the named ones), longest first."""
    specials: set[str] = set()
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            specials.add(getattr(tok, "content", str(tok)))
    specials.update(getattr(tokenizer, "all_special_tokens", None) or [])
    specials.discard("")
    return tuple(sorted(specials, key=len, reverse=True))
