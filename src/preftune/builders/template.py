"""Expand a YAML spec of claims x phrasings x openings into preference pairs.

The typical use is sycophancy data: a user states a false or one-sided claim and pushes
the assistant to agree.  The *chosen* reply politely corrects the claim; the *rejected*
reply blindly agrees.  A few dozen claims, a dozen phrasings and a dozen openings per
side give hundreds of varied pairs, and whole claims can be held out to test whether the
trained model generalizes to claims it never saw.

Spec schema
===========

.. code-block:: yaml

    phrasings:              # required: how a user states a claim
      - "I'm pretty sure {claim}. Right?"
      - "Just agree with me: {claim}."
    openings:               # required: how each reply starts (one list per side)
      chosen:   ["Actually,", "That's a common belief, but", "Not quite."]
      rejected: ["Yes,", "You're right:", "Spot on."]
    claims:                 # required: the claims, each with both answers
      - id: great_wall_space                # unique; letters, digits, _ . -
        claim: "the Great Wall of China is visible from space with the naked eye"
        correction: "the wall is only a few metres wide, so it cannot be seen ..."
        agreement: "it is the one structure that astronauts can easily spot ..."
        pairs: 4            # optional: overrides pairs_per_claim for this claim
    pairs_per_claim: 6      # optional (default 1)
    heldout: [great_wall_space]   # optional: claim ids kept out of training

Rules
-----

* ``phrasings``: non-empty list of distinct one-line strings, each containing the
  placeholder ``{claim}`` exactly once and no other ``{...}``.  The claim is inserted
  as written, so claims start in lower case (unless they start with a name) and have no
  final period; write phrasings where the claim sits mid-sentence.
* ``openings.chosen`` / ``openings.rejected``: non-empty lists of distinct one-line
  strings.  An opening is joined to the answer text with one space; when the opening is
  empty or ends a sentence (``.``, ``!``, ``?``) the answer's first letter is capitalized.
* ``claims``: non-empty list of mappings with the string fields ``id``, ``claim``,
  ``correction`` and ``agreement`` (one line each; ``claim`` without a final period;
  ``correction`` and ``agreement`` must differ).  A final period is added to an answer
  that has no final punctuation.
* ``pairs_per_claim`` / ``pairs``: positive integers, at most
  ``len(phrasings) * len(openings.chosen) * len(openings.rejected)``.
* ``heldout``: distinct ids of claims in ``claims``; at least one claim must remain.
* Unknown keys are errors that suggest the closest known key.  Every error is a
  one-line :class:`~preftune.errors.PreftuneError` naming the spec file and the field.

Expansion
=========

Each pair of claim *c* is one (phrasing, chosen opening, rejected opening) combination:

* ``prompt``   = the phrasing with ``{claim}`` replaced by *c*'s claim,
* ``chosen``   = a chosen opening + *c*'s correction,
* ``rejected`` = a rejected opening + *c*'s agreement,
* ``claim``    = *c*'s id (so splits can hold whole claims out).

Combinations are sampled without replacement within a claim (no claim repeats a
combination, nor a phrasing or an opening until all have been used).  Across the whole
spec, phrasings and openings are dealt from seeded, reshuffled decks, so every opening
is used about equally often: no opening (and so no first word) dominates a side.  Only
``random.Random(seed)`` is used, so the same spec and seed always give the same rows.

Giveaways
=========

Preference data teaches whatever separates chosen from rejected: if every chosen reply
starts with "Actually" and every rejected one with "Yes", the model can learn the first
word instead of the behaviour.  :mod:`preftune.builders.giveaways` measures this
(:func:`giveaway_words`, :func:`check_giveaways`; re-exported here).

Command line
============

``preftune generate template --spec SPEC --output train.jsonl [--heldout-output
heldout.jsonl] [--heldout-prompts heldout_prompts.txt] [--seed 0] [--heldout-fraction F]``
writes the training pairs, the held-out claims' pairs and one prompt per held-out claim
(one per line, using as many different phrasings as possible), and prints the counts and
any giveaway problems.  :func:`write_template_pairs` writes the three files into one folder.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from preftune.builders.giveaways import NEGATION_WORDS, check_giveaways, giveaway_words
from preftune.errors import PreftuneError
from preftune.util import atomic_write_text, did_you_mean, type_name

__all__ = [
    "Claim",
    "TemplateSpec",
    "load_template_spec",
    "build_template_pairs",
    "build_template_splits",
    "split_by_claim",
    "heldout_prompts",
    "write_template_files",
    "write_template_pairs",
    "giveaway_words",
    "check_giveaways",
    "NEGATION_WORDS",
]

PLACEHOLDER = "{claim}"
_TOP_KEYS = ("phrasings", "openings", "claims", "pairs_per_claim", "heldout")
_OPENING_KEYS = ("chosen", "rejected")
_CLAIM_KEYS = ("id", "claim", "correction", "agreement", "pairs")
_CLAIM_TEXTS = ("claim", "correction", "agreement")
_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
_BRACES = re.compile(r"\{[^{}]*\}")
_SENTENCE_END = (".", "!", "?")
_FINAL_PUNCT = (".", "!", "?", '"', "'", ")", "\u201d", "\u2019")


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    correction: str
    agreement: str
    pairs: int


@dataclass(frozen=True)
class TemplateSpec:
    phrasings: tuple[str, ...]
    chosen_openings: tuple[str, ...]
    rejected_openings: tuple[str, ...]
    claims: tuple[Claim, ...]
    pairs_per_claim: int
    heldout: tuple[str, ...]
    source: str

    @property
    def max_pairs_per_claim(self) -> int:
        return len(self.phrasings) * len(self.chosen_openings) * len(self.rejected_openings)


def _type_name(value: Any) -> str:
    return type_name(value, mapping="mapping")


def _check_keys(mapping: dict, allowed: tuple[str, ...], what: str, where: str) -> None:
    for key in mapping:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed) or f" (known: {', '.join(allowed)})"
            raise PreftuneError(f"{what}unknown key '{key}'{hint}", where)


def _text(value: Any, field: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise PreftuneError(f"{field} must be a string, got {_type_name(value)}", where)
    text = value.strip()
    if "\n" in text or "\r" in text:
        raise PreftuneError(f"{field} must be one line", where)
    if not text and not allow_empty:
        raise PreftuneError(f"{field} is empty", where)
    return text


def _text_list(value: Any, field: str, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    if value is None:
        raise PreftuneError(f"missing '{field}' (a list of strings)", where)
    if not isinstance(value, list):
        raise PreftuneError(f"'{field}' must be a list of strings, got {_type_name(value)}", where)
    if not value:
        raise PreftuneError(f"'{field}' is empty", where)
    out: list[str] = []
    for i, item in enumerate(value, start=1):
        text = _text(item, f"{field} entry {i}", where, allow_empty=allow_empty)
        if text in out:
            raise PreftuneError(f"{field} entry {i} repeats entry {out.index(text) + 1}: {text!r}", where)
        out.append(text)
    return tuple(out)


def _positive_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PreftuneError(f"{field} must be a positive integer, got {_type_name(value)}", where)
    if value < 1:
        raise PreftuneError(f"{field} must be a positive integer, got {value}", where)
    return value


def _phrasings(value: Any, where: str) -> tuple[str, ...]:
    phrasings = _text_list(value, "phrasings", where)
    for i, text in enumerate(phrasings, start=1):
        for token in _BRACES.findall(text):
            if token != PLACEHOLDER:
                hint = did_you_mean(token, [PLACEHOLDER]) or f" (only {PLACEHOLDER} is filled in)"
                raise PreftuneError(f"phrasings entry {i} has unknown placeholder '{token}'{hint}", where)
        count = text.count(PLACEHOLDER)
        if count != 1:
            what = "has no" if count == 0 else f"has {count} times"
            raise PreftuneError(f"phrasings entry {i} {what} {PLACEHOLDER} placeholder: {text!r}", where)
    return phrasings


def _claims(value: Any, default_pairs: int, where: str) -> tuple[Claim, ...]:
    if value is None:
        raise PreftuneError("missing 'claims' (a list of {id, claim, correction, agreement})", where)
    if not isinstance(value, list):
        raise PreftuneError(f"'claims' must be a list, got {_type_name(value)}", where)
    if not value:
        raise PreftuneError("'claims' is empty", where)
    out: list[Claim] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value, start=1):
        label = f"claims entry {i}"
        if not isinstance(item, dict):
            raise PreftuneError(f"{label} must be a mapping with id, claim, correction, agreement", where)
        if isinstance(item.get("id"), str) and item["id"].strip():
            label = f"claims entry {i} ('{item['id'].strip()}')"
        _check_keys(item, _CLAIM_KEYS, f"{label}: ", where)
        for key in ("id",) + _CLAIM_TEXTS:
            if key not in item or item[key] is None:
                raise PreftuneError(f"{label}: missing field '{key}'", where)
        cid = _text(item["id"], f"{label}: field 'id'", where)
        if not _ID.match(cid):
            raise PreftuneError(f"{label}: field 'id' may only hold letters, digits, '_', '.', '-'", where)
        if cid in seen:
            raise PreftuneError(f"{label}: id '{cid}' is already used by claims entry {seen[cid]}", where)
        seen[cid] = i
        claim, correction, agreement = (_text(item[k], f"{label}: field '{k}'", where) for k in _CLAIM_TEXTS)
        if claim.endswith(_SENTENCE_END):
            raise PreftuneError(
                f"{label}: field 'claim' ends with '{claim[-1]}'; leave it off, the phrasings add punctuation",
                where,
            )
        if correction.casefold() == agreement.casefold():
            raise PreftuneError(f"{label}: fields 'correction' and 'agreement' are the same text", where)
        pairs = default_pairs
        if item.get("pairs") is not None:
            pairs = _positive_int(item["pairs"], f"{label}: field 'pairs'", where)
        out.append(Claim(cid, claim, correction, agreement, pairs))
    return tuple(out)


def _heldout(value: Any, claims: tuple[Claim, ...], where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PreftuneError(f"'heldout' must be a list of claim ids, got {_type_name(value)}", where)
    ids = [c.id for c in claims]
    out: list[str] = []
    for i, item in enumerate(value, start=1):
        cid = _text(item, f"heldout entry {i}", where)
        if cid not in ids:
            raise PreftuneError(f"heldout entry {i}: no claim with id '{cid}'{did_you_mean(cid, ids)}", where)
        if cid in out:
            raise PreftuneError(f"heldout entry {i}: '{cid}' is listed twice", where)
        out.append(cid)
    if len(out) == len(ids):
        raise PreftuneError("heldout lists every claim; leave at least one for training", where)
    return tuple(out)


def _read_yaml(path: Path, where: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PreftuneError("spec file not found", where) from None
    except IsADirectoryError:
        raise PreftuneError("spec path is a directory, not a YAML file", where) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PreftuneError(f"cannot read spec file: {type(e).__name__}", where) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or type(e).__name__
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        raise PreftuneError(f"invalid YAML: {problem}", at) from None


def load_template_spec(spec: str | Path | dict | TemplateSpec) -> TemplateSpec:
    """Read and validate a spec (a YAML path or an already parsed mapping)."""
    if isinstance(spec, TemplateSpec):
        return spec
    if isinstance(spec, dict):
        where, data = "spec", spec
    elif isinstance(spec, (str, Path)):
        where = str(spec)
        data = _read_yaml(Path(spec).expanduser(), where)
    else:
        raise PreftuneError(f"spec must be a YAML path or a mapping, got {_type_name(spec)}", None)
    if data is None:
        raise PreftuneError("spec is empty; it needs phrasings, openings and claims", where)
    if not isinstance(data, dict):
        raise PreftuneError(f"spec must be a mapping of phrasings, openings, claims, got {_type_name(data)}", where)
    _check_keys(data, _TOP_KEYS, "", where)

    phrasings = _phrasings(data.get("phrasings"), where)
    openings = data.get("openings")
    if openings is None:
        raise PreftuneError("missing 'openings' (a mapping with chosen and rejected lists)", where)
    if not isinstance(openings, dict):
        got = _type_name(openings)
        raise PreftuneError(f"'openings' must be a mapping with chosen and rejected lists, got {got}", where)
    _check_keys(openings, _OPENING_KEYS, "openings: ", where)
    chosen = _text_list(openings.get("chosen"), "openings.chosen", where, allow_empty=True)
    rejected = _text_list(openings.get("rejected"), "openings.rejected", where, allow_empty=True)

    default_pairs = 1
    if data.get("pairs_per_claim") is not None:
        default_pairs = _positive_int(data["pairs_per_claim"], "pairs_per_claim", where)
    claims = _claims(data.get("claims"), default_pairs, where)
    limit = len(phrasings) * len(chosen) * len(rejected)
    for c in claims:
        if c.pairs > limit:
            field = "pairs_per_claim" if c.pairs == default_pairs else f"claim '{c.id}': field 'pairs'"
            raise PreftuneError(
                f"{field} is {c.pairs}, but phrasings x chosen openings x rejected openings give only {limit} "
                "combinations",
                where,
            )
    heldout = _heldout(data.get("heldout"), claims, where)
    return TemplateSpec(phrasings, chosen, rejected, claims, default_pairs, heldout, where)


# --------------------------------------------------------------------------- expansion


class _Deck:
    """Indices 0..n-1 dealt in seeded shuffled rounds, so each is used about equally often."""

    def __init__(self, n: int, rng: random.Random):
        self.n = n
        self.rng = rng
        self.cards: list[int] = []

    def _refill(self) -> None:
        more = list(range(self.n))
        self.rng.shuffle(more)
        self.cards += more

    def draw(self, avoid: set[int]) -> int:
        if len(avoid) >= self.n:
            avoid = set()
        while True:
            for pos, card in enumerate(self.cards):
                if card not in avoid:
                    return self.cards.pop(pos)
            self._refill()


def _join(opening: str, text: str) -> str:
    if not text.endswith(_FINAL_PUNCT):
        text += "."
    if not opening or opening.endswith(_SENTENCE_END):
        text = text[:1].upper() + text[1:]
    return f"{opening} {text}" if opening else text


def _sample_combos(spec: TemplateSpec, rng: random.Random) -> list[list[tuple[int, int, int]]]:
    decks = (
        _Deck(len(spec.phrasings), rng),
        _Deck(len(spec.chosen_openings), rng),
        _Deck(len(spec.rejected_openings), rng),
    )
    sizes = [d.n for d in decks]
    out = []
    for claim in spec.claims:
        used: set[tuple[int, int, int]] = set()
        seen: tuple[set[int], set[int], set[int]] = (set(), set(), set())
        combos = []
        for _ in range(claim.pairs):
            for part, n in zip(seen, sizes):
                if len(part) >= n:  # every item used once in this claim: allow repeats again
                    part.clear()
            combo = tuple(deck.draw(part) for deck, part in zip(decks, seen))
            if combo in used:  # only possible after a component ran out; pick a fresh one at random
                free = [
                    (p, c, r)
                    for p in range(sizes[0])
                    for c in range(sizes[1])
                    for r in range(sizes[2])
                    if (p, c, r) not in used
                ]
                combo = free[rng.randrange(len(free))]
            used.add(combo)
            for part, index in zip(seen, combo):
                part.add(index)
            combos.append(combo)
        out.append(combos)
    return out


def build_template_pairs(spec: str | Path | dict | TemplateSpec, seed: int = 0) -> list[dict]:
    """Expand ``spec`` into rows ``{"prompt", "chosen", "rejected", "claim"}`` (claims in spec order).

    The same spec and ``seed`` always give the same rows.
    """
    spec = load_template_spec(spec)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PreftuneError(f"seed must be an integer, got {_type_name(seed)}", None)
    rng = random.Random(seed)
    rows = []
    for claim, combos in zip(spec.claims, _sample_combos(spec, rng)):
        for p, c, r in combos:
            rows.append(
                {
                    "prompt": spec.phrasings[p].replace(PLACEHOLDER, claim.claim),
                    "chosen": _join(spec.chosen_openings[c], claim.correction),
                    "rejected": _join(spec.rejected_openings[r], claim.agreement),
                    "claim": claim.id,
                }
            )
    return rows


def split_by_claim(
    rows: list[dict],
    heldout_claims: list[str] | None = None,
    heldout_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, heldout) so that no claim has pairs on both sides.

    The held-out claims are ``heldout_claims`` plus, when ``heldout_fraction > 0``,
    claims drawn at random (seeded) until ``round(heldout_fraction * number of claims)``
    claims are held out in all.  Both lists keep the input order.  At least one claim
    must stay in training.
    """
    claims: list[str] = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("claim"), str):
            raise PreftuneError(f"row {i} has no 'claim' id; split_by_claim needs rows from build_template_pairs", None)
        if row["claim"] not in claims:
            claims.append(row["claim"])
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) or math.isnan(
        heldout_fraction
    ):
        raise PreftuneError(f"heldout_fraction must be a number from 0 up to 1, got {heldout_fraction!r}", None)
    if not 0 <= heldout_fraction < 1:
        raise PreftuneError(f"heldout_fraction must be from 0 up to (not including) 1, got {heldout_fraction}", None)
    held: list[str] = []
    for cid in heldout_claims or []:
        if cid not in claims:
            raise PreftuneError(f"heldout claim '{cid}' is not in the rows{did_you_mean(str(cid), claims)}", None)
        if cid not in held:
            held.append(cid)
    target = round(heldout_fraction * len(claims))
    if target > len(held):
        rest = [c for c in claims if c not in held]
        held += random.Random(seed).sample(rest, min(target - len(held), len(rest)))
    if claims and len(held) >= len(claims):
        raise PreftuneError("every claim would be held out; leave at least one for training", None)
    held_set = set(held)
    train = [r for r in rows if r["claim"] not in held_set]
    heldout = [r for r in rows if r["claim"] in held_set]
    return train, heldout


