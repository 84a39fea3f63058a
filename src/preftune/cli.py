"""The ``preftune`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from preftune.config import describe_keys
from preftune.errors import PreftuneError

app = typer.Typer(
    help="Preference tuning (DPO and relatives): correct, fast, honest about results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TRAIN_HELP = (
    "Train with DPO from CONFIG (YAML; preftune, TRL or LLaMA-Factory keys), overriding keys with KEY=VALUE.\n\n"
    "Keys:\n\n" + describe_keys().replace("\n", "\n\n")
)


@app.command("train", help=TRAIN_HELP)
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides."),
) -> None:
    from preftune.training import train

    summary = train(config, overrides or [])
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


def main() -> None:
    try:
        app()
    except PreftuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
