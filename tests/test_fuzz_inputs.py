"""A corpus of malformed and edge inputs over data, config and the command line (issue 14).

Every case runs the `preftune` entry point in-process and must end with exit code 2, exactly one
line on stderr ("error: ...") that names the file and line, the field or the key, no traceback,
nothing on stdout and nothing written (the working directory is compared before and after, so no
output_dir, no eval.json, no pairs file appears). The model is never loaded: loading one fails the
case. The bounded-resource cases (a YAML alias bomb, a 20 MB string) run in a subprocess, with a
time and peak-memory cap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import pytest
import yaml

from preftune.config import SECTIONS
from tiny import run_main

GOOD_ROWS = [
    {"prompt": f"What is the capital of Spain? ({i})", "chosen": "Madrid.", "rejected": "Paris."} for i in range(6)
]
GOOD_JSONL = "".join(json.dumps(r) + "\n" for r in GOOD_ROWS)
GOOD_CSV = "prompt,chosen,rejected\n" + "".join(f"Q{i},Madrid.,Paris.\n" for i in range(4))


@dataclass
class Case:
    id: str
    # (tmp dir, tiny model dir) -> the arguments after `preftune`; writes the files the case needs
    argv: Callable[[Path, str], list[str]]
    needles: tuple[str, ...]
    marks: tuple = field(default_factory=tuple)


def write_config(tmp: Path, model_dir: str, extra: dict | None = None, raw: str = "", name: str = "run.yaml") -> Path:
    """run.yaml: a valid one-step run on pairs.jsonl (written too), plus ``extra`` keys, plus ``raw``
    YAML text appended as it is (for values yaml.safe_dump cannot spell or would quote)."""
    if not (tmp / "pairs.jsonl").exists():
        (tmp / "pairs.jsonl").write_text(GOOD_JSONL)
    base = {"model_name_or_path": model_dir, "train_file": "pairs.jsonl", "output_dir": str(tmp / "out"),
            "max_steps": 1, "per_device_train_batch_size": 2, "progress": False}  # fmt: skip
    for key in list(extra or {}) + [line.split(":", 1)[0].strip() for line in raw.splitlines() if ":" in line]:
        base.pop(key, None)
    path = tmp / name
    path.write_text(yaml.safe_dump({**base, **(extra or {})}, sort_keys=False) + raw)
    return path


def train(extra: dict | None = None, raw: str = "", overrides: tuple[str, ...] = (), files: dict | None = None):
    """argv for `preftune train run.yaml [overrides]`, writing ``files`` (name -> str or bytes) first."""

    def argv(tmp: Path, model_dir: str) -> list[str]:
        for name, content in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["train", str(write_config(tmp, model_dir, extra, raw)), *overrides]

    return argv


def data(name: str, content: str | bytes, **extra):
    """argv for a run whose train_file is ``name`` holding ``content``."""
    return train({"train_file": name, **extra}, files={name: content})


# ------------------------------------------------------------------ config: every numeric key x bad values


def numeric_keys() -> dict[str, type]:
    """Every config key whose value is an int or a float (optional or not), from the dataclasses."""
    out = {}
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            args = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
            if args in ({int}, {float}):
                out[f.name] = args.pop()
    return out


NUMERIC_KEYS = numeric_keys()
# A YAML spelling of each bad value: .nan and .inf are YAML's own floats; 10**400 is an integer no
# int64 holds and no float can be made of; a word is not a number.
BAD_NUMBERS = {"nan": ".nan", "inf": ".inf", "negative": "-1", "huge": str(10**400), "word": "lots"}
NEGATIVE_OK = {"max_steps", "simpo_gamma", "seed"}  # -1 is a valid value (tested below)


def numeric_cases() -> list[Case]:
    cases = []
    for key in NUMERIC_KEYS:
        for label, spelled in BAD_NUMBERS.items():
            if label == "negative" and key in NEGATIVE_OK:
                continue
            cases.append(Case(f"config-{key}-{label}", train(raw=f"{key}: {spelled}\n"), (f"'{key}'", "run.yaml")))
    return cases


def test_numeric_keys_are_found():
    assert {"learning_rate", "beta", "num_train_epochs", "max_grad_norm", "seed", "lora_dropout", "lora_r",
            "row_length_multiple", "eval_steps"} <= set(NUMERIC_KEYS)  # fmt: skip
    assert len(NUMERIC_KEYS) >= 30


def test_negative_one_is_valid_where_excluded():
    from preftune.config import load_config

    for key in NEGATIVE_OK:
        load_config({"train_file": "x.jsonl", key: -1})


# ------------------------------------------------------------------ config: other keys and files

# Billion laughs: nine levels of nine aliases, 9**9 (387 million) strings from under a kilobyte, the
# value of a known key (building the "must be a list of strings" message of it took 4 GiB).
BOMB = "lora_target: [\n" + '  &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"],\n' + "".join(
    f"  &{name} [{', '.join([f'*{prev}'] * 9)}],\n" for prev, name in zip("abcdefgh", "bcdefghi")
) + "]\n"


def config_file_case(id_: str, text: str | bytes, needles: tuple[str, ...]) -> Case:
    def argv(tmp: Path, model_dir: str) -> list[str]:
        (tmp / "pairs.jsonl").write_text(GOOD_JSONL)
        path = tmp / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", str(path)]

    return Case(id_, argv, needles)


CONFIG_CASES = [
    Case("device-tpu", train({"device": "tpu"}), ("'device'", "tpu", "run.yaml")),
    Case("device-tpu-override", train(overrides=("device=tpu",)), ("'device'", "tpu")),
    Case("device-cuda-word", train({"device": "cuda:zero"}), ("'device'",)),
    Case("seed-2**64", train(raw=f"seed: {2**64}\n"), ("'seed'", "64-bit")),
    Case("seed-below-int64", train(raw=f"seed: {-(2**63) - 1}\n"), ("'seed'",)),
    Case("lora_dropout-1", train({"lora_dropout": 1.0}), ("'lora_dropout'", "[0, 1)")),
    Case("loss_weights-zero", train({"loss_weights": [0]}), ("'loss_weights'", "> 0")),
    Case("loss_weights-negative", train({"loss_type": ["sigmoid", "sft"], "loss_weights": [1, -0.5]}),
         ("'loss_weights'", "-0.5")),  # fmt: skip
    Case("loss_weights-nan", train(raw="loss_weights: [.nan]\n"), ("'loss_weights'", "finite")),
    Case("loss_weights-inf", train(raw="loss_weights: [.inf]\n"), ("'loss_weights'", "finite")),
    Case("loss_weights-word", train(raw="loss_weights: [heavy]\n"), ("'loss_weights'",)),
    Case("row_length_multiple-1TB", train({"row_length_multiple": 2**40}), ("'row_length_multiple'", "max_length")),
    Case("max_length-1", train({"max_length": 1}), ("'max_length'", "at least 2")),
    Case("report_to-wandb", train({"report_to": "wandb"}), ("'report_to'", "wandb")),
    Case("report_to-list-with-wandb", train({"report_to": ["tensorboard", "wandb"]}), ("'report_to'", "wandb")),
    Case("report_to-number", train({"report_to": 3}), ("'report_to'",)),
    Case("output_dir-empty", train({"output_dir": ""}), ("'output_dir'", "empty")),
    Case("special_tokens_in_text-typo", train({"special_tokens_in_text": "literall"}),
         ("'special_tokens_in_text'", "literal")),  # fmt: skip
    Case("system_prompt-surrogate", train(raw='system_prompt: "\\ud800"\n'), ("'system_prompt'", "surrogate")),
    Case("train_file-nul", train(raw='train_file: "pairs\\0.jsonl"\n'), ("'train_file'", "NUL")),
    Case("unknown-key-huge", train(raw=f"? {'k' * 5000}\n: 1\n"), ("unknown key", "run.yaml")),
    Case("key-not-a-name", train(raw="1: 2\n"), ("keys must be names", "run.yaml")),
    Case("pref_ftx-word", train(raw="pref_ftx: much\n"), ("'pref_ftx'",)),
    Case("pref_ftx-nan", train(raw="pref_ftx: .nan\n"), ("'pref_ftx'", "finite")),
    Case("stage-sft", train({"stage": "sft"}), ("'stage: sft'",)),
    Case("lr-1e400-string", train(raw="learning_rate: 1e400\n"), ("'learning_rate'", "finite")),
    config_file_case("yaml-duplicate-key", "train_file: pairs.jsonl\nbeta: 0.1\nbeta: 0.2\n",
                     ("run.yaml:3", "'beta' appears twice")),  # fmt: skip
    config_file_case("yaml-duplicate-nested-key", "train_file: pairs.jsonl\nloss_type: {a: 1, a: 2}\n",
                     ("run.yaml:2", "'a' appears twice")),  # fmt: skip
    config_file_case("yaml-alias-bomb", "train_file: pairs.jsonl\n" + BOMB, ("run.yaml", "aliases")),
    config_file_case("yaml-recursive-alias", "train_file: pairs.jsonl\nlora_target: &a [*a]\n",
                     ("run.yaml", "aliases")),  # fmt: skip
    config_file_case("yaml-deep-nesting", "train_file: pairs.jsonl\nbeta: " + "[" * 600 + "]" * 600 + "\n",
                     ("run.yaml", "nested too deeply")),  # fmt: skip
    config_file_case("yaml-5000-digits", "train_file: pairs.jsonl\nseed: " + "7" * 5000 + "\n",
                     ("run.yaml:2", "5000 digits")),  # fmt: skip
    config_file_case("yaml-syntax", "train_file: [pairs.jsonl\n", ("run.yaml", "invalid YAML")),
    config_file_case("yaml-a-list", "- train_file\n- pairs.jsonl\n", ("run.yaml", "mapping")),
    config_file_case("yaml-not-utf8", b"train_file: \xff\xfe.jsonl\n", ("run.yaml", "UTF-8")),
    config_file_case("yaml-tab-indent", "train_file: pairs.jsonl\n\tbeta: 1\n", ("run.yaml:2", "invalid YAML")),
]


# ------------------------------------------------------------------ data files

DEEP = "[" * 100_000 + "]" * 100_000


def jsonl_with(line2: str, rows: str = GOOD_JSONL) -> str:
    """A JSON Lines file of ``rows`` with ``line2`` as its second line."""
    lines = rows.splitlines()
    return "\n".join([lines[0], line2, *lines[1:]]) + "\n"


CHAT_JSONL = "".join(
    json.dumps({"prompt": [{"role": "user", "content": f"Capital of Spain? ({i})"}], "chosen": "Madrid.",
                "rejected": "Paris."}) + "\n" for i in range(4)
)  # fmt: skip


JSON_ARRAY_HEAD = '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  '  # record 2 starts on line 3

DATA_CASES = [
    Case("jsonl-missing-field", data("p.jsonl", jsonl_with('{"prompt": "x", "chosen": "y"}')),
         ("p.jsonl:2", "'rejected'")),  # fmt: skip
    Case("jsonl-chosen-number", data("p.jsonl", jsonl_with('{"prompt": "x", "chosen": 5, "rejected": "z"}')),
         ("p.jsonl:2", "'chosen'", "string")),  # fmt: skip
    Case("jsonl-empty-completion", data("p.jsonl", jsonl_with('{"prompt": "x", "chosen": " ", "rejected": "z"}')),
         ("p.jsonl:2", "'chosen'")),  # fmt: skip
    Case("jsonl-invalid", data("p.jsonl", jsonl_with('{"prompt": "x", "chosen": }')), ("p.jsonl:2", "invalid JSON")),
    Case("jsonl-array-line", data("p.jsonl", jsonl_with('["x", "y", "z"]')), ("p.jsonl:2", "object")),
    Case("jsonl-deep-nesting", data("p.jsonl", jsonl_with('{"prompt": ' + DEEP + "}")),
         ("p.jsonl:2", "nested too deeply")),  # fmt: skip
    Case("jsonl-5000-digits", data("p.jsonl", jsonl_with('{"prompt": "x", "chosen": ' + "9" * 5000 + "}")),
         ("p.jsonl:2", "5000 digits")),  # fmt: skip
    Case("jsonl-lone-surrogate", data("p.jsonl", jsonl_with('{"prompt": "x", "chosen": "a\\ud800b", "rejected": "z"}')),
         ("p.jsonl:2", "'chosen'", "surrogate")),  # fmt: skip
    Case("jsonl-surrogate-in-message", data("p.jsonl", jsonl_with(
        '{"prompt": [{"role": "user", "content": "\\udfff"}], "chosen": "y", "rejected": "z"}', CHAT_JSONL)),
         ("p.jsonl:2", "'content'", "surrogate")),  # fmt: skip
    Case("jsonl-surrogate-in-history", data("p.jsonl", jsonl_with(
        '{"instruction": "x", "chosen": "y", "rejected": "z", "history": [["q", "\\ud83d"]]}',
        "".join(json.dumps({"instruction": f"Q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3)))),
         ("p.jsonl:2", "'history'", "surrogate")),  # fmt: skip
    Case("jsonl-duplicate-key", data("p.jsonl", jsonl_with('{"prompt": "x", "chosen": "y", "chosen": "w"}')),
         ("p.jsonl:2", "'chosen'", "twice")),  # fmt: skip
    Case("jsonl-conversational-bad-role", data("p.jsonl", jsonl_with(
        '{"prompt": [{"role": "robot", "content": "hi"}], "chosen": "y", "rejected": "z"}', CHAT_JSONL)),
         ("p.jsonl:2", "role 'robot'")),  # fmt: skip
    Case("jsonl-conversational-no-content", data("p.jsonl", jsonl_with(
        '{"prompt": [{"role": "user"}], "chosen": "y", "rejected": "z"}', CHAT_JSONL)),
         ("p.jsonl:2", "'content'")),  # fmt: skip
    Case("json-duplicate-key", data("p.json", JSON_ARRAY_HEAD + '{"prompt": "a", "prompt": "b", "chosen": "c"}\n]'),
         ("p.json:3 (record 2)", "'prompt'", "twice")),  # fmt: skip
    Case("json-deep-nesting", data("p.json", JSON_ARRAY_HEAD + DEEP + "\n]"),
         ("p.json:3 (record 2)", "nested too deeply")),  # fmt: skip
    Case("json-5000-digits", data("p.json", JSON_ARRAY_HEAD + "1" * 5000 + "\n]"),
         ("p.json:3 (record 2)", "5000 digits")),  # fmt: skip
    Case("json-lone-surrogate", data("p.json", JSON_ARRAY_HEAD + '{"prompt": "\\ud800", "chosen": "c"}\n]'),
         ("p.json:3 (record 2)", "'prompt'", "surrogate")),  # fmt: skip
    Case("json-object-not-array", data("p.json", '{"rows": []}'), ("p.json", "array")),
    Case("csv-nul", data("p.csv", GOOD_CSV + "Q9,Mad\x00rid.,Paris.\n"), ("p.csv:6", "NUL")),
    Case("csv-unclosed-quote", data("p.csv", "prompt,chosen,rejected\nQ1,a,b\n\"Q2,a,b\nQ3,a,b\n"),
         ("p.csv:3", "unclosed quote")),  # fmt: skip
    Case("csv-unclosed-quote-last-cell", data("p.csv", "prompt,chosen,rejected\nQ1,a,b\nQ2,a,\"b\nQ3,a,b\n"),
         ("p.csv:3", "unclosed quote")),  # fmt: skip
    Case("csv-semicolons", data("p.csv", "prompt;chosen;rejected\nHi, there;a;b\n"), ("p.csv:1", "semicolons")),
    Case("csv-tabs", data("p.csv", "prompt\tchosen\trejected\nHi\ta\tb\n"), ("p.csv:1", "tabs")),
    Case("csv-cells", data("p.csv", GOOD_CSV + "Q9,Madrid.\n"), ("p.csv:6", "2 cells", "3 columns")),
    Case("csv-duplicate-column", data("p.csv", "prompt,chosen,chosen\nQ,a,b\n"), ("p.csv:1", "'chosen'", "twice")),
    Case("csv-missing-column", data("p.csv", "prompt,chosen\nQ,a\n"), ("p.csv:2", "'rejected'")),
    Case("file-type", data("p.txt", "hello\n"), ("p.txt", "unsupported file type")),
    Case("file-empty", data("p.jsonl", ""), ("p.jsonl", "empty")),
    Case("file-not-utf8", data("p.jsonl", b'{"prompt": "\xff"}\n'), ("p.jsonl", "UTF-8")),
    Case("file-missing", train({"train_file": "pairz.jsonl"}), ("pairz.jsonl", "not found", "pairs.jsonl")),
    Case("file-name-too-long", train({"train_file": "p" * 300 + ".jsonl"}), ("p" * 300, "cannot read the file")),
    Case("file-is-directory", train({"train_file": "sub"}, files={"sub/x": "1"}), ("sub", "directory")),
    Case("eval-file-bad", train({"eval_file": "e.jsonl"}, files={"e.jsonl": '{"prompt": "x", "chosen": "y"}\n'}),
         ("e.jsonl:1", "'rejected'")),  # fmt: skip
    Case("eval-split-single-pair", data("one.jsonl", GOOD_JSONL.splitlines()[0] + "\n", eval_split=0.5),
         ("one.jsonl:1", "eval_split 0.5 holds out no pair")),  # fmt: skip
    Case("text-20MB-max_length-128", data("big.jsonl", json.dumps({"prompt": "x", "chosen": "word " * (4 << 20),
                                                                    "rejected": "no"}) + "\n", max_length=128),
         ("big.jsonl:1", "'chosen'", "20,971,520 characters", "max_length")),  # fmt: skip
    Case("llamafactory-info-duplicate-key", train({"dataset": "d", "dataset_dir": "lf", "train_file": None},
                                                  files={"lf/dataset_info.json": '{"d": {}, "d": {}}'}),
         ("dataset_info.json", "'d'", "twice")),  # fmt: skip
    Case("llamafactory-info-deep", train({"dataset": "d", "dataset_dir": "lf", "train_file": None},
                                         files={"lf/dataset_info.json": DEEP}),
         ("dataset_info.json", "nested too deeply")),  # fmt: skip
]


# ------------------------------------------------------------------ the command line


def cli(*args: str, files: dict | None = None):
    def argv(tmp: Path, model_dir: str) -> list[str]:
        for name, content in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(content)
        return [a.replace("{model}", model_dir).replace("{tmp}", str(tmp)) for a in args]

    return argv


def swapped(tmp: Path, model_dir: str) -> list[str]:
    return ["train", "beta=0.2", str(write_config(tmp, model_dir))]


def config_dir(tmp: Path, model_dir: str) -> list[str]:
    write_config(tmp, model_dir)
    return ["train", str(tmp)]


def yaml_as_override(tmp: Path, model_dir: str) -> list[str]:
    path = write_config(tmp, model_dir)
    return ["train", str(path), str(path)]


def override_without_equals(tmp: Path, model_dir: str) -> list[str]:
    return ["train", str(write_config(tmp, model_dir)), "beta"]


def home_config(tmp: Path, model_dir: str) -> list[str]:
    return ["train", "~/preftune-no-such-config-9f3a.yaml"]


EVAL = ("eval", "{model}", "--data", "{tmp}/pairs.jsonl", "--output", "{tmp}/ev")
PAIRS = {"pairs.jsonl": GOOD_JSONL}

CLI_CASES = [
    Case("cli-train-no-config", cli("train"), ("Missing argument", "train --help")),
    Case("cli-train-unknown-option", cli("train", "x.yaml", "--bogus"), ("No such option: --bogus",)),
    Case("cli-unknown-command", cli("trian"), ("No such command 'trian'",)),
    Case("cli-swapped-arguments", swapped, ("beta=0.2", "the config file comes first")),
    Case("cli-config-is-directory", config_dir, ("is a directory",)),
    Case("cli-config-twice", yaml_as_override, ("must look like key=value", "the config file comes first")),
    Case("cli-override-no-equals", override_without_equals, ("override 'beta' must look like key=value",)),
    Case("cli-config-tilde", home_config, (str(Path.home()), "preftune-no-such-config-9f3a.yaml", "not found")),
    Case("cli-override-nan", train(overrides=("beta=.nan",)), ("'beta'", "finite")),
    Case("cli-override-5000-digits", train(overrides=("seed=" + "3" * 5000,)), ("'seed'", "5000 digits")),
    Case("cli-override-deep", train(overrides=("beta=" + "[" * 600 + "]" * 600,)), ("'beta'", "nested too deeply")),
    Case("cli-override-unknown", train(overrides=("betta=0.2",)), ("unknown key 'betta'", "'beta'")),
    Case("eval-device-tpu", cli(*EVAL, "--device", "tpu", files=PAIRS), ("'--device'", "tpu")),
    Case("eval-beta-negative", cli(*EVAL, "--beta", "-0.1", files=PAIRS), ("--beta", "-0.1")),
    Case("eval-beta-zero", cli(*EVAL, "--beta", "0", files=PAIRS), ("--beta",)),
    Case("eval-beta-nan", cli(*EVAL, "--beta", "nan", files=PAIRS), ("--beta", "nan")),
    Case("eval-beta-inf", cli(*EVAL, "--beta", "inf", files=PAIRS), ("--beta", "inf")),
    Case("eval-beta-word", cli(*EVAL, "--beta", "high", files=PAIRS), ("'--beta'", "eval --help")),
    Case("eval-batch-size-0", cli(*EVAL, "--batch-size", "0", files=PAIRS), ("--batch-size",)),
    Case("eval-batch-size-float", cli(*EVAL, "--batch-size", "1.5", files=PAIRS), ("'--batch-size'",)),
    Case("eval-max-length-1", cli(*EVAL, "--max-length", "1", files=PAIRS), ("--max-length",)),
    Case("eval-max-new-tokens-0", cli(*EVAL, "--max-new-tokens", "0", files=PAIRS), ("max_new_tokens",)),
    Case("eval-data-missing", cli("eval", "{model}", "--data", "{tmp}/nope.jsonl"), ("nope.jsonl", "not found")),
    Case("eval-data-surrogate", cli("eval", "{model}", "--data", "{tmp}/s.jsonl",
                                    files={"s.jsonl": '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n'}),
         ("s.jsonl:1", "surrogate")),  # fmt: skip
    Case("generate-identity-device", cli("generate", "identity", "--name", "A", "--output", "{tmp}/o.jsonl",
                                         "--device", "tpu"), ("'--device'",)),  # fmt: skip
    Case("generate-best-of-n-seed", cli("generate", "best-of-n", "--prompts", "{tmp}/p.txt", "--reward", "length",
                                        "--output", "{tmp}/o.jsonl", "--seed", str(2**70)), ("--seed",)),  # fmt: skip
    Case("generate-template-seed", cli("generate", "template", "--spec", "{tmp}/s.yaml", "--output", "{tmp}/o.jsonl",
                                       "--seed", str(-(2**64))), ("--seed",)),  # fmt: skip
]

CASES = numeric_cases() + CONFIG_CASES + DATA_CASES + CLI_CASES


def test_corpus_size():
    assert len(CASES) >= 150, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    assert len(DATA_CASES) >= 30 and len(CLI_CASES) >= 20 and len(CONFIG_CASES) >= 30


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every case must stop before a model loads: loading one fails the case."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded: bad input must be found before that")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, tiny_model_dir, monkeypatch, capsys,
                                                      no_model_loading):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    args = case.argv(tmp_path, tiny_model_dir)
    before = listing(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, *args)
    lines = err.strip("\n").splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0][:500])
    assert out == ""
    assert listing(tmp_path) == before, "bad input must leave nothing written"


# ------------------------------------------------------------------ bounded resources (own process)


# The child reports its own peak (VmHWM belongs to the process image after exec); the rusage a parent
# gets from wait4 also counts the memory of the forked copy of pytest before exec (about 1 GB late
# in the suite), which is not the command's.
PEAK_REPORTER = """
import runpy, sys
peak_file = sys.argv.pop(1)
sys.argv[0] = "preftune"
try:
    runpy.run_module("preftune.cli", run_name="__main__")
