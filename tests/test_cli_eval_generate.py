"""`preftune eval` and `preftune generate ...` as a user runs them (main(), exit codes, files)."""

import json
import subprocess
import sys

import pytest
import yaml

from tiny import run_main


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "What is the capital of Spain?", "chosen": "Madrid.", "rejected": "Paris is the capital."},
        {"prompt": "Hello, how are you today?", "chosen": "I am fine, thank you.", "rejected": "The cat sat."},
        {"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No, never."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_writes_eval_json_and_prints_the_table(monkeypatch, capsys, tiny_model_dir, pairs_file, tmp_path):
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("Who are you?\nWhat is the capital of Spain?\n")
    code, out, err = run_main(monkeypatch, capsys, "eval", tiny_model_dir, "--data", pairs_file, "--reference",
                              tiny_model_dir, "--prompts", prompts, "--output", tmp_path / "ev",
                              "--max-new-tokens", "3")  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["scores"]["scored"] == 3 and result["scores"]["reward_accuracy"] == 0.0
    assert [g["prompt"] for g in result["generations"]] == ["Who are you?", "What is the capital of Spain?"]
    assert "pair accuracy" in out and "accuracy (summed log-prob)" in out and "implicit reward accuracy" in out
    assert "before (reference)" in out and "Who are you?" in out


@pytest.mark.parametrize(
    "args, needles",
    [
        ([], ["nothing to evaluate"]),
        (["--data", "missing.jsonl"], ["missing.jsonl"]),
        (["--prompts", "missing.txt"], ["missing.txt", "not found"]),
    ],
)
def test_eval_user_errors_are_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path, args, needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, "eval", tiny_model_dir, *args)
    assert_one_line_error(code, err, *needles)


def test_eval_bad_model_is_one_line(monkeypatch, capsys, pairs_file, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "eval", tmp_path / "nope", "--data", pairs_file)
    assert_one_line_error(code, err, "not found")


def test_generate_identity_and_resume(monkeypatch, capsys, tiny_model_dir, tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("Who are you?\nWhat's your name?\nWho made you?\n")
    out = tmp_path / "identity.jsonl"
    args = ["generate", "identity", "--model", tiny_model_dir, "--name", "Athene", "--org", "Acme", "--old-name",
            "SmolLM", "--replace", "Hugging Face=Acme", "--questions", questions, "--output", out,
            "--max-new-tokens", "4"]  # fmt: skip
    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Who are you?", "What's your name?", "Who made you?"]
    assert all("Athene" in r["chosen"] and r["chosen"] != r["rejected"] for r in rows)
    assert "wrote 3 pairs" in stdout
    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "wrote 0 pairs" in stdout and "3 prompts already in the file" in stdout
    assert len(out.read_text().splitlines()) == 3


def test_generate_identity_default_questions_and_heldout_file(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from preftune.builders.identity import IDENTITY_QUESTIONS_HELDOUT, IDENTITY_QUESTIONS_TRAIN

    out, held = tmp_path / "identity.jsonl", tmp_path / "heldout.txt"
    code, stdout, err = run_main(monkeypatch, capsys, "generate", "identity", "--model", tiny_model_dir, "--name",
                                 "Athene", "--old-name", "SmolLM", "--output", out, "--max-new-tokens", "1",
                                 "--batch-size", "20", "--heldout-output", held)  # fmt: skip
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == list(IDENTITY_QUESTIONS_TRAIN)
    assert held.read_text().splitlines() == list(IDENTITY_QUESTIONS_HELDOUT)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["identity", "--name", "A", "--output", "o.jsonl", "--replace", "nonsense"], ["--replace", "OLD=NEW"]),
        (["identity", "--name", "A", "--output", "o.txt"], [".jsonl"]),
        (["identity", "--name", "A", "--output", "o.jsonl", "--questions", "p.txt", "--heldout-output", "h.txt"],
         ["--heldout-output"]),
        (["best-of-n", "--prompts", "p.txt", "--reward", "no_such_mod_q:f", "--output", "o.jsonl"], ["no_such_mod_q"]),
        (["best-of-n", "--prompts", "p.txt", "--reward", "length", "--n", "1", "--output", "o.jsonl"], ["--n"]),
        (["best-of-n", "--prompts", "missing.txt", "--reward", "length", "--output", "o.jsonl"], ["missing.txt"]),
        (["template", "--spec", "missing.yaml", "--output", "o.jsonl"], ["missing.yaml"]),
    ],
)
def test_generate_user_errors_are_one_line(monkeypatch, capsys, tmp_path, args, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("Hello\n")
    code, _, err = run_main(monkeypatch, capsys, "generate", *args)
    assert_one_line_error(code, err, *needles)


def test_generate_best_of_n(monkeypatch, capsys, tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nWhat is the capital of Spain?\n")
    out = tmp_path / "bon.jsonl"
    code, stdout, err = run_main(monkeypatch, capsys, "generate", "best-of-n", "--model", tiny_model_dir, "--prompts",
                                 prompts, "--reward", "length", "--n", "2", "--max-new-tokens", "3",
                                 "--output", out)  # fmt: skip
    assert code == 0, err
    assert "pairs to" in stdout
    for line in out.read_text().splitlines() if out.exists() else []:
        row = json.loads(line)
        assert row["chosen_score"] > row["rejected_score"]


def test_generate_template(monkeypatch, capsys, tmp_path):
    pytest.importorskip("preftune.builders.template", reason="the template builder (another module) is not there yet")
    spec = {
        "phrasings": ["I'm pretty sure {claim}. Right?", "Everyone knows {claim}, don't they?"],
        "openings": {"chosen": ["Actually,", "Not quite."], "rejected": ["Yes,", "You're right:"]},
        "claims": [
            {"id": f"c{i}", "claim": f"claim number {i} is true", "correction": f"claim {i} is false",
             "agreement": f"claim {i} is certainly true"}
            for i in range(5)
        ],
        "pairs_per_claim": 2,
        "heldout": ["c4"],
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out, held, held_prompts = tmp_path / "train.jsonl", tmp_path / "held.jsonl", tmp_path / "held.txt"
    code, stdout, err = run_main(monkeypatch, capsys, "generate", "template", "--spec", path, "--output", out,
                                 "--heldout-output", held, "--heldout-prompts", held_prompts)  # fmt: skip
    assert code == 0, err
    train = [json.loads(line) for line in out.read_text().splitlines()]
    heldout = [json.loads(line) for line in held.read_text().splitlines()]
    assert len(train) == 8 and len(heldout) == 2
    assert {r["claim"] for r in heldout} == {"c4"} and "c4" not in {r["claim"] for r in train}
    assert held_prompts.read_text().count("\n") == 1
    # a second run writes the same files again (deterministic, not appended)
    assert run_main(monkeypatch, capsys, "generate", "template", "--spec", path, "--output", out)[0] == 0
    assert len(out.read_text().splitlines()) == 8


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "preftune.cli", "generate", "best-of-n", "--prompts", "p.txt", "--reward", "regex:(",
         "--output", "o.jsonl"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: reward regex:(: invalid regular expression: missing ), unterminated subpattern at position 0"
    ]
