"""Generate answers with the exact prompt ids training uses, and spot degenerate text.

:func:`generate` renders every prompt with :func:`preftune.templates.render_prompt`
(the ``prompt_ids`` a pair is trained on), left-pads a batch, and decodes each
completion up to the first end-of-turn / EOS token, without special tokens.

Sampling is seeded **per row**: every (prompt, k-th sequence) draws from its own
``torch.Generator`` seeded from ``(seed, prompt, k)``. So the same seed gives the same
answers whatever the batch size, the order of the prompts, or which prompts were already
done in an earlier (interrupted) run. Greedy decoding needs no seed; batched
left-padded greedy decoding gives the same text as one prompt at a time (up to
floating-point ties).

:func:`degeneration` flags the failure modes a too-aggressive DPO run shows (seed 003's
"Deep deep Deep Deep..."): empty answers, runaway repetition of one word or character,
and text made of repeated word 3-grams.

The JSONL helpers (:func:`load_prompts`, :func:`append_jsonl`, :func:`done_prompts`) are
shared by the pair builders and the evaluation: builders append finished rows as they go
and a re-run skips prompts already in the output file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.errors import PreftuneError
from preftune.templates import has_chat_template, render_prompt
from preftune.types import Message
from preftune.util import model_device, special_token_strings

__all__ = [
    "MIN_WORDS_FOR_NGRAMS",
    "NGRAM_SIZE",
    "REPEATED_NGRAM_SHARE",
    "RUNAWAY_CHAR_RUN",
    "RUNAWAY_WORD_RUN",
    "Completion",
    "append_jsonl",
    "degeneration",
    "done_prompts",
    "end_of_turn_ids",
    "generate",
    "generate_completions",
    "load_prompts",
    "prompt_key",
    "prompt_text",
    "progress_bar",
]

Prompt = str | list[Message]

# ---------------------------------------------------------------------------------------
# Degeneration
# ---------------------------------------------------------------------------------------

#: Word n-gram size for the repetition measure.
NGRAM_SIZE = 3
#: ``repeated_ngrams`` is set when more than this share of the word 3-grams repeat an
#: earlier 3-gram of the same text (0.0 = all distinct, ~1.0 = one phrase looping).
#: Normal answers of a few hundred words stay well under 0.15; loops go above 0.5.
REPEATED_NGRAM_SHARE = 0.3
#: Texts with fewer words than this are never flagged for repeated n-grams (too short to tell).
MIN_WORDS_FOR_NGRAMS = 12
#: ``runaway`` is set when one word is repeated this many times in a row, ignoring case
#: and punctuation between the repeats ("Deep deep Deep Deep"). English rarely repeats
#: a word more than twice ("that that").
RUNAWAY_WORD_RUN = 4
#: ``runaway`` is also set when one non-space character repeats this many times in a row
#: ("!!!!!..."); markdown rules such as "---" or "=====" stay far below it.
RUNAWAY_CHAR_RUN = 30
#: ``runaway`` is also set when one emoji-like symbol (Unicode category So) repeats this
#: many times in a row ("🌍🌍🌍🌍🌍🌍..."), ignoring spaces between them; such a symbol takes
#: several tokens, so a looping answer shows few of them. Two or three in a row are normal.
RUNAWAY_SYMBOL_RUN = 6

_WORD = re.compile(r"\w+", re.UNICODE)


def _symbol_run(text: str) -> int:
    """Longest run of one emoji-like symbol (Unicode category So, box drawing aside), spaces between ignored."""
    longest = run = 0
    last = None
    for ch in text:
        if ch.isspace():
            continue
        if unicodedata.category(ch) == "So" and not "\u2500" <= ch <= "\u259f":  # table rules draw boxes
            run = run + 1 if ch == last else 1
            longest = max(longest, run)
        else:
            run = 0
        last = ch
    return longest


def degeneration(text: str) -> dict[str, Any]:
    """Flags and figures that tell a degenerate answer from a normal one.

    Returns ``empty``, ``repeated_ngrams``, ``runaway`` and their summary ``degenerate``
    (any of the three), plus the figures behind them: ``words``,
    ``repeated_ngram_share`` (share of word 3-grams that repeat an earlier one),
    ``longest_run`` (most times one word appears in a row) and ``run_word``.
    See the module constants for the thresholds.
    """
    words = [w.lower() for w in _WORD.findall(text or "")]
    empty = not (text or "").strip()

    share = 0.0
    grams = [tuple(words[i : i + NGRAM_SIZE]) for i in range(len(words) - NGRAM_SIZE + 1)]
    if grams:
        share = 1.0 - len(set(grams)) / len(grams)
    repeated = len(words) >= MIN_WORDS_FOR_NGRAMS and share > REPEATED_NGRAM_SHARE

    longest, run_word, run = 0, "", 0
    for i, word in enumerate(words):
        run = run + 1 if i > 0 and word == words[i - 1] else 1
        if run > longest:
            longest, run_word = run, word
    char_run = 0
    match = re.search(r"(\S)\1{%d,}" % (RUNAWAY_CHAR_RUN - 1), text or "")
    if match:
        char_run = len(match.group(0))
    runaway = longest >= RUNAWAY_WORD_RUN or char_run >= RUNAWAY_CHAR_RUN or _symbol_run(text or "") >= RUNAWAY_SYMBOL_RUN

    return {
        "empty": empty,
        "repeated_ngrams": repeated,
        "runaway": runaway,
        "degenerate": empty or repeated or runaway,
        "words": len(words),
        "repeated_ngram_share": round(share, 4),
        "longest_run": longest,
        "run_word": run_word,
    }


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


class Completion:
    """One generated answer: its text, token count, and whether it ended by itself."""

    __slots__ = ("text", "tokens", "finished")

    def __init__(self, text: str, tokens: int, finished: bool):
        self.text = text
        self.tokens = tokens  # generated tokens, the stop token excluded
        self.finished = finished  # False when max_new_tokens cut it off

    def __repr__(self) -> str:
        return f"Completion({self.text!r}, tokens={self.tokens}, finished={self.finished})"


_SENTINEL = "PreftuneGenerationSentinelQzx"


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Token ids that end an answer: EOS, the chat template's end-of-turn token (the
    first special token it writes after an assistant reply, e.g. ``<|im_end|>``), and
    the model's ``generation_config.eos_token_id`` (one id or a list)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    add(getattr(tokenizer, "eos_token_id", None))
    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                tokenize=False,
            )
        except Exception:  # a template that refuses this shape: EOS alone must do
            text = ""
        i = text.find(_SENTINEL) if isinstance(text, str) else -1
        if i != -1:
            after = text[i + len(_SENTINEL) :]
            hits = [(after.find(s), s) for s in special_token_strings(tokenizer) if s in after]
            if hits:
                tok = min(hits, key=lambda h: (h[0], -len(h[1])))[1]
                add(tokenizer.convert_tokens_to_ids(tok))
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        add(getattr(gen_cfg, "eos_token_id", None))
    return ids


def prompt_key(prompt: Prompt) -> str:
    """A stable string identifying a prompt (the text itself, or its messages as JSON)."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def prompt_text(prompt: Prompt) -> str:
    """The user's question: the prompt itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return str(prompt[-1].get("content", "")) if prompt else ""


def _row_seed(seed: int, prompt: Prompt, k: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{k}\x00{prompt_key(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _RowSampler:
    """Logits processor that samples each row with its own generator.

    ``generate`` runs greedy; this processor leaves only the sampled token finite, so
    greedy's argmax takes it. Each row's draw depends only on that row's generator,
    which makes sampling independent of how rows are batched.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float().cpu() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = (cum - sorted_logits.softmax(-1)) >= self.top_p  # keep tokens until top_p is reached
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        out = torch.full_like(scores, float("-inf"))
        for row, gen in enumerate(self.generators):
            token = int(torch.multinomial(probs[row], 1, generator=gen))
            out[row, token] = 0.0
        return out


