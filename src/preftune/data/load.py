"""The entry points: load preference pairs from a file and split off evaluation pairs."""

from __future__ import annotations

import math
import random
from pathlib import Path

from preftune.data.common import data_error
from preftune.data.formats import (
    Spec,
    check_format_name,
    convert,
    default_names,
    detect_format,
    detect_with_columns,
    user_columns,
)
from preftune.data.readers import check_not_csv, read_nonempty
from preftune.types import PreferencePair


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
    fmt = check_format_name(format, label)
    user, origin = user_columns(columns, label)
    names = default_names()
    names.update(user)
    records = read_nonempty(Path(path).expanduser(), label)
    if fmt == "auto":
        first_where, first = records[0]
        fmt = detect_with_columns(first, names, user, first_where) if user else detect_format(first, first_where)
    if fmt == "alpaca" and "prompt" in user and "instruction" not in user:
        names["instruction"] = user["prompt"]  # LLaMA-Factory: 'prompt' is the instruction column
        origin["instruction"] = origin["prompt"]
    check_not_csv(Path(path), fmt, label)
    return convert(records, Spec(fmt, names, mapped=origin))


def split_eval(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split ``pairs`` into (train, eval) with a seeded random choice of eval pairs.

    Eval gets ``round(fraction * n)`` pairs, at least 1 when ``fraction > 0`` and
    ``n >= 2``, and at most ``n - 1`` so training keeps at least one pair; a single pair
    with ``fraction > 0`` is an error (no pair would be held out).  Both lists keep
    the input order.  The same pairs, fraction and seed always give the same split (only
    ``random.Random(seed).random()`` is used, which Python keeps stable across versions).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction):
        raise data_error(f"eval fraction must be a number from 0 up to (not including) 1, got {fraction!r}", None)
    if not 0 <= fraction < 1:
        raise data_error(f"eval fraction must be from 0 up to (not including) 1, got {fraction}", None)
    n = len(pairs)
    if fraction > 0 and n == 1:
        raise data_error(
            f"eval_split {fraction} holds out no pair: the training data has only 1 pair (one is needed for "
            "training and one for evaluation); set eval_split: 0 or give an eval_file",
            pairs[0].source or None,
        )
    if fraction == 0 or n < 2:
        return list(pairs), []
    n_eval = min(max(1, round(fraction * n)), n - 1)
    rng = random.Random(seed)
    keys = [rng.random() for _ in range(n)]
    chosen = set(sorted(range(n), key=keys.__getitem__)[:n_eval])
    train = [p for i, p in enumerate(pairs) if i not in chosen]
    held = [p for i, p in enumerate(pairs) if i in chosen]
    return train, held


def require_eval_pairs(stats: dict[str, int], what: str, max_length: int | None = None) -> None:
    """Stop before training when evaluation data was given but none of it survived tokenization:
    ``stats`` is ``vars(TokenizeStats)`` of the eval pairs, ``what`` names where they came from (the
    eval file, or ``"eval_split 0.1"``). Without this the run trains to the end and only then finds it
    has nothing to evaluate."""
    if stats.get("total", 0) == 0 or stats.get("kept", 0) > 0:
        return
    limit = f" (max_length={max_length})" if max_length is not None else ""
    raise data_error(
        f"no usable eval pair: {stats['total']} loaded, {stats.get('dropped_truncated', 0)} dropped by "
        f"truncation{limit}, {stats.get('dropped_identical', 0)} with chosen == rejected",
        what,
    )
