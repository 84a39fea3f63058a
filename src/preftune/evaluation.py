"""Did training work? Pair accuracies and before/after answers.

Pair scores (:func:`pair_scores`), computed with the exact token ids training uses:

``accuracy_sum``
    share of pairs where the summed log-prob of ``chosen`` beats ``rejected`` (seed 002's
    "preferred chosen in 4/4"). Biased by length: a short reply has a higher summed
    log-prob just because it has fewer tokens.
``accuracy_mean``
    the same with the mean per-token log-prob, which length does not fool.
``reward_accuracy`` (needs a reference)
    share of pairs where the policy moved ``chosen`` up more than ``rejected``, relative
    to the reference: ``(pc - rc) > (pr - rr)`` -- DPO's implicit reward, free of beta.
    This is TRL's ``rewards/accuracies``; it is 0 at step 0 (no pair is *strictly*
    better when the policy is the reference).
``reward_margin`` (needs a reference)
    mean of ``beta * ((pc - rc) - (pr - rr))``, TRL's ``rewards/margins``.

Ties count as wrong everywhere (strict ``>``), as in TRL.

Before/after answers (:func:`compare_generations`): the reference answers ("before")
next to the policy's ("after"), with their lengths and :func:`degeneration` flags, so a
model that learned the data but broke ("Deep deep Deep Deep...") shows at a glance.

:func:`run_eval` (``preftune eval``) loads the models, runs both, prints rich tables,
writes ``eval.json`` and returns the result; :func:`report_markdown` renders that result
as markdown (the trainer writes it to ``report.md``).

A result dict has these keys (each optional except ``model``)::

    model, reference, data, prompts     where things came from (paths or names)
    scores                              pair_scores(...) output
    generations                         compare_generations(...) rows
    settings                            the knobs used (max_new_tokens, beta, ...)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.errors import PreftuneError
from preftune.generation import degeneration, generate_completions, load_prompts, prompt_text
from preftune.types import PreferencePair
from preftune.util import model_device

__all__ = ["compare_generations", "load_model", "pair_scores", "print_tables", "report_markdown", "run_eval"]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def _is_reference_like(obj: Any) -> bool:
    """``modeling.Reference``: a ``.model`` and a ``.context()`` (adapter disabled)."""
    return hasattr(obj, "context") and hasattr(obj, "model") and not isinstance(obj, torch.nn.Module)


def _unwrap(obj: Any):
    """(module, context manager factory) for a model or a ``Reference``."""
    import contextlib

    if _is_reference_like(obj):
        return obj.model, obj.context
    return obj, contextlib.nullcontext


def load_model(name: str | Path, *, device: str = "auto", dtype: str = "auto", template: str | None = None,
               trust_remote_code: bool = False, load_tokenizer: bool = True):  # fmt: skip
    """(model, tokenizer, resolved path) for a model name or directory.

    Accepts what ``preftune train`` accepts (``smollm2-135m-instruct``, a directory, a hub
    id) plus a training output directory (its ``final/`` is used) and a LoRA adapter
    directory (``adapter_config.json``: loaded on its base and merged).
    """
    from preftune.config import ModelConfig
    from preftune.modeling import load_causal_lm, resolve_device, resolve_model_path, weight_dtype
    from preftune.modeling import load_tokenizer as _load_tokenizer

    path = Path(str(name)).expanduser()
    cfg = ModelConfig(dtype=dtype, template=template, trust_remote_code=trust_remote_code)
    dev = resolve_device(device)
    wdtype = weight_dtype(cfg, dev)
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "final" / "config.json").is_file():
            path = path / "final"
        elif (path / "adapter_config.json").is_file():
            return _load_adapter(path, cfg, wdtype, dev, load_tokenizer)
    resolved = resolve_model_path(str(path) if path.exists() else str(name))
    tokenizer = _load_tokenizer(cfg, resolved) if load_tokenizer else None
    model = load_causal_lm(resolved, cfg, wdtype, dev)
    model.eval()
    return model, tokenizer, resolved


def _load_adapter(path: Path, cfg, wdtype, dev, load_tokenizer: bool):
    from peft import PeftModel

    from preftune.modeling import load_causal_lm, resolve_model_path
    from preftune.modeling import load_tokenizer as _load_tokenizer

    try:
        info = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PreftuneError(f"cannot read adapter_config.json: {e}", str(path)) from None
    base_name = info.get("base_model_name_or_path")
    if not base_name:
        raise PreftuneError("adapter_config.json names no base model (base_model_name_or_path)", str(path))
    base_path = resolve_model_path(base_name)
    base = load_causal_lm(base_path, cfg, wdtype, dev)
    model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    model.eval()
    tok_dir = str(path) if (path / "tokenizer_config.json").is_file() else base_path
    tokenizer = _load_tokenizer(cfg, tok_dir) if load_tokenizer else None
    return model, tokenizer, str(path)


def _same_vocab(a: Any, b: Any) -> bool:
    try:
        return a.get_vocab() == b.get_vocab()
    except Exception:  # tokenizers without get_vocab: trust the user
        return True


# ---------------------------------------------------------------------------------------
# Pair scores
# ---------------------------------------------------------------------------------------


def _logps(model: Any, tokenized: list, pad_id: int, batch_size: int) -> tuple[list[float], ...]:
    """(chosen logp, rejected logp, chosen tokens, rejected tokens) per tokenized pair."""
    from preftune.batching import collate_padded
    from preftune.forward import forward_padded

    module, context = _unwrap(model)
    device = model_device(module)
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].prompt_ids)
                   + max(len(tokenized[i].chosen_ids), len(tokenized[i].rejected_ids)))  # fmt: skip
    out = [[0.0] * len(tokenized) for _ in range(4)]
    was_training = getattr(module, "training", False)
    module.eval()
    try:
        with torch.inference_mode(), context():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = collate_padded([tokenized[i] for i in idx], pad_id).to(device)
                fw = forward_padded(module, batch)
                values = (fw.chosen.logps, fw.rejected.logps, fw.chosen.tokens, fw.rejected.tokens)
                for k, v in enumerate(values):
                    for j, x in zip(idx, v.float().cpu().tolist()):
                        out[k][j] = x
    finally:
        if was_training:
            module.train()
    return tuple(out)


def answer_logps(model: Any, tokenizer: Any, prompts: Sequence[Any], answers: Sequence[str], *,
                 system_prompt: str | None = None, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Summed log-prob and token count of each ``answers[i]`` (with its end-of-turn token) after
    ``prompts[i]``, tokenized as training does; ``model`` as in :func:`pair_scores`."""
    from preftune.templates import tokenize_pair

    tokenized = [tokenize_pair(PreferencePair(prompt=p, chosen=a, rejected=""), tokenizer,
                               system_prompt=system_prompt, max_length=None)  # fmt: skip
                 for p, a in zip(prompts, answers)]
    missing = [i for i, t in enumerate(tokenized) if t is None]
    if missing:
        raise PreftuneError(f"answer_logps: answer {missing[0]} is empty")
    logps, _, tokens, _ = _logps(model, tokenized, tokenizer.pad_token_id, batch_size)
    return logps, tokens


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _side(pc, pr, nc, nr) -> dict[str, float]:
    n = len(pc)
    return {
        "accuracy_sum": _mean([float(c > r) for c, r in zip(pc, pr)]),
        "accuracy_mean": _mean([float(c / a > r / b) for c, r, a, b in zip(pc, pr, nc, nr)]),
        "chosen_logps": _mean(pc),
        "rejected_logps": _mean(pr),
        "chosen_logps_per_token": _mean([c / a for c, a in zip(pc, nc)]),
        "rejected_logps_per_token": _mean([r / b for r, b in zip(pr, nr)]),
        "chosen_tokens": _mean(nc),
        "rejected_tokens": _mean(nr),
        "pairs": n,
    }