def _check_gen_args(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                    num_return_sequences: int, batch_size: int) -> None:  # fmt: skip
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PreftuneError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise PreftuneError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PreftuneError(f"batch_size must be a positive integer, got {batch_size!r}")
    if do_sample:
        if not temperature > 0:
            raise PreftuneError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise PreftuneError(f"top_p must be in (0, 1], got {top_p!r}")


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    num_return_sequences: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    on_progress: Callable[[int], None] | None = None,
    answer_prefixes: Sequence[str] | None = None,
) -> list[list[Completion]]:
    """Like :func:`generate`, with each answer's token count and whether it finished.

    ``on_progress(n)`` is called after each batch with the number of answers it produced.
    ``batch_size`` counts sequences (prompt x return sequence), not prompts.
    ``answer_prefixes[i]`` (optional) is text the answer to prompt i is forced to start
    with: the model continues it, and the returned text is the continuation only
    (unstripped on the left, so ``prefix + text`` reads as the whole answer).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    _check_gen_args(max_new_tokens, do_sample, temperature, top_p, num_return_sequences, batch_size)
    prompts = list(prompts)
    results: list[list[Completion | None]] = [[None] * num_return_sequences for _ in prompts]
    if not prompts:
        return []  # type: ignore[return-value]

    stop_ids = end_of_turn_ids(tokenizer, model)
    if not stop_ids:
        raise PreftuneError("the tokenizer has no EOS token, so generation cannot stop; set tokenizer.eos_token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = model_device(model)

    prompt_ids = [render_prompt(p, tokenizer, system_prompt) for p in prompts]
    if answer_prefixes is not None:
        if len(answer_prefixes) != len(prompts):
            raise PreftuneError(f"answer_prefixes: {len(answer_prefixes)} given for {len(prompts)} prompts")
        prompt_ids = [ids + tokenizer.encode(prefix, add_special_tokens=False) if prefix else ids
                      for ids, prefix in zip(prompt_ids, answer_prefixes)]  # fmt: skip
    # Greedy answers are the same for every k: generate once, copy.
    draws = num_return_sequences if do_sample else 1
    rows = [(i, k) for i in range(len(prompts)) for k in range(draws)]
    rows.sort(key=lambda r: -len(prompt_ids[r[0]]))  # similar lengths together: less padding

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (i, _) in enumerate(chunk):
                ids = prompt_ids[i]
                input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[r, width - len(ids) :] = 1
            processors = LogitsProcessorList()
            if do_sample:
                gens = []
                for i, k in chunk:
                    g = torch.Generator(device="cpu")
                    g.manual_seed(_row_seed(seed, prompts[i], k))
                    gens.append(g)
                processors.append(_RowSampler(gens, temperature, top_p))
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=config,
                    logits_processor=processors,
                )
            new = out[:, width:].tolist()
            for r, (i, k) in enumerate(chunk):
                ids = new[r]
                cut = next((j for j, t in enumerate(ids) if t in stop_ids), None)
                finished = cut is not None
                ids = ids[:cut] if finished else ids
                text = tokenizer.decode(ids, skip_special_tokens=True)
                text = text.rstrip() if answer_prefixes and answer_prefixes[i] else text.strip()
                results[i][k] = Completion(text, len(ids), finished)
            if on_progress is not None:
                on_progress(len(chunk) * (num_return_sequences // draws))
    finally:
        if was_training:
            model.train()
    if not do_sample:
        for row in results:
            for k in range(1, num_return_sequences):
                row[k] = row[0]
    return results  # type: ignore[return-value]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    num_return_sequences: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """Answers to ``prompts``: ``result[i][k]`` is the k-th answer to prompt i.

    Prompts are strings (one user message) or message lists, rendered exactly as
    training renders them (:func:`preftune.templates.render_prompt`, with
    ``system_prompt`` added when the prompt has no system message). Generation stops at
    EOS or the template's end-of-turn token; answers are decoded without special
    tokens and stripped. Greedy by default; with ``do_sample`` the draws use
    ``temperature`` and ``top_p`` and are seeded per prompt (see the module docstring).
    """
    completions = generate_completions(
        model,
        tokenizer,
        prompts,
        system_prompt=system_prompt,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        num_return_sequences=num_return_sequences,
        seed=seed,
        batch_size=batch_size,
        on_progress=on_progress,
    )
    return [[c.text for c in row] for row in completions]


# ---------------------------------------------------------------------------------------
# Prompt files and resumable JSONL output
# ---------------------------------------------------------------------------------------


def _check_prompt_value(value: Any, where: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise PreftuneError("empty prompt", where)
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for j, m in enumerate(value, start=1):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PreftuneError(f"prompt message {j} needs string 'role' and 'content'", where)
        if value[-1]["role"] != "user":
            raise PreftuneError("a message-list prompt must end with a user message", where)
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PreftuneError(f"'prompt' must be a string or a list of messages, got {type(value).__name__}", where)


def _prompt_from_record(record: Any, where: str) -> Prompt:
    if isinstance(record, str):
        return _check_prompt_value(record, where)
    if not isinstance(record, dict):
        raise PreftuneError(f"expected a string or an object with a 'prompt' field, got {type(record).__name__}", where)
    if "prompt" in record:
        return _check_prompt_value(record["prompt"], where)
    for key in ("question", "instruction"):
        if isinstance(record.get(key), str):
            return _check_prompt_value(record[key], where)
    keys = ", ".join(map(str, record)) or "none"
    raise PreftuneError(f"no 'prompt' field (keys: {keys})", where)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file.

    * ``.txt`` (or any other suffix): one prompt per line; blank lines are skipped.
    * ``.jsonl``: one JSON object per line with a ``prompt`` field (a string or a list of
      chat messages ending with a user message); ``question`` / ``instruction`` are
      accepted when there is no ``prompt``. A line may also be a bare JSON string. So a
      preference-pair file works as a prompt file.
    * ``.json``: an array of such records or strings.
    """
    p = Path(path).expanduser()
    label = str(path)
    if not p.is_file():
        raise PreftuneError("prompts file not found", label)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PreftuneError("prompts file is not UTF-8 text", label) from None
    prompts: list[Prompt] = []
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreftuneError(f"invalid JSON: {e.msg}", f"{label}:{n}") from None
            prompts.append(_prompt_from_record(record, f"{label}:{n}"))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreftuneError(f"invalid JSON at line {e.lineno}: {e.msg}", label) from None
        if not isinstance(data, list):
            raise PreftuneError("a .json prompts file must hold an array of prompts", label)
        for n, record in enumerate(data, start=1):
            prompts.append(_prompt_from_record(record, f"{label} (record {n})"))
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PreftuneError("no prompts in the file", label)
    return prompts


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Append ``rows`` to a JSONL file (created with its folders if missing) and flush
    them to disk; returns how many were written.

    A record half-written by an interrupted run (a last line without its newline) is
    removed first, so the file always holds whole records.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    if p.exists() and p.stat().st_size > 0:
        with open(p, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    if not rows:
        return 0
    with open(p, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return len(rows)


def done_prompts(path: str | Path) -> set[str]:
    """:func:`prompt_key` of every prompt already in a JSONL output file (empty when the
    file does not exist). A half-written last line is ignored."""
    p = Path(path)
    if not p.exists():
        return set()
    done: set[str] = set()
    lines = p.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # text after the last newline is a half-written record (or "")
    for n, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PreftuneError(f"invalid JSON in an existing output file: {e.msg}", f"{p}:{n}") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise PreftuneError("existing output file has a line without a 'prompt' field", f"{p}:{n}")
        done.add(prompt_key(record["prompt"]))
    return done


class _Bar:
    def __init__(self, bar: Any, task: Any):
        self.bar, self.task = bar, task

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)


class progress_bar:  # noqa: N801 - used like a function: ``with progress_bar(10, "identity") as bar``
    """A rich progress bar on stderr (count, elapsed, ETA); silent when ``enabled`` is False."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"[bold]{description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.total = total

    def __enter__(self) -> _Bar:
        self.bar.__enter__()
        return _Bar(self.bar, self.bar.add_task("", total=self.total))

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)
