"""What a run shows: progress bar, log files, curves and the summary."""

from __future__ import annotations

import csv
import json
import platform
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

import preftune
from preftune import hardware
from preftune.util import atomic_write, atomic_write_text

console = Console(stderr=True)


class Progress:
    """Rich progress bar showing loss, margin and ETA; silent when disabled."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled = enabled
        self.bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  margin {task.fields[margin]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", margin="-", acc="-")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, step: int, row: dict[str, Any] | None) -> None:
        fields = {}
        if row is not None:
            fields = dict(
                loss=f"{row['loss']:.4f}",
                margin=f"{row['rewards/margins']:.3f}",
                acc=f"{row['rewards/accuracies']:.2f}",
            )
        self.bar.update(self.task, completed=step, **fields)
        if row is not None and self.enabled and not self.bar.console.is_terminal:
            # no live bar in a log file: one line per logged step instead
            self.bar.console.print(
                f"step {step}/{self.bar.tasks[0].total}: loss {fields['loss']}  margin {fields['margin']}  "
                f"accuracy {fields['acc']}",
                highlight=False,
            )

    def warn(self, message: str) -> None:
        print_warning(message, self.bar.console)

    def print_eval(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.bar.console.print(
                f"eval step {row['step']}: loss {row['eval_loss']:.4f}  "
                f"margin {row['eval_rewards/margins']:.3f}  accuracy {row['eval_rewards/accuracies']:.3f}"
            )


@contextmanager
def quiet_libraries():
    """Our progress bar and one-line errors are the output: inside, the libraries' bars, messages and
    deprecation notes are silenced; afterwards transformers' verbosity and progress bars and the
    warning filters are the caller's again."""
    import transformers

    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        logging.disable_progress_bar()
        logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        try:
            yield
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


def print_data_stats(stats: dict[str, dict[str, int]], special_tokens_in_text: str = "literal") -> None:
    tr, ev = stats["train"], stats["eval"]
    line = (
        f"data: {tr['kept']} training pairs of {tr['total']} ({tr['truncated']} truncated, "
        f"{tr['dropped_truncated']} dropped by truncation, {tr['dropped_identical']} dropped as chosen == rejected)"
    )
    if ev["total"]:
        line += f"; {ev['kept']} eval pairs of {ev['total']}"
    console.print(line, highlight=False, soft_wrap=True)
    spelled = tr.get("special_tokens_in_text", 0) + ev.get("special_tokens_in_text", 0)
    if spelled:
        print_warning(special_tokens_line(spelled, special_tokens_in_text))


def special_tokens_line(pairs: int, mode: str) -> str:
    """The data warning for pairs whose text spells a special token (``special_tokens_in_text``)."""
    how = {"literal": "tokenized as plain text", "parse": "read as control tokens (special_tokens_in_text: parse)"}
    subject = "1 pair spells" if pairs == 1 else f"{pairs} pairs spell"
    their = "its" if pairs == 1 else "their"
    return f"{subject} a special token (such as <|im_end|>) in {their} text: {how.get(mode, mode)}"


def print_warning(message: str, to: Console = console) -> None:
    """One ``warning:`` line; the message is shown as written (brackets are not read as markup)."""
    to.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def print_precision(precision: hardware.Precision) -> None:
    """The line after the data line: which precision the run computes in and why; a warning when
    that is slow on this machine."""
    console.print(f"precision: {precision.name} ({precision.reason})", highlight=False, markup=False, soft_wrap=True)
    if precision.warning:
        print_warning(precision.warning)


def precision_record(precision: hardware.Precision) -> dict[str, Any]:
    """summary.json's account of the precision decision and the CPU it was made on."""
    cpu = precision.cpu
    return {"name": precision.name, "reason": precision.reason, "warning": precision.warning,
            "cpu": {"model": cpu.model, "native_bf16": cpu.native_bf16, "flags": " ".join(sorted(cpu.flags))}}


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "preftune": preftune.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def build_summary(cfg, log_history, data_stats, *, runtime, train_seconds, tokens_seen, peak_rss_mb,
                  peak_gpu_mb, total_steps, device, reference_mode) -> dict[str, Any]:  # fmt: skip
    train_rows = [r for r in log_history if "loss" in r]
    eval_rows = [r for r in log_history if "eval_loss" in r]
    final = dict(train_rows[-1]) if train_rows else {}
    if eval_rows:
        final.update({k: v for k, v in eval_rows[-1].items() if k.startswith("eval_")})
    ts = data_stats["train"]
    return {
        "final_metrics": final,
        "steps": total_steps,
        "runtime_seconds": round(runtime, 2),
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_gpu_memory_mb": None if peak_gpu_mb is None else round(peak_gpu_mb, 1),
        "pairs": {
            "train_loaded": ts["total"],
            "train_used": ts["kept"],
            "train_truncated": ts["truncated"],
            "train_dropped_truncated": ts["dropped_truncated"],
            "train_dropped_identical": ts["dropped_identical"],
            "train_special_tokens_in_text": ts.get("special_tokens_in_text", 0),
            "eval_used": data_stats["eval"]["kept"],
        },
        "output_dir": cfg.training.output_dir,
        "model": cfg.model.model_name_or_path,
        "finetuning_type": cfg.model.finetuning_type,
        "loss_type": cfg.loss.loss_type,
        "device": device,
        "reference": reference_mode,
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_reports(out: Path, log_history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    atomic_write_text(out / "log_history.json", json.dumps(log_history, indent=1))
    write_csv(out / "training_metrics.csv", log_history)
    plot_curves(out / "training_curves.png", log_history)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))  # last: the mark of a finished run


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = ["step", "epoch"]
    for row in rows:
        columns += [k for k in row if k not in columns]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


PANELS = [
    ("loss", ["loss"], "loss"),
    ("rewards", ["rewards/chosen", "rewards/rejected"], "implicit reward"),
    ("margins", ["rewards/margins"], "reward margin"),
    ("accuracies", ["rewards/accuracies"], "pair accuracy"),
]


def plot_curves(path: Path, rows: list[dict[str, Any]]) -> None:
    # a Figure of its own, drawn by the Agg canvas: no pyplot, so the caller's backend and figures stay as they are
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2)
    for ax, (title, keys, ylabel) in zip(axes.flat, PANELS):
        for key in keys:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                pts = [(r["step"], r[prefix + key]) for r in rows if prefix + key in r]
                if pts:
                    xs, ys = zip(*pts)
                    label = ("eval " if prefix else "train ") + key.split("/")[-1]
                    ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("preftune training curves")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
