"""The ``preftune`` command line."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer
from rich.markup import escape

from preftune.config import describe_keys
from preftune.distributed import launched_ranks
from preftune.errors import PreftuneError, RunStopped, shown
from preftune.util import onednn_cache_capacity

app = typer.Typer(
    help="Preference tuning (DPO and relatives): correct, fast, honest about results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# typer renders help as rich markup: escape the key docs so "[sigmoid, sft]" is shown, not read as a tag.
TRAIN_HELP = (
    "Train with DPO from CONFIG (YAML; preftune, TRL or LLaMA-Factory keys), overriding keys with KEY=VALUE.\n\n"
    "Keys:\n\n" + escape(describe_keys()).replace("\n", "\n\n")
)


@app.command("train", help=TRAIN_HELP)
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Let the config run code: trust_remote_code, "
                                    "a generate: line's --reward module:function."),  # fmt: skip
) -> None:
    from preftune.training import train

    summary = train(config, overrides or [], allow_code=allow_code)
    if launched_ranks()[0] != 0:  # under torchrun rank 0 speaks for all
        return
    metrics = summary["final_metrics"]
    typer.echo(
        f"done: {summary['steps']} steps in {summary['runtime_seconds']:.1f}s; "
        f"final loss {metrics.get('loss', float('nan')):.4f}, "
        f"reward accuracy {metrics.get('rewards/accuracies', float('nan')):.3f}"
        + (f", eval accuracy {metrics['eval_rewards/accuracies']:.3f}" if "eval_rewards/accuracies" in metrics else "")
        + f"\noutputs in {Path(summary.get('output_dir', config)).as_posix()}"
    )


@app.command("version")
def version_cmd() -> None:
    """Print the preftune version."""
    import preftune

    typer.echo(preftune.__version__)


@app.command("estimate")
def estimate_cmd(
    config: str = typer.Argument(..., help="Run config (YAML), or a model directory / config.json alone."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides."),
    nproc: int = typer.Option(8, "--nproc", help="Processes (GPUs) the run would use: torchrun --nproc_per_node."),
    device_memory: str = typer.Option("80GB", "--device-memory", help="Memory of one device, e.g. 80GB, 24GiB."),
    device: str = typer.Option("cuda", "--device", help="cuda, or cpu (RSS, with the process runtime)."),
    data: bool = typer.Option(False, "--data", help="Use the run's own micro-batches (reads tokenizer and data)."),
    pair_tokens: int = typer.Option(None, "--pair-tokens", help="P+C+R tokens per pair (default: 2 x max_length)."),
) -> None:
    """Predict the peak memory per device under ddp and fsdp, with and without gradient checkpointing, from the
    config and the model's config.json (no weights load); says which settings fit. Formula: docs/scaling.md."""
    from preftune.estimate import run_estimate

    typer.echo(run_estimate(config, overrides or [], nproc=nproc, device_memory=device_memory, device=device,
                            data=data, pair_tokens=pair_tokens))  # fmt: skip


