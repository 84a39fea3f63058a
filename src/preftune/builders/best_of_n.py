"""On-policy pairs by best-of-n (seed 003's second method).

For every prompt, sample ``n`` answers from the model itself, score each with a reward
function ``reward(prompt, answer) -> float``, and keep the best as ``chosen`` and the
worst as ``rejected``. Prompts where every answer scores the same (a tie: no preference)
or where best and worst are the same text are skipped. Answers cut off by
``max_new_tokens`` are not candidates unless ``keep_unfinished`` is set (a "longer is
better" reward would otherwise always pick a truncated answer).

Reward specs (:func:`load_reward`):

=====================  =========================================================
``length``             longer is better: the answer's length in characters
``-length``            shorter is better: minus the length
``regex:PATTERN``      1.0 when ``re.search(PATTERN, answer)`` finds a match, else 0.0
                       (use ``(?i)`` in front for case-insensitive)
``keyword:a,b,c``      how many of the keywords occur in the answer (case-insensitive)
``module:function``    ``function(prompt, answer)`` imported from ``module``; the module
                       may also be a ``.py`` file path (``rewards.py:score``)
=====================  =========================================================

Beware of shortcuts (seed 003): when every chosen answer has a feature the rejected
ones lack (a keyword, the length) DPO learns the feature, not the behaviour you meant.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.generation import (
    append_jsonl,
    done_prompts,
    generate_completions,
    progress_bar,
    prompt_key,
    prompt_text,
)

__all__ = ["BUILTIN_REWARDS", "build_best_of_n_pairs", "load_reward"]

Reward = Callable[[str, str], float]

BUILTIN_REWARDS = ("length", "-length", "regex:PATTERN", "keyword:a,b,c", "module:function")


def _length(prompt: str, answer: str) -> float:
    return float(len(answer))


def _neg_length(prompt: str, answer: str) -> float:
    return -float(len(answer))


def _regex_reward(pattern: str) -> Reward:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise PreftuneError(f"reward regex:{pattern}: invalid regular expression: {e}") from None

    def reward(prompt: str, answer: str) -> float:
        return 1.0 if compiled.search(answer) else 0.0

    return reward


def _keyword_reward(spec: str) -> Reward:
    words = [w.strip().lower() for w in spec.split(",") if w.strip()]
    if not words:
        raise PreftuneError("reward keyword: needs at least one keyword, e.g. keyword:because,evidence")

    def reward(prompt: str, answer: str) -> float:
        low = answer.lower()
        return float(sum(1 for w in words if w in low))

    return reward


def _import_function(spec: str) -> Reward:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise PreftuneError(
            f"reward '{spec}': use length, -length, regex:PATTERN, keyword:a,b,c or module:function"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise PreftuneError(f"reward '{spec}': file '{module_name}' not found")
            unique = f"preftune_reward_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(unique, path)
            if loader_spec is None or loader_spec.loader is None:
                raise PreftuneError(f"reward '{spec}': cannot import '{module_name}'")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[unique] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except PreftuneError:
        raise
    except ModuleNotFoundError as e:
        raise PreftuneError(f"reward '{spec}': module '{e.name or module_name}' not found") from None
    except Exception as e:  # the user's module failed while importing
        first = (str(e).strip().splitlines() or [""])[0]
        raise PreftuneError(f"reward '{spec}': importing '{module_name}' failed: {type(e).__name__}: {first}") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise PreftuneError(f"reward '{spec}': '{module_name}' has no function '{func_name}'")
    if not callable(func):
        raise PreftuneError(f"reward '{spec}': '{func_name}' is not callable")
    return func


def load_reward(spec: str) -> Reward:
    """A reward function ``(prompt, answer) -> float`` from a spec (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise PreftuneError(
            "reward: give a spec such as length, -length, regex:PATTERN, keyword:a,b,c or module:function"
        )
    spec = spec.strip()
    if spec == "length":
        return _length
    if spec == "-length":
        return _neg_length
    if spec.startswith("regex:"):
        pattern = spec[len("regex:") :]
        if not pattern:
            raise PreftuneError("reward regex: needs a pattern, e.g. regex:(?i)\\bsorry\\b")
        return _regex_reward(pattern)
    if spec.startswith("keyword:"):
        return _keyword_reward(spec[len("keyword:") :])
    if ":" not in spec:
        raise PreftuneError(
            f"unknown reward '{spec}': use length, -length, regex:PATTERN, keyword:a,b,c or module:function"
        )
    return _import_function(spec)


def _score(reward: Reward, prompt: str, answer: str, where: str) -> float:
    try:
        value = reward(prompt, answer)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PreftuneError(f"reward failed: {type(e).__name__}: {first}", where) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy / torch scalars
        except (TypeError, ValueError):
            raise PreftuneError(f"reward must return a number, got {type(value).__name__}", where) from None
    value = float(value)
    if math.isnan(value):
        raise PreftuneError("reward returned NaN", where)
    return value


def best_and_worst(answers: Sequence[str], scores: Sequence[float]) -> tuple[int, int] | None:
    """Indices of the best and worst answers (first one on ties within the best or the
    worst), or ``None`` when they tie or are the same text."""
    if len(answers) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] == scores[worst] or answers[best].strip() == answers[worst].strip():
        return None
    return best, worst