finally:
    with open("/proc/self/status") as status, open(peak_file, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


def run_bounded(args: list[str], cwd: Path) -> tuple[int, str, float, float]:
    """(exit code, stderr, seconds, peak RSS in MB) of `python -m preftune.cli ARGS` in its own process."""
    env = {**os.environ, "PREFTUNE_HOME": str(cwd / "home")}
    started = time.monotonic()
    peak_file = cwd / "peak_kb.txt"
    with open(cwd / "stderr.txt", "wb") as err:
        proc = subprocess.run([sys.executable, "-c", PEAK_REPORTER, str(peak_file), *args], cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=err, env=env, timeout=300)  # fmt: skip
    seconds = time.monotonic() - started
    return proc.returncode, (cwd / "stderr.txt").read_text(), seconds, int(peak_file.read_text()) / 1024


def test_yaml_alias_bomb_ends_in_seconds_with_bounded_memory(tmp_path):
    """Under a kilobyte of YAML aliases expand to 9**9 values (4 GiB while an error message was built)."""
    (tmp_path / "pairs.jsonl").write_text(GOOD_JSONL)
    bomb = "train_file: pairs.jsonl\n" + BOMB
    assert len(bomb.encode()) < 1024, len(bomb.encode())
    (tmp_path / "bomb.yaml").write_text(bomb)
    code, err, seconds, peak_mb = run_bounded(["train", "bomb.yaml"], tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "aliases" in err, err
    assert seconds < 60 and peak_mb < 1000, (seconds, peak_mb)


def test_20mb_string_with_max_length_128_ends_in_seconds_with_bounded_memory(tmp_path, tiny_model_dir):
    """Tokenizing it to keep 128 tokens took 50 s and 4.5 GB; refused before tokenizing, in one line."""
    (tmp_path / "big.jsonl").write_text(json.dumps({"prompt": "Hi", "chosen": "word " * (4 << 20), "rejected": "No."}))
    write_config(tmp_path, tiny_model_dir, {"train_file": "big.jsonl", "max_length": 128})
    code, err, seconds, peak_mb = run_bounded(["train", "run.yaml"], tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "big.jsonl:1" in err and "'chosen'" in err, err
    assert seconds < 60 and peak_mb < 1200, (seconds, peak_mb)
    assert not (tmp_path / "out").exists()