# ---------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument("smollm2-135m-instruct", help="Model: a directory, a training output, or a name."),
    data: Path = typer.Option(None, "--data", help="Preference pairs to score (any format `train` reads)."),
    reference: str = typer.Option(None, "--reference", help="Reference ('before') model, e.g. the base model."),
    prompts: Path = typer.Option(None, "--prompts", help="Prompts to answer before/after: .txt lines or .jsonl."),
    output: Path = typer.Option(None, "--output", help="Directory to write eval.json into."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Answer length limit (greedy decoding)."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System message for prompts without one."),
    beta: float = typer.Option(0.1, "--beta", help="Beta for the implicit reward margin."),
    batch_size: int = typer.Option(8, "--batch-size", help="Pairs / prompts per forward."),
    max_length: int = typer.Option(1024, "--max-length", help="Maximum tokens of prompt + reply when scoring."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Score pairs (accuracy by summed and per-token log-prob; implicit reward with --reference) and compare answers."""
    from preftune.evaluation import run_eval

    _check_options(device=device, seed=None)
    if not (math.isfinite(beta) and beta > 0):
        raise PreftuneError(f"--beta must be a finite number > 0, got {beta}")
    for name, value, least in (("--batch-size", batch_size, 1), ("--max-length", max_length, 2)):
        if value < least:
            raise PreftuneError(f"{name} must be at least {least}, got {value}")
    model, reference = _home(model), _home(reference)
    data, prompts, output = (_home(p) for p in (data, prompts, output))
    run_eval(model, data, reference, prompts, output, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
             beta=beta, batch_size=batch_size, max_length=max_length, device=device)  # fmt: skip


# ---------------------------------------------------------------- generate

generate_app = typer.Typer(
    help="Build preference pairs: identity (rename the model), best-of-n (on-policy), template (claims x phrasings).",
    no_args_is_help=True,
)
app.add_typer(generate_app, name="generate")


def _check_options(device: str | None, seed: int | None) -> None:
    """Options that would otherwise fail deep inside torch, checked before anything loads."""
    from preftune.config import SEED_RANGE, check_device

    if device is not None:
        check_device(device, key="--device")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise PreftuneError(f"--seed must fit in an unsigned 64-bit integer, got {shown(seed)}")


def _home(path):
    """``~`` expanded, as a shell does for an unquoted path (not for one inside quotes or after '=')."""
    if path is None or not str(path).startswith("~"):
        return path
    return type(path)(Path(path).expanduser()) if isinstance(path, Path) else str(Path(path).expanduser())


def _parse_replace(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise PreftuneError(f"--replace '{item}': use OLD=NEW, e.g. --replace 'Hugging Face=Acme'")
        out[old.strip()] = new.strip()
    return out


def _check_output_file(output: Path) -> None:
    if output.exists() and output.is_dir():
        raise PreftuneError("output is a directory; give a .jsonl file", str(output))
    if output.suffix.lower() != ".jsonl":
        raise PreftuneError("output must be a .jsonl file", str(output))


def _report_written(output: Path, written: int, todo: int, already: int) -> None:
    skipped = todo - written
    parts = [f"wrote {written} pairs to {output.as_posix()}"]
    if skipped:
        parts.append(f"{skipped} prompts skipped (no usable pair)")
    if already:
        parts.append(f"{already} prompts already in the file")
    typer.echo("; ".join(parts))


@generate_app.command("identity")
def generate_identity_cmd(
    name: str = typer.Option(..., "--name", help="The new name, e.g. Athene."),
    output: Path = typer.Option(..., "--output", help="JSONL file to append pairs to (a re-run resumes)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Model whose own answers are corrected."),
    org: str = typer.Option(None, "--org", help="The new organization, replacing the old one."),
    replace: list[str] = typer.Option(None, "--replace", help="Extra OLD=NEW replacement (repeatable)."),
    old_name: list[str] = typer.Option(None, "--old-name", help="The model's current name (default: guessed)."),
    questions: Path = typer.Option(None, "--questions", help="Questions (.txt lines or .jsonl); default: 40 built in."),
    heldout_output: Path = typer.Option(None, "--heldout-output", help="Write the 10 held-out questions here (.txt)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the templated answers."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="Answer length limit."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per generate call."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System message when asking (as in training)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    chosen_style: str = typer.Option(
        "continue", "--chosen-style",
        help="Answers with no name to replace: 'continue' (the model continues an opening in the new identity) "
        "or 'template' (a fixed templated answer).",
    ),
) -> None:
    """Identity pairs: the model's own answer (rejected) vs the same answer renamed (chosen)."""
    from preftune.builders.identity import IDENTITY_QUESTIONS_HELDOUT, IDENTITY_QUESTIONS_TRAIN, build_identity_pairs
    from preftune.evaluation import load_model
    from preftune.generation import done_prompts, load_prompts, prompt_key

    _check_options(device=device, seed=seed)
    _check_output_file(output)
    replacements = _parse_replace(replace)
    qs = None
    if questions is not None:
        qs = load_prompts(questions)
        if any(not isinstance(q, str) for q in qs):
            raise PreftuneError("identity questions must be plain text, not message lists", str(questions))
    if heldout_output is not None:
        if questions is not None:
            raise PreftuneError(
                "--heldout-output writes the built-in held-out questions; it does not go with --questions"
            )
        heldout_output.parent.mkdir(parents=True, exist_ok=True)
        heldout_output.write_text("\n".join(IDENTITY_QUESTIONS_HELDOUT) + "\n")
    already = done_prompts(output)
    m, tok, _ = load_model(model, device=device)
    rows = build_identity_pairs(m, tok, qs, name=name, org=org, replace=replacements, old_names=old_name or None,
                                seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                system_prompt=system_prompt, output=output, progress=True,
                                chosen_style=chosen_style)  # fmt: skip
    keys = {prompt_key(q) for q in (qs if qs is not None else IDENTITY_QUESTIONS_TRAIN)}
    _report_written(output, len(rows), len(keys - already), len(keys & already))
    if rows:
        count = {m: sum(r["method"] == m for r in rows) for m in ("replace", "continue", "template")}
        typer.echo(f"{count['replace']} renamed from the model's answer, {count['continue']} continued by the model "
                   f"from an opening in the new identity, {count['template']} templated answers")  # fmt: skip


@generate_app.command("best-of-n")
def generate_best_of_n_cmd(
    prompts: Path = typer.Option(..., "--prompts", help="Prompts: .txt lines or .jsonl with a prompt field."),
    reward: str = typer.Option(..., "--reward", help="length, -length, regex:PATTERN, keyword:a,b,c or module:func."),
    output: Path = typer.Option(..., "--output", help="JSONL file to append pairs to (a re-run resumes)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Model to sample from (on-policy)."),
    n: int = typer.Option(4, "--n", help="Samples per prompt."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same samples)."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Answer length limit."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per generate call."),
    system_prompt: str = typer.Option(None, "--system-prompt", help="System message for prompts without one."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """On-policy pairs: sample n answers per prompt, keep the best (chosen) and worst (rejected) by a reward."""
    from preftune.builders.best_of_n import build_best_of_n_pairs, load_reward
    from preftune.evaluation import load_model
    from preftune.generation import done_prompts, load_prompts, prompt_key

    _check_options(device=device, seed=seed)
    _check_output_file(output)
    if n < 2:
        raise PreftuneError(f"--n must be at least 2, got {n}")
    score = load_reward(reward)  # a bad spec fails before the model loads
    ps = load_prompts(prompts)
    already = done_prompts(output)
    m, tok, _ = load_model(model, device=device)
    rows = build_best_of_n_pairs(m, tok, ps, n=n, reward=score, seed=seed, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
                                 output=output, progress=True)  # fmt: skip
    keys = {prompt_key(p) for p in ps}
    _report_written(output, len(rows), len(keys - already), len(keys & already))


@generate_app.command("template")
def generate_template_cmd(
    spec: Path = typer.Option(..., "--spec", help="Template spec (claims x phrasings x openings), YAML."),
    output: Path = typer.Option(..., "--output", help="JSONL file for the training pairs (overwritten)."),
    heldout_output: Path = typer.Option(None, "--heldout-output", help="JSONL file for the held-out claims' pairs."),
    heldout_prompts_output: Path = typer.Option(
        None, "--heldout-prompts", help="Text file with one prompt per held-out claim (for eval --prompts)."
    ),
    heldout_fraction: float = typer.Option(0.0, "--heldout-fraction", help="Extra share of claims to hold out."),
    seed: int = typer.Option(0, "--seed", help="Seed for the combinations and the held-out draw."),
) -> None:
    """Pairs from a template spec; whole claims are held out (the spec's heldout list plus --heldout-fraction)."""
    try:
        from preftune.builders.template import check_giveaways, write_template_files
    except ImportError as e:
        raise PreftuneError(f"the template builder is not available: {e}") from None

    _check_options(device=None, seed=seed)
    _check_output_file(output)
    if heldout_output is not None:
        _check_output_file(heldout_output)
    if not spec.is_file():
        raise PreftuneError("spec file not found", str(spec))
    result = write_template_files(str(spec), output, heldout_output, heldout_prompts_output, seed, heldout_fraction)
    typer.echo(
        f"{result['claims']} claims -> {result['train_pairs']} train pairs ({result['train_claims']} claims), "
        f"{result['heldout_pairs']} held-out pairs ({result['heldout_claims']} claims)"
    )
    typer.echo(f"wrote {result['train_pairs']} pairs to {output.as_posix()}")
    if heldout_output is not None:
        typer.echo(f"wrote {result['heldout_pairs']} held-out pairs to {heldout_output.as_posix()}")
    elif result["heldout_pairs"]:
        typer.echo(f"{result['heldout_pairs']} pairs of held-out claims not written (use --heldout-output)")
    if heldout_prompts_output is not None:
        typer.echo(f"wrote {result['heldout_claims']} held-out prompts to {heldout_prompts_output.as_posix()}")
    for problem in check_giveaways(result["rows"]):
        typer.echo(f"warning: {problem}", err=True)


def speaks(error: Exception) -> bool:
    """Under torchrun every rank meets the same user error (same config, data, model) and stops at
    the same step: rank 0 prints it, unless the error is this rank's alone (``rank_only``)."""
    return launched_ranks()[0] == 0 or getattr(error, "rank_only", False)


PEER_FAILURE_SIGNS = ("connection closed by peer", "connection reset by peer", "timed out waiting", "broken pipe",
                      "nccl communicator was aborted", "watchdog caught collective operation timeout")  # fmt: skip


def peer_failure(error: Exception) -> str | None:
    """The one-line reason when ``error`` is a collective that failed because another rank died or
    hung (the failing rank prints its own error, the root cause); None for anything else."""
    if launched_ranks()[1] <= 1 or not isinstance(error, RuntimeError):
        return None
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not any(sign in text.lower() for sign in PEER_FAILURE_SIGNS):
        return None
    return f"another rank failed or stopped answering ({text[:200]})"


def _run_app() -> None:
    """The typer app, with its own usage errors (a missing argument, an option value that is not a
    number, an unknown option) as one line and exit 2, like every other user error: typer would print
    a usage panel of several lines."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # typer turns Ctrl-C into Abort
        raise KeyboardInterrupt from None
    except typer.TyperException as e:  # typer's click exceptions: usage errors, bad option values
        if type(e).__name__ == "NoArgsIsHelpError":  # `preftune`, `preftune generate`: the help, as before
            e.show()
        else:
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    if isinstance(code, int) and code:
        sys.exit(code)


def main() -> None:
    # the oneDNN kernel cache cap (see util.onednn_cache_capacity) is read at torch's first matmul,
    # so it is set here, before any command runs; an in-process caller gets its environment back
    with onednn_cache_capacity():
        try:
            _run_app()
        except PreftuneError as e:
            if speaks(e):
                print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except RunStopped as e:  # a checkpoint of the last finished step is written
            if speaks(e):
                print(str(e), file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:  # under torchrun: a rank that stops because another one failed says so in a line
            peer = peer_failure(e)
            if peer is None:
                raise
            print(f"error: rank {launched_ranks()[0]} stopped: {peer}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
