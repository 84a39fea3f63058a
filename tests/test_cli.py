"""End to end through the `preftune` command, as a user runs it."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parent.parent


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def write_run(tmp_path, model_dir, **extra):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": f"What is the capital of Spain? ({i})", "chosen": "Madrid.", "rejected": "Paris."})
            for i in range(6)
        )
        + "\n"
    )
    cfg = {
        "model_name_or_path": model_dir,
        "train_file": "pairs.jsonl",
        "eval_split": 0.34,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_writes_every_artifact(tiny_model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("Who are you?\nWhat is the capital of Spain?\n")
    config = write_run(tmp_path, tiny_model_dir, eval_prompts="prompts.txt", eval_max_new_tokens=8)
    result = run_cli("train", str(config), "beta=0.2")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["beta"] == 0.2 and saved["train_file"].endswith("pairs.jsonl")
    history = json.loads((out / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in history if "eval_loss" in r] == [2, 4]
    with open(out / "training_metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(history) and "rewards/margins" in table[0] and "eval_rewards/margins" in table[0]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_metrics", "runtime_seconds", "tokens_per_second", "peak_rss_mb", "pairs", "versions"):
        assert summary[key] is not None, key
    assert summary["pairs"]["train_used"] == 4 and summary["pairs"]["eval_used"] == 2
    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert (out / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not list(out.glob(".*tmp"))
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["scores"]["policy"]) >= {"accuracy_sum", "accuracy_mean"}
    assert [row["prompt"] for row in evaluation["generations"]] == ["Who are you?", "What is the capital of Spain?"]
    report = (out / "report.md").read_text()
    assert "Who are you?" in report and "accuracy" in report

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.chat_template is not None
    assert (out / "final" / "model.safetensors").is_file()
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged


def test_second_run_into_finished_dir_refuses(tiny_model_dir, tmp_path):
    config = write_run(tmp_path, tiny_model_dir, max_steps=1, eval_steps=None, save_steps=None)
    assert run_cli("train", str(config)).returncode == 0
    again = run_cli("train", str(config))
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"betta": 0.1}, "unknown key 'betta'; did you mean 'beta'?"),
        ({"train_file": "missing.jsonl"}, "missing.jsonl"),
        ({"loss_type": "dpo"}, "unknown loss_type 'dpo'"),
        ({"model_name_or_path": "./no/such/model"}, "not found"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(tiny_model_dir, tmp_path, extra, expected):
    config = write_run(tmp_path, tiny_model_dir, **extra)
    result = run_cli("train", str(config))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_data_line_is_named(tiny_model_dir, tmp_path):
    config = write_run(tmp_path, tiny_model_dir)
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write('{"prompt": "x", "chosen": "y"}\n')
    result = run_cli("train", str(config))
    assert result.returncode == 2
    assert "pairs.jsonl:7" in result.stderr and "rejected" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_help_lists_every_key():
    from preftune.config import TrainConfig

    result = run_cli("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for key in TrainConfig().to_flat():
        assert key in text, key


def test_help_shows_bracketed_text():
    """rich reads "[sigmoid, sft]" in a help string as a markup tag and drops it ("RPO = ."): it must show."""
    import re

    from preftune.config import describe_keys

    bracketed = [" ".join(b.split()) for b in re.findall(r"\[[^\]]*\]", describe_keys())]
    assert "[sigmoid, sft]" in bracketed
    result = run_cli("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "RPO = [sigmoid, sft]" in text
    for item in bracketed:
        assert item in text, item
