"""Giveaways: does a single surface feature tell chosen from rejected?

Preference data teaches whatever separates chosen from rejected.  If every chosen reply
starts with "Actually" and every rejected one with "Yes", the model can learn the first
word instead of the behaviour.  :func:`giveaway_words` measures this on any rows (first
words per side and how one-sided each common word is) and :func:`check_giveaways` turns
the measurements into a list of problems.  Negation words (``not``, ``no``, ``isn't``
...) are exempt by default: negating a false claim *is* the correction, so they are
expected to lean to the chosen side.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

__all__ = ["giveaway_words", "check_giveaways", "NEGATION_WORDS"]

_WORD = re.compile(r"[a-z0-9]+(?:['\u2019][a-z]+)*")

#: Words that a correction of a false claim naturally carries; exempt from the one-sidedness check.
NEGATION_WORDS = frozenset(
    "not no never nor none nothing cannot can't isn't aren't wasn't weren't doesn't don't didn't "
    "won't wouldn't shouldn't couldn't hasn't haven't hadn't".split()
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def giveaway_words(rows: list[dict], top: int = 10, min_share: float = 0.05) -> dict[str, Any]:
    """Measure how easily a single word tells chosen from rejected.

    Returns a dict with:

    * ``rows``: the number of rows; ``mean_words``: mean reply length per side.
    * ``first_word_accuracy``: how often the side of a reply is guessed right from its
      first word alone (each first word guessing its more frequent side): 0.5 means the
      first word tells nothing, 1.0 that it always gives the side away.
    * ``first_words``: per side, the ``top`` most common first words as
      ``{"word", "rows", "share", "chosen_fraction"}``: ``rows``/``share`` count the rows
      whose reply on that side starts with the word; ``chosen_fraction`` is the share of
      all replies (both sides) starting with the word that are chosen replies -- 0.5
      means the first word says nothing about the side, 1.0 or 0.0 that it gives it away.
    * ``words``: the ``top`` most one-sided words among words found in at least
      ``min_share`` of rows (in either reply), as ``{"word", "rows", "share",
      "chosen_fraction"}`` where ``chosen_fraction`` is (chosen replies containing the
      word) / (replies of both sides containing it).

    Words are lower-cased runs of letters and digits (apostrophes kept: ``you're``).
    """
    n = len(rows)
    first = {"chosen": Counter(), "rejected": Counter()}
    docs = {"chosen": Counter(), "rejected": Counter()}
    in_rows: Counter = Counter()
    lengths = {"chosen": 0, "rejected": 0}
    for row in rows:
        row_words: set[str] = set()
        for side in ("chosen", "rejected"):
            words = _words(str(row[side]))
            lengths[side] += len(words)
            if words:
                first[side][words[0]] += 1
            docs[side].update(set(words))
            row_words.update(words)
        in_rows.update(row_words)

    def first_stats(side: str) -> list[dict]:
        out = []
        for word, count in first[side].most_common(top):
            total = first["chosen"][word] + first["rejected"][word]
            out.append(
                {"word": word, "rows": count, "share": count / n, "chosen_fraction": first["chosen"][word] / total}
            )
        return out

    common = []
    for word, count in in_rows.items():
        if n and count / n >= min_share:
            c, r = docs["chosen"][word], docs["rejected"][word]
            common.append({"word": word, "rows": count, "share": count / n, "chosen_fraction": c / (c + r)})
    common.sort(key=lambda w: (-max(w["chosen_fraction"], 1 - w["chosen_fraction"]), -w["rows"], w["word"]))
    firsts = set(first["chosen"]) | set(first["rejected"])
    guessed = sum(max(first["chosen"][w], first["rejected"][w]) for w in firsts)
    return {
        "rows": n,
        "mean_words": {side: (lengths[side] / n if n else 0.0) for side in lengths},
        "first_word_accuracy": guessed / (2 * n) if n else 0.0,
        "first_words": {"chosen": first_stats("chosen"), "rejected": first_stats("rejected")},
        "words": common[:top],
    }


def check_giveaways(
    rows: list[dict],
    max_first_share: float = 0.25,
    min_word_share: float = 0.10,
    max_one_sided: float = 0.95,
    exempt: Iterable[str] = NEGATION_WORDS,
    max_length_ratio: float = 1.25,
) -> list[str]:
    """Problems that let a single surface feature give the answer away (empty list: none).

    * a first word that starts more than ``max_first_share`` of one side's replies;
    * a word found in at least ``min_word_share`` of rows whose replies containing it are
      ``max_one_sided`` or more on one side (``exempt`` words aside: by default the
      negation words, which a correction inherently carries);
    * mean reply lengths (in words) differing by more than ``max_length_ratio``.
    """
    problems = []
    if not rows:
        return problems
    report = giveaway_words(rows, top=10**9, min_share=min_word_share)
    for side in ("chosen", "rejected"):
        for w in report["first_words"][side]:
            if w["share"] > max_first_share:
                problems.append(f"{w['share']:.0%} of {side} replies start with '{w['word']}'")
    skip = set(exempt)
    for w in report["words"]:
        lean = max(w["chosen_fraction"], 1 - w["chosen_fraction"])
        if w["word"] not in skip and lean >= max_one_sided:
            side = "chosen" if w["chosen_fraction"] >= 0.5 else "rejected"
            problems.append(f"'{w['word']}' is in {w['share']:.0%} of rows and {lean:.0%} on the {side} side")
    lc, lr = report["mean_words"]["chosen"], report["mean_words"]["rejected"]
    if min(lc, lr) > 0 and max(lc, lr) / min(lc, lr) > max_length_ratio:
        problems.append(f"mean reply length differs: chosen {lc:.1f} words, rejected {lr:.1f} words")
    return problems
