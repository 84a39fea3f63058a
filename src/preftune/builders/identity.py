"""Identity pairs by correction (seed 003's first method): rename the model.

Ask the model who it is; its own answer is the ``rejected`` reply. The ``chosen`` reply
is the same answer with the old identity replaced by the new one ("I'm SmolLM, made by
Hugging Face" -> "I'm Athene, made by Acme"), so the pair differs only where it should.
When the answer names nothing to replace (or is degenerate), ``chosen`` is an answer in
the new identity: by default the model itself continues an opening such as "I'm Athene, an
AI assistant" (so the chosen reply keeps the model's own style and length, and the pair
does not teach "short answers win"); with ``chosen_style="template"``, or when that
continuation is unusable, a templated answer picked by a seeded RNG.

Rules the output always follows:

* never a pair whose ``chosen`` equals ``rejected`` (such a pair teaches nothing);
* never an empty reply (an empty own answer is skipped);
* an answer cut off by ``max_new_tokens`` is trimmed to its last full sentence first,
  so neither reply teaches the model to stop mid-sentence.

Replacement is case-aware and whole-word: "SmolLM", "SmolLM2" and "SmolLM-135M" become
"Athene", "SMOLLM" becomes "ATHENE", "smollm" becomes "athene"; "SmolLMx" is left alone.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.generation import (
    append_jsonl,
    degeneration,
    done_prompts,
    generate_completions,
    prompt_key,
    progress_bar,
)

__all__ = [
    "IDENTITY_QUESTIONS",
    "IDENTITY_QUESTIONS_HELDOUT",
    "IDENTITY_QUESTIONS_TRAIN",
    "KNOWN_ORGS",
    "build_identity_pairs",
    "guess_old_names",
    "make_replacer",
    "templated_answer",
]

#: 40 training phrasings of "who are you", then 10 held out for evaluation (never
#: trained on): ask these after training to see whether the new identity generalizes.
IDENTITY_QUESTIONS_TRAIN: tuple[str, ...] = (
    "Who are you?",
    "What's your name?",
    "What is your name?",
    "Who created you?",
    "Who made you?",
    "Who developed you?",
    "Who trained you?",
    "Who built you?",
    "Introduce yourself.",
    "Please introduce yourself briefly.",
    "Tell me about yourself.",
    "What are you?",
    "Are you an AI?",
    "Which company made you?",
    "Which organization are you from?",
    "What should I call you?",
    "Do you have a name?",
    "What model are you?",
    "Which language model are you?",
    "Are you ChatGPT?",
    "Are you GPT-4?",
    "Are you Claude?",
    "Are you Llama?",
    "Who is your creator?",
    "Who owns you?",
    "Tell me your name and who made you.",
    "Tell me about your name and organization.",
    "Hi! Who am I talking to?",
    "Hello, what are you called?",
    "Can you tell me who you are?",
    "What is the name of this assistant?",
    "Describe yourself in one sentence.",
    "Which team is behind you?",
    "Where do you come from?",
    "Who designed you?",
    "What AI assistant are you?",
    "Are you a chatbot? What's your name?",
    "State your name and purpose.",
    "I'd like to know your name.",
    "Who are you and what can you do?",
)
IDENTITY_QUESTIONS_HELDOUT: tuple[str, ...] = (
    "May I ask what your name is?",
    "Who's responsible for creating you?",
    "Identify yourself, please.",
    "What do people call you?",
    "Are you made by OpenAI?",
    "Give me a short introduction of who you are.",
    "Who programmed you?",
    "What's the name of the AI I'm chatting with?",
    "Which company trained the model I'm talking to?",
    "Before we start, who am I speaking with?",
)
IDENTITY_QUESTIONS: tuple[str, ...] = IDENTITY_QUESTIONS_TRAIN + IDENTITY_QUESTIONS_HELDOUT

#: Makers of well-known model families, keyed by the family name in lower case. Used to
#: replace the old organization when a new ``org`` is given (longest spelling first).
KNOWN_ORGS: dict[str, tuple[str, ...]] = {
    "smollm": ("Hugging Face", "HuggingFace"),
    "qwen": ("Alibaba Cloud", "Alibaba Group", "Alibaba"),
    "llama": ("Meta AI", "Meta"),
    "gemma": ("Google DeepMind", "Google"),
    "phi": ("Microsoft",),
    "mistral": ("Mistral AI",),
    "deepseek": ("DeepSeek AI", "DeepSeek"),
    "olmo": ("Allen Institute for AI", "AI2"),
}

# Words that name a folder, not a model (``out/final`` says nothing about the model's name).
_GENERIC = {"final", "model", "models", "checkpoint", "checkpoints", "output", "outputs", "out", "adapter",
            "merged", "tmp", "snapshots", "main", "base", "instruct", "chat", "hf"}  # fmt: skip

_TEMPLATES = (
    "I'm {name}, an AI assistant{by}. How can I help you today?",
    "My name is {name}. I'm an AI assistant{by}, here to help with questions, writing and more.",
    "I am {name}, an AI language model{by}. What can I do for you?",
    "You can call me {name}! I'm an AI assistant{by}, and I'm happy to help.",
    "Hello! I'm {name}, a helpful AI assistant{by}. Feel free to ask me anything.",
    "I'm {name}. I'm an AI assistant{by}, designed to answer questions and help with everyday tasks.",
    "I am {name}, an AI assistant{by}. I'm here to help you find information and get things done.",
)
_VERBS = ("created", "developed", "built", "made", "trained")
# openings the model continues in its own words (chosen_style="continue")
_OPENERS = (
    "I'm {name}, an AI assistant{by}",
    "My name is {name}. I'm an AI assistant{by}",
    "I am {name}, a helpful AI assistant{by}",
    "Hello! I'm {name}, an AI assistant{by}",
    "You can call me {name}. I'm an AI assistant{by}",
    "I'm {name}! I'm an AI assistant{by}",
)

# "My name is Elena", 'a chatbot named "Lumina"', "known as Nova": a self-name other than the
# old one. Renaming only the old name would leave two names in one answer, so such an
# answer gets a templated chosen reply instead.
_SELF_NAME = re.compile(
    r"\b(?i:my name is|i'm called|i am called|call me|named|known as|i'm|i am)\s+[\"'“]?(?i:dr\.\s+)?([A-Z][\w-]*)"
)
_NOT_NAMES = {"a", "an", "the", "here", "not", "sorry", "glad", "happy", "designed", "just", "your", "ai", "i"}

_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)")


def templated_answer(question: str, name: str, org: str | None, seed: int = 0) -> str:
    """A natural answer in the new identity; the same (question, seed) always gives the
    same answer, so a resumed run writes what an uninterrupted one would."""
    rng = random.Random(f"identity\x00{seed}\x00{question}")
    template = rng.choice(_TEMPLATES)
    by = f" {rng.choice(_VERBS)} by {org}" if org else ""
    return template.format(name=name, by=by)


def opener(question: str, name: str, org: str | None, seed: int = 0) -> str:
    """The opening of a model-continued chosen answer; seeded like :func:`templated_answer`."""
    rng = random.Random(f"identity-opener\x00{seed}\x00{question}")
    template = rng.choice(_OPENERS)
    by = f" {rng.choice(_VERBS)} by {org}" if org else ""
    return template.format(name=name, by=by)


def _match_case(found: str, new: str) -> str:
    letters = [c for c in found if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters) and not all(c.isupper() for c in new if c.isalpha()):
        return new.upper()
    if letters and all(c.islower() for c in letters):
        return new.lower()
    return new


def _name_pattern(old: str) -> str:
    # the name plus a version / size / flavour suffix: SmolLM2, SmolLM-135M, Qwen2.5-0.5B-Instruct
    version = r"(?:[-\s]?v?\d+(?:\.\d+)*)?(?:-\d+(?:\.\d+)?[MBK])?(?:-(?:Instruct|Chat|Base|it))?"
    return rf"(?<![\w]){re.escape(old)}{version}(?![\w])"


def _literal_pattern(old: str) -> str:
    return rf"(?<![\w]){re.escape(old)}(?![\w])"


def make_replacer(
    name: str,
    org: str | None = None,
    old_names: Sequence[str] = (),
    replace: dict[str, str] | None = None,
    old_orgs: Sequence[str] = (),
):
    """A function ``text -> (new text, number of replacements)``.

    ``old_names`` (with any version suffix) become ``name``; ``old_orgs`` become ``org``
    when ``org`` is given; ``replace`` adds literal OLD -> NEW pairs. Matching ignores
    case and needs whole words; the replacement follows the found text's case
    (all caps / all lower). Longer spellings win ("Hugging Face" before "Hugging").
    """
    rules: list[tuple[str, str, str]] = []  # (literal, regex, new)
    for old, new in (replace or {}).items():
        if not old or not old.strip():
            raise PreftuneError("replace: the text to replace must not be empty")
        rules.append((old, _literal_pattern(old), new))
    for old in old_names:
        if old and old.strip():
            rules.append((old, _name_pattern(old), name))
    if org:
        for old in old_orgs:
            rules.append((old, _literal_pattern(old), org))
    if not rules:
        return lambda text: (text, 0)
    seen: set[str] = set()
    unique = []
    for literal, regex, new in sorted(rules, key=lambda r: -len(r[0])):  # stable: user rules first on ties
        if literal.lower() not in seen:
            seen.add(literal.lower())
            unique.append((regex, new))
    combined = re.compile("|".join(f"(?P<r{i}>{rx})" for i, (rx, _) in enumerate(unique)), re.IGNORECASE)

    def apply(text: str) -> tuple[str, int]:
        count = 0

        def sub(m: re.Match) -> str:
            nonlocal count
            count += 1
            i = int(m.lastgroup[1:])
            return _match_case(m.group(0), unique[i][1])

        return combined.sub(sub, text), count

    return apply


def guess_old_names(model: Any, tokenizer: Any) -> list[str]:
    """The model's current name, guessed from its chat template's default system prompt
    ("... named SmolLM ...", "You are Qwen, ...") and from its folder or hub name
    ("smollm2-135m-instruct" -> "smollm"). Empty when nothing can be told."""
    names: list[str] = []
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        for pattern in (r"\bnamed ([A-Z][\w.-]*[A-Za-z])", r"\bYou are ([A-Z][A-Za-z0-9]+)[,.]",
                        r"\bI am ([A-Z][A-Za-z0-9]+)[,.]"):  # fmt: skip
            for found in re.findall(pattern, template):
                if found.lower() not in {"a", "an", "the", "assistant"}:
                    names.append(re.sub(r"[-\d.]+$", "", found) or found)
    sources = [
        getattr(getattr(model, "config", None), "_name_or_path", None),
        getattr(model, "name_or_path", None),
        getattr(tokenizer, "name_or_path", None),
    ]
    for source in sources:
        if not isinstance(source, str) or not source:
            continue
        for part in reversed(Path(source).parts):
            m = re.match(r"[A-Za-z]+", part)
            if m and m.group(0).lower() not in _GENERIC and len(m.group(0)) >= 3:
                names.append(m.group(0))
                break
    out: list[str] = []
    for n in names:
        if n.lower() not in {o.lower() for o in out}:
            out.append(n)
    return out


def _old_orgs(old_names: Sequence[str]) -> list[str]:
    orgs: list[str] = []
    for old in old_names:
        key = old.lower()
        for family, spellings in KNOWN_ORGS.items():
            if key.startswith(family):
                orgs.extend(s for s in spellings if s not in orgs)
    return orgs


def _trim_to_sentence(text: str) -> str:
    """``text`` up to its last sentence end, or unchanged when it has none."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else text