def pair_scores(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    *,
    reference: Any = None,
    system_prompt: str | None = None,
    max_length: int | None = 1024,
    batch_size: int = 8,
    beta: float = 0.1,
    per_pair: bool = True,
) -> dict[str, Any]:
    """Accuracies of ``model`` (and ``reference``) on preference pairs; see the module docstring.

    ``reference`` is a model, a ``modeling.Reference`` (the LoRA policy with its adapter
    disabled), or a path / model name (loaded here; it must use the same tokenizer).
    Pairs are tokenized as training does (``system_prompt``, ``max_length``); pairs that
    training would drop (identical or too long) are counted and left out.

    Returns ``{"pairs", "scored", "dropped_identical", "dropped_truncated",
    "truncated", "policy": {...}, "reference": {...}?, "reward_accuracy"?,
    "reward_margin"?, "beta"?, "per_pair": [...]}`` where ``policy``/``reference`` hold
    ``accuracy_sum``, ``accuracy_mean``, mean log-probs and token counts.
    """
    from preftune.templates import tokenize_pairs

    if batch_size < 1:
        raise PreftuneError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(reference, (str, Path)):
        ref_model, ref_tok, _ = load_model(reference, device=str(model_device(_unwrap(model)[0])))
        if not _same_vocab(tokenizer, ref_tok):
            raise PreftuneError(f"reference '{reference}' uses a different tokenizer than the model; "
                                "log-prob comparisons need the same one")  # fmt: skip
        reference = ref_model
    tokenized, stats = tokenize_pairs(list(pairs), tokenizer, system_prompt=system_prompt, max_length=max_length)
    result: dict[str, Any] = {
        "pairs": stats.total,
        "scored": stats.kept,
        "dropped_identical": stats.dropped_identical,
        "dropped_truncated": stats.dropped_truncated,
        "truncated": stats.truncated,
    }
    if not tokenized:
        raise PreftuneError("no pair left to score (all identical or longer than max_length)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pc, pr, nc, nr = _logps(model, tokenized, pad_id, batch_size)
    result["policy"] = _side(pc, pr, nc, nr)
    rows = [
        {"source": t.source, "chosen_logps": c, "rejected_logps": r, "chosen_tokens": int(a), "rejected_tokens": int(b)}
        for t, c, r, a, b in zip(tokenized, pc, pr, nc, nr)
    ]
    if reference is not None:
        rc, rr, _, _ = _logps(reference, tokenized, pad_id, batch_size)
        result["reference"] = _side(rc, rr, nc, nr)
        chosen_rewards = [c - x for c, x in zip(pc, rc)]
        rejected_rewards = [r - x for r, x in zip(pr, rr)]
        result["reward_accuracy"] = _mean([float(c > r) for c, r in zip(chosen_rewards, rejected_rewards)])
        result["reward_margin"] = _mean([beta * (c - r) for c, r in zip(chosen_rewards, rejected_rewards)])
        result["chosen_reward"] = _mean([beta * c for c in chosen_rewards])
        result["rejected_reward"] = _mean([beta * r for r in rejected_rewards])
        result["beta"] = beta
        for row, c, r in zip(rows, rc, rr):
            row["ref_chosen_logps"], row["ref_rejected_logps"] = c, r
    if per_pair:
        result["per_pair"] = rows
    return result


# ---------------------------------------------------------------------------------------
# Before / after answers
# ---------------------------------------------------------------------------------------


def _answers(model: Any, tokenizer: Any, prompts: list, gen_kwargs: dict) -> list:
    module, context = _unwrap(model)
    with context():
        return [row[0] for row in generate_completions(module, tokenizer, prompts, **gen_kwargs)]


def compare_generations(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[Any],
                        **gen_kwargs: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Answers of ``reference`` ("before") and ``policy`` ("after") to each prompt.

    ``gen_kwargs`` go to :func:`preftune.generation.generate` (greedy by default, so the
    comparison is repeatable); ``reference`` may be ``None`` (then ``before`` is ``None``)
    or a ``modeling.Reference``. Rows: ``prompt``, ``before``, ``after``,
    ``before_tokens``, ``after_tokens``, ``before_finished``, ``after_finished``,
    ``before_flags``, ``after_flags`` (:func:`degeneration` of each).
    """
    prompts = list(prompts)
    gen_kwargs.pop("num_return_sequences", None)
    after = _answers(policy, tokenizer, prompts, gen_kwargs)
    before = _answers(reference, tokenizer, prompts, gen_kwargs) if reference is not None else [None] * len(prompts)
    rows = []
    for prompt, b, a in zip(prompts, before, after):
        rows.append(
            {
                "prompt": prompt,
                "before": None if b is None else b.text,
                "after": a.text,
                "before_tokens": None if b is None else b.tokens,
                "after_tokens": a.tokens,
                "before_finished": None if b is None else b.finished,
                "after_finished": a.finished,
                "before_flags": None if b is None else degeneration(b.text),
                "after_flags": degeneration(a.text),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------

_METRICS = (
    ("accuracy_sum", "accuracy (summed log-prob)"),
    ("accuracy_mean", "accuracy (mean log-prob per token)"),
    ("chosen_logps", "chosen log-prob (mean)"),
    ("rejected_logps", "rejected log-prob (mean)"),
    ("chosen_logps_per_token", "chosen log-prob per token"),
    ("rejected_logps_per_token", "rejected log-prob per token"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}"
    return str(value)


def _score_rows(scores: dict[str, Any]) -> list[tuple[str, str, str]]:
    pol, ref = scores.get("policy", {}), scores.get("reference")
    rows = [(label, _fmt(pol.get(key)), _fmt(ref.get(key)) if ref else "-") for key, label in _METRICS]
    if "reward_accuracy" in scores:
        rows.append(("implicit reward accuracy", _fmt(scores["reward_accuracy"]), ""))
        rows.append((f"reward margin (beta={scores.get('beta')})", _fmt(scores["reward_margin"]), ""))
    return rows


def _flag_text(flags: dict[str, Any] | None) -> str:
    if not flags:
        return ""
    names = [k for k in ("empty", "runaway", "repeated_ngrams") if flags.get(k)]
    return ", ".join(names)


def _prompt_str(prompt: Any) -> str:
    return prompt_text(prompt) if not isinstance(prompt, str) else prompt


def _md_cell(text: Any) -> str:
    if text is None:
        return "-"
    s = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
    return s or " "


def report_markdown(result: dict[str, Any]) -> str:
    """Markdown: where the numbers come from, the accuracy table, and the before/after
    answers with degeneration warnings."""
    lines = ["# Evaluation", ""]
    model, ref = result.get("model"), result.get("reference")
    lines.append(f"- model: `{model}`" if model else "- model: (in memory)")
    if ref:
        lines.append(f"- reference: `{ref}`")
    if result.get("data"):
        lines.append(f"- pairs: `{result['data']}`")
    if result.get("prompts"):
        lines.append(f"- prompts: `{result['prompts']}`")
    scores = result.get("scores")
    if scores:
        lines += ["", "## Pair accuracy", ""]
        lines.append(
            f"{scores.get('scored')} of {scores.get('pairs')} pairs scored"
            + (f" ({scores['dropped_identical']} identical and {scores['dropped_truncated']} too long left out)"
               if scores.get("dropped_identical") or scores.get("dropped_truncated") else "")  # fmt: skip
            + ". Summed log-prob favours short replies; the per-token mean does not."
        )
        lines += ["", "| metric | model | reference |", "|---|---:|---:|"]
        for label, a, b in _score_rows(scores):
            lines.append(f"| {label} | {a} | {b or ' '} |")
    gens = result.get("generations")
    if gens:
        lines += ["", "## Before / after", ""]
        lines += ["| prompt | before (reference) | after (model) |", "|---|---|---|"]
        warned = 0
        for row in gens:
            before, after = row.get("before"), row.get("after")
            bflag, aflag = _flag_text(row.get("before_flags")), _flag_text(row.get("after_flags"))
            warned += bool(aflag)
            b_cell = _md_cell(before) + (f" **[{bflag}]**" if bflag else "")
            a_cell = _md_cell(after) + (f" **[{aflag}]**" if aflag else "")
            lines.append(f"| {_md_cell(_prompt_str(row.get('prompt')))} | {b_cell} | {a_cell} |")
        if warned:
            lines += [
                "",
                f"**Warning:** {warned} of {len(gens)} answers after training look degenerate "
                "(empty, runaway repetition or looping phrases). Lower the learning rate or raise beta.",
            ]
    return "\n".join(lines) + "\n"


def print_tables(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    scores = result.get("scores")
    if scores:
        table = Table(title=f"pair accuracy ({scores['scored']} of {scores['pairs']} pairs)")
        table.add_column("metric")
        table.add_column("model", justify="right")
        table.add_column("reference", justify="right")
        for label, a, b in _score_rows(scores):
            table.add_row(label, a, b)
        console.print(table)
    gens = result.get("generations")
    if gens:
        has_before = any(row.get("before") is not None for row in gens)
        table = Table(title="answers", show_lines=True)
        table.add_column("prompt", ratio=1)
        if has_before:
            table.add_column("before (reference)", ratio=2)
        table.add_column("after (model)", ratio=2)
        for row in gens:
            cells = [Text(_prompt_str(row["prompt"]))]
            sides = [("before", "before_flags")] if has_before else []
            sides.append(("after", "after_flags"))
            for key, flags in sides:
                cell = Text(row.get(key) or "")
                flag = _flag_text(row.get(flags))
                if flag:
                    cell.append(f"\n[{flag}]", style="bold red")
                cells.append(cell)
            table.add_row(*cells)
        console.print(table)


def run_eval(
    model_path: str | Path,
    data_path: str | Path | None = None,
    reference_path: str | Path | None = None,
    prompts_path: str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    max_new_tokens: int = 128,
    system_prompt: str | None = None,
    beta: float = 0.1,
    batch_size: int = 8,
    max_length: int | None = 1024,
    data_format: str = "auto",
    device: str = "auto",
    template: str | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """``preftune eval``: pair scores on ``data_path`` and before/after answers to
    ``prompts_path``; prints tables, writes ``output_dir/eval.json``, returns the result.

    ``reference_path`` is the "before" model (e.g. the base the policy was trained
    from); without it only the model's own numbers and answers are shown.
    """
    from rich.console import Console

    from preftune.data import load_pairs

    if data_path is None and prompts_path is None:
        raise PreftuneError("nothing to evaluate: give pairs (--data) and/or prompts (--prompts)")
    if max_new_tokens < 1:
        raise PreftuneError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    console = console or Console()
    # user mistakes in the inputs surface before any model is loaded
    pairs = load_pairs(data_path, data_format) if data_path is not None else None
    prompts = load_prompts(prompts_path) if prompts_path is not None else None
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise PreftuneError("output is not a directory", str(output_dir))

    model, tokenizer, resolved = load_model(model_path, device=device, template=template)
    reference = None
    ref_resolved = None
    if reference_path is not None:
        reference, ref_tok, ref_resolved = load_model(reference_path, device=device, template=template)
        if not _same_vocab(tokenizer, ref_tok):
            raise PreftuneError(f"reference '{reference_path}' uses a different tokenizer than the model")

    result: dict[str, Any] = {
        "model": str(model_path),
        "model_path": resolved,
        "reference": None if reference_path is None else str(reference_path),
        "reference_path": ref_resolved,
        "data": None if data_path is None else str(data_path),
        "prompts": None if prompts_path is None else str(prompts_path),
        "settings": {
            "max_new_tokens": max_new_tokens,
            "system_prompt": system_prompt,
            "beta": beta,
            "max_length": max_length,
            "batch_size": batch_size,
            "decoding": "greedy",
        },
    }
    if pairs is not None:
        result["scores"] = pair_scores(model, tokenizer, pairs, reference=reference, system_prompt=system_prompt,
                                       max_length=max_length, batch_size=batch_size, beta=beta)  # fmt: skip
    if prompts is not None:
        result["generations"] = compare_generations(model, reference, tokenizer, prompts, system_prompt=system_prompt,
                                                    max_new_tokens=max_new_tokens, batch_size=batch_size)  # fmt: skip
    print_tables(result, console)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        console.print(f"wrote {(out / 'eval.json').as_posix()}")
    return result