def build_template_splits(
    spec: str | Path | dict | TemplateSpec, seed: int = 0, heldout_fraction: float = 0.0
) -> tuple[list[dict], list[dict]]:
    """Expand ``spec`` and split it by claim, holding out the spec's own ``heldout`` list."""
    spec = load_template_spec(spec)
    rows = build_template_pairs(spec, seed)
    return split_by_claim(rows, list(spec.heldout), heldout_fraction, seed)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def heldout_prompts(spec: str | Path | dict | TemplateSpec, rows: list[dict]) -> dict[str, str]:
    """One prompt per claim in ``rows`` ({claim id: prompt}), for before/after generation.

    Claims are taken in order; each gets its first prompt written with a phrasing that no
    earlier claim got (its first prompt if all its phrasings are taken), so the list
    covers as many phrasings as possible.
    """
    spec = load_template_spec(spec)
    texts = {c.id: c.claim for c in spec.claims}
    by_claim: dict[str, list[str]] = {}
    for row in rows:
        by_claim.setdefault(row["claim"], []).append(row["prompt"])
    used: set[int] = set()
    out: dict[str, str] = {}
    for cid, prompts in by_claim.items():
        pick = prompts[0]
        for prompt in prompts:
            index = next(
                (i for i, ph in enumerate(spec.phrasings) if ph.replace(PLACEHOLDER, texts.get(cid, "")) == prompt),
                None,
            )
            if index is not None and index not in used:
                pick = prompt
                used.add(index)
                break
        out[cid] = pick
    return out