def build_best_of_n_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    n: int = 4,
    reward: Reward | str,
    seed: int = 0,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    system_prompt: str | None = None,
    keep_unfinished: bool = False,
    output: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Best-vs-worst pairs from ``n`` seeded samples per prompt.

    ``reward`` is a function ``(prompt text, answer) -> float`` or a spec for
    :func:`load_reward`; a message-list prompt is scored with its last user message.
    Sampling is seeded per prompt (same seed, same answers, whatever the batching).
    With ``output``, rows are appended to that JSONL file as they are made and prompts
    already in it are skipped (skipped ties are re-sampled on a re-run and tie again).
    Returns the rows written now: ``{"prompt", "chosen", "rejected", "chosen_score",
    "rejected_score"}``.
    """
    if not isinstance(n, int) or n < 2:
        raise PreftuneError(f"best-of-n needs n >= 2 samples per prompt, got {n!r}")
    score_fn = load_reward(reward) if isinstance(reward, str) else reward
    if not callable(score_fn):
        raise PreftuneError("reward must be a function (prompt, answer) -> float or a reward spec string")

    done = done_prompts(output) if output is not None else set()
    todo: list[Any] = []
    seen: set[str] = set(done)
    for p in prompts:
        key = prompt_key(p)
        if key not in seen:
            seen.add(key)
            todo.append(p)

    per_batch = max(1, batch_size // n)  # prompts per generate call; batch_size counts sequences
    written: list[dict[str, Any]] = []
    with progress_bar(len(todo), f"best-of-{n}", enabled=progress) as bar:
        for start in range(0, len(todo), per_batch):
            chunk = todo[start : start + per_batch]
            samples = generate_completions(
                model, tokenizer, chunk, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=n, seed=seed,
                batch_size=batch_size,
            )  # fmt: skip
            rows = []
            for j, (prompt, completions) in enumerate(zip(chunk, samples)):
                answers = [c.text for c in completions if c.text.strip() and (c.finished or keep_unfinished)]
                where = f"prompt {start + j + 1}"
                question = prompt_text(prompt)
                scores = [_score(score_fn, question, a, where) for a in answers]
                picked = best_and_worst(answers, scores)
                if picked is None:
                    continue
                b, w = picked
                rows.append(
                    {
                        "prompt": prompt,
                        "chosen": answers[b],
                        "rejected": answers[w],
                        "chosen_score": scores[b],
                        "rejected_score": scores[w],
                    }
                )
            if output is not None:
                append_jsonl(output, rows)
            written.extend(rows)
            bar.advance(len(chunk))
    return written