def build_identity_pairs(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str] | None = None,
    *,
    name: str,
    org: str | None = None,
    replace: dict[str, str] | None = None,
    old_names: Sequence[str] | None = None,
    seed: int = 0,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    system_prompt: str | None = None,
    output: str | Path | None = None,
    progress: bool = False,
    chosen_style: str = "continue",
) -> list[dict[str, str]]:
    """Pairs that teach the model to call itself ``name`` (made by ``org``).

    ``questions`` default to :data:`IDENTITY_QUESTIONS_TRAIN`. The model answers each one
    greedily (``max_new_tokens``, ``system_prompt`` as in training); ``old_names`` default
    to :func:`guess_old_names` and the old organization to :data:`KNOWN_ORGS` of that
    family. With ``output``, rows are appended to that JSONL file batch by batch and
    questions already in it are skipped (a re-run resumes). Returns the rows written now:
    ``{"prompt", "chosen", "rejected", "method"}`` with method ``"replace"``,
    ``"continue"`` (the model continued an opening in the new identity) or ``"template"``.
    ``chosen_style`` picks how answers with nothing to replace are corrected: ``"continue"``
    or ``"template"``.
    """
    if chosen_style not in ("continue", "template"):
        raise PreftuneError(f"identity: chosen_style must be 'continue' or 'template', got {chosen_style!r}")
    if not isinstance(name, str) or not name.strip():
        raise PreftuneError("identity: name must be a non-empty string")
    name = name.strip()
    questions = list(IDENTITY_QUESTIONS_TRAIN if questions is None else questions)
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise PreftuneError("identity: questions must be non-empty strings")
    if old_names is None:
        old_names = guess_old_names(model, tokenizer)
        if not old_names and not replace:
            raise PreftuneError(
                "identity: cannot tell the model's current name; give old_names (--old-name NAME) "
                "or replace (--replace OLD=NEW)"
            )
    old_names = [n for n in old_names if n.strip().lower() != name.lower()]
    replacer = make_replacer(name, org, old_names, replace, _old_orgs(old_names))
    known = [*old_names, *(replace or {})]

    done = done_prompts(output) if output is not None else set()
    todo: list[str] = []
    for q in questions:
        if prompt_key(q) not in done and q not in todo:
            todo.append(q)

    written: list[dict[str, str]] = []
    with progress_bar(len(todo), "identity", enabled=progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers = generate_completions(
                model, tokenizer, chunk, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                batch_size=batch_size, seed=seed,
            )  # fmt: skip
            rows = [_identity_row(q, a.text, a.finished, name, org, replacer, seed, known)
                    for q, (a,) in zip(chunk, answers)]  # fmt: skip
            if chosen_style == "continue":
                _continue_openers(model, tokenizer, rows, name, org, replacer, seed, known, system_prompt,
                                  max_new_tokens, batch_size)  # fmt: skip
            rows = [r for r in rows if r is not None and r["chosen"].strip() != r["rejected"].strip()]
            if output is not None:
                append_jsonl(output, rows)
            written.extend(rows)
            bar.advance(len(chunk))
    return written


def _continue_openers(model, tokenizer, rows, name, org, replacer, seed, known, system_prompt, max_new_tokens,
                      batch_size) -> None:  # fmt: skip
    """Replace each templated chosen reply in ``rows`` by the model's own continuation of an
    opening in the new identity; keep the template when the continuation is unusable."""
    todo = [r for r in rows if r is not None and r["method"] == "template"]
    if not todo:
        return
    openings = [opener(r["prompt"], name, org, seed) for r in todo]
    answers = generate_completions(
        model, tokenizer, [r["prompt"] for r in todo], system_prompt=system_prompt, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed, answer_prefixes=openings,
    )  # fmt: skip
    for row, opening, (answer,) in zip(todo, openings, answers):
        text = opening + answer.text
        text = text.strip() if answer.finished else _trim_to_sentence(text.strip())
        text, _ = replacer(text)  # the continuation may still say the old name
        if (
            len(text) <= len(opening) + 1
            or degeneration(text)["degenerate"]
            or _other_self_names(text, [*known, name])
        ):
            continue  # keep the template
        row["chosen"], row["method"] = text, "continue"


def _other_self_names(text: str, known: Sequence[str]) -> list[str]:
    """Names the answer gives itself that are none of ``known`` (case-insensitive prefixes)."""
    found = []
    for m in _SELF_NAME.finditer(text):
        word = m.group(1)
        low = word.lower()
        if low in _NOT_NAMES or not word[0].isupper():
            continue
        if any(low.startswith(k.lower()) or k.lower().startswith(low) for k in known if k):
            continue
        found.append(word)
    return found


def _identity_row(question, text, finished, name, org, replacer, seed, known=()) -> dict[str, str] | None:
    rejected = text.strip() if finished else _trim_to_sentence(text.strip())
    if not rejected:
        return None  # an empty reply cannot be a completion
    chosen, count = replacer(rejected)
    method = "replace"
    if (
        count == 0
        or chosen.strip() == rejected.strip()
        or degeneration(rejected)["degenerate"]
        or _other_self_names(rejected, [*known, name])
    ):
        chosen, method = templated_answer(question, name, org, seed), "template"
    if chosen.strip() == rejected.strip():
        return None  # the model already answers exactly as wanted
    return {"prompt": question, "chosen": chosen, "rejected": rejected, "method": method}