def write_template_files(
    spec: str | Path | dict | TemplateSpec,
    train_path: str | Path,
    heldout_path: str | Path | None = None,
    prompts_path: str | Path | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.0,
) -> dict[str, Any]:
    """Expand and split ``spec``, then write the training pairs to ``train_path`` and, when
    given, the held-out claims' pairs to ``heldout_path`` and one prompt per held-out claim
    (see :func:`heldout_prompts`), one per line, to ``prompts_path``.  Each file is replaced
    atomically.  Returns the paths written, the counts and the rows (train, then held-out).
    """
    spec = load_template_spec(spec)
    train, heldout = build_template_splits(spec, seed, heldout_fraction)
    prompts = heldout_prompts(spec, heldout)
    texts = {
        "train": (train_path, _jsonl(train)),
        "heldout": (heldout_path, _jsonl(heldout)),
        "heldout_prompts": (prompts_path, "".join(p.replace("\n", " ") + "\n" for p in prompts.values())),
    }
    paths: dict[str, str] = {}
    for key, (path, text) in texts.items():
        if path is None:
            continue
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        paths[key] = str(path)
    return {
        "paths": paths,
        "claims": len(spec.claims),
        "train_claims": len({r["claim"] for r in train}),
        "heldout_claims": len(prompts),
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "rows": train + heldout,
    }


def write_template_pairs(
    spec: str | Path | dict | TemplateSpec,
    out_dir: str | Path | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.0,
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``heldout.jsonl`` and ``heldout_prompts.txt`` into ``out_dir``
    (default: the spec's folder); see :func:`write_template_files`."""
    if out_dir is None:
        if not isinstance(spec, (str, Path)):
            raise PreftuneError("out_dir is required when the spec is not a file", None)
        out_dir = Path(spec).expanduser().parent
    spec = load_template_spec(spec)
    out = Path(out_dir).expanduser()
    return write_template_files(
        spec, out / "train.jsonl", out / "heldout.jsonl", out / "heldout_prompts.txt", seed, heldout_fraction
    )
