"""Loading preference pairs: formats, file types, LLaMA-Factory datasets, errors, eval split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data import FORMATS, detect_format, load_llamafactory, load_pairs, split_eval
from preftune.errors import PreftuneError
from preftune.types import PreferencePair

LF_DIR = Path(__file__).parent / "data" / "llamafactory"

SYSTEM = "Be brief."
QUESTION = "Translate to English\nbonjour"
# The canonical form every format below must normalize to.
EXPECTED = [
    (
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": QUESTION},
        ],
        "hello",
        "goodbye",
    ),
    ([{"role": "user", "content": "What is 2+2?"}], "4", "5"),
]


def _msg(role, content):
    return {"role": role, "content": content}


RECORDS = {
    "conversational": [
        {
            "prompt": EXPECTED[0][0],
            "chosen": [_msg("assistant", "hello")],
            "rejected": [_msg("assistant", "goodbye")],
        },
        {
            "prompt": [_msg("user", "What is 2+2?")],
            "chosen": [_msg("assistant", "4")],
            "rejected": [_msg("assistant", "5")],
        },
    ],
    "alpaca": [
        {
            "instruction": "Translate to English",
            "input": "bonjour",
            "chosen": "hello",
            "rejected": "goodbye",
            "system": SYSTEM,
            "history": [["Hello", "Hi there."]],
        },
        {"instruction": "What is 2+2?", "input": "", "chosen": "4", "rejected": "5", "system": "", "history": []},
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "human", "value": "Hello"},
                {"from": "gpt", "value": "Hi there."},
                {"from": "human", "value": QUESTION},
            ],
            "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "goodbye"},
            "system": SYSTEM,
        },
        {
            "conversations": [{"from": "human", "value": "What is 2+2?"}],
            "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"},
            "system": "",
        },
    ],
    # Text-completion data: string prompts stay strings.
    "standard": [
        {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
        {"prompt": "The sky is", "chosen": " blue", "rejected": " green"},
    ],
}
STANDARD_EXPECTED = [("Q: 2+2?\nA:", " 4", " 5"), ("The sky is", " blue", " green")]

# CSV cells are flat text: alpaca without history, and standard.
CSV_RECORDS = {
    "alpaca": [
        {"instruction": "Translate to English", "input": "bonjour", "chosen": "hello", "rejected": "goodbye",
         "system": SYSTEM},
        {"instruction": "What is 2+2?", "input": "", "chosen": "4", "rejected": "5", "system": ""},
    ],
    "standard": RECORDS["standard"],
}
CSV_EXPECTED = {
    "alpaca": [
        ([_msg("system", SYSTEM), _msg("user", QUESTION)], "hello", "goodbye"),
        EXPECTED[1],
    ],
    "standard": STANDARD_EXPECTED,
}

FILE_TYPES = ("jsonl", "json", "csv", "parquet", "save_to_disk")


def write(tmp_path: Path, kind: str, records: list[dict], name: str = "data") -> Path:
    """Write ``records`` as one file type and return the path to load."""
    if kind == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    elif kind == "csv":
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif kind == "parquet":
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "save_to_disk":
        import datasets

        path = tmp_path / name
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


def core(pairs: list[PreferencePair]) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(PreftuneError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text and "\r" not in text, text
    assert "Traceback" not in text
    return text


def write_jsonl_lines(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


# --------------------------------------------------------------------------- formats x file types


@pytest.mark.parametrize("kind", FILE_TYPES)
@pytest.mark.parametrize("fmt", ["conversational", "alpaca", "sharegpt"])
def test_chat_format_per_file_type(tmp_path, fmt, kind):
    if kind == "csv":
        records, expected = CSV_RECORDS.get(fmt), CSV_EXPECTED.get(fmt)
        if records is None:  # nested messages cannot live in CSV cells
            path = write(tmp_path, "csv", [{"prompt": "x", "chosen": "a", "rejected": "b"}])
            msg = error_of(load_pairs, path, format=fmt)
            assert f"the {fmt} format needs lists of messages, which CSV cells cannot hold" in msg
            return
    else:
        records, expected = RECORDS[fmt], EXPECTED
    path = write(tmp_path, kind, records)
    auto = load_pairs(path)
    assert core(auto) == expected
    assert core(load_pairs(path, format=fmt)) == expected  # explicit format agrees with detection


@pytest.mark.parametrize("kind", FILE_TYPES)
def test_standard_format_per_file_type(tmp_path, kind):
    path = write(tmp_path, kind, RECORDS["standard"])
    pairs = load_pairs(path)
    assert core(pairs) == STANDARD_EXPECTED
    assert all(isinstance(p.prompt, str) for p in pairs)


def test_formats_are_equivalent(tmp_path):
    """The same content in all four formats normalizes to the same pair."""
    simple = {
        "conversational": {"prompt": [_msg("system", "S"), _msg("user", "Hi")],
                           "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]},
        "alpaca": {"instruction": "Hi", "input": "", "chosen": "a", "rejected": "b", "system": "S"},
        "sharegpt": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}],
                     "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    }
    implicit = {"chosen": [_msg("system", "S"), _msg("user", "Hi"), _msg("assistant", "a")],
                "rejected": [_msg("system", "S"), _msg("user", "Hi"), _msg("assistant", "b")]}
    want = ([_msg("system", "S"), _msg("user", "Hi")], "a", "b")
    results = {}
    for fmt, record in simple.items():
        assert detect_format(record, "x") == fmt
        results[fmt] = core(load_pairs(write(tmp_path, "jsonl", [record], name=fmt)))[0]
    results["implicit"] = core(load_pairs(write(tmp_path, "jsonl", [implicit], name="implicit")))[0]
    assert all(r == want for r in results.values()), results


def test_file_types_are_equivalent(tmp_path):
    """The same records in all five file types give the same pairs."""
    results = {}
    for kind in FILE_TYPES:
        sub = tmp_path / kind
        sub.mkdir()
        results[kind] = core(load_pairs(write(sub, kind, CSV_RECORDS["alpaca"])))
    assert all(r == CSV_EXPECTED["alpaca"] for r in results.values()), results
    for kind in ("jsonl", "json", "parquet", "save_to_disk"):
        sub = tmp_path / f"{kind}-conv"
        sub.mkdir()
        assert core(load_pairs(write(sub, kind, RECORDS["conversational"]))) == EXPECTED


def test_sources(tmp_path):
    recs = RECORDS["standard"]
    jsonl = write_jsonl_lines(tmp_path, ["", json.dumps(recs[0]), "   ", json.dumps(recs[1])])
    assert [p.source for p in load_pairs(jsonl)] == [f"{jsonl}:2", f"{jsonl}:4"]  # blank lines keep numbering
    js = write(tmp_path, "json", recs)
    assert [p.source for p in load_pairs(js)] == [f"{js}:2 (record 1)", f"{js}:7 (record 2)"]
    minified = tmp_path / "min.json"
    minified.write_text(json.dumps(recs), encoding="utf-8")
    assert [p.source for p in load_pairs(minified)] == [f"{minified}:1 (record 1)", f"{minified}:1 (record 2)"]
    multiline = tmp_path / "m.csv"
    multiline.write_text('prompt,chosen,rejected\n"two\nlines",a,b\n\nx,c,d\n', encoding="utf-8")
    pairs = load_pairs(multiline)
    assert [p.source for p in pairs] == [f"{multiline}:2", f"{multiline}:5"]
    assert pairs[0].prompt == "two\nlines"
    pq_path = write(tmp_path, "parquet", recs)
    assert [p.source for p in load_pairs(pq_path)] == [f"{pq_path} row 1", f"{pq_path} row 2"]
    disk = write(tmp_path, "save_to_disk", recs)
    assert [p.source for p in load_pairs(disk)] == [f"{disk} row 1", f"{disk} row 2"]


def test_dataset_dict_uses_train_or_only_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_list(RECORDS["standard"])
    test = datasets.Dataset.from_list(RECORDS["standard"][:1])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    pairs = load_pairs(tmp_path / "dd")
    assert core(pairs) == STANDARD_EXPECTED
    assert pairs[1].source == f"{tmp_path / 'dd'}/train row 2"
    datasets.DatasetDict({"test": test}).save_to_disk(str(tmp_path / "only"))
    assert core(load_pairs(tmp_path / "only")) == STANDARD_EXPECTED[:1]
    datasets.DatasetDict({"a": test, "b": test}).save_to_disk(str(tmp_path / "ab"))
    msg = error_of(load_pairs, tmp_path / "ab")
    assert msg == f"{tmp_path / 'ab'}: the DatasetDict has splits a, b and none is named 'train'"


def test_json_lines_saved_as_json_and_utf16_and_bom(tmp_path):
    recs = RECORDS["standard"]
    path = tmp_path / "lines.json"  # what Dataset.to_json writes
    path.write_text("\n".join(json.dumps(r) for r in recs), encoding="utf-8")
    pairs = load_pairs(path)
    assert core(pairs) == STANDARD_EXPECTED and pairs[1].source == f"{path}:2"
    utf16 = tmp_path / "win.jsonl"
    utf16.write_bytes("\n".join(json.dumps(r) for r in recs).encode("utf-16"))
    assert core(load_pairs(utf16)) == STANDARD_EXPECTED
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nHi,a,b\n")
    assert core(load_pairs(bom)) == [("Hi", "a", "b")]


def test_csv_keeps_na_strings_and_allows_empty_input(tmp_path):
    path = tmp_path / "na.csv"
    path.write_text("instruction,input,chosen,rejected\nSay it,,NA,null\n", encoding="utf-8")
    assert core(load_pairs(path)) == [([_msg("user", "Say it")], "NA", "null")]


def test_identical_chosen_rejected_is_not_an_error(tmp_path):
    path = write_jsonl_lines(tmp_path, [json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})])
    assert core(load_pairs(path)) == [("p", "same", "same")]


def test_conversational_string_replies_and_multiturn(tmp_path):
    rec = {"prompt": [_msg("user", "Hi"), _msg("assistant", "Hey"), _msg("user", "Bye")],
           "chosen": "Bye!", "rejected": {"role": "assistant", "content": "No."}}
    pair = load_pairs(write_jsonl_lines(tmp_path, [json.dumps(rec)]))[0]
    assert pair.prompt[-1] == _msg("user", "Bye") and (pair.chosen, pair.rejected) == ("Bye!", "No.")


def test_extra_message_keys_are_dropped(tmp_path):
    rec = {"prompt": [{"role": "user", "content": "Hi", "name": "bob"}],
           "chosen": [{"role": "assistant", "content": "a", "weight": 1}], "rejected": [_msg("assistant", "b")]}
    assert load_pairs(write_jsonl_lines(tmp_path, [json.dumps(rec)]))[0].prompt == [_msg("user", "Hi")]


# --------------------------------------------------------------------------- implicit prompt


def test_implicit_prompt_extraction(tmp_path):
    chosen = [_msg("system", "S"), _msg("user", "a"), _msg("assistant", "b"), _msg("user", "c"), _msg("assistant", "good")]
    rejected = chosen[:-1] + [_msg("assistant", "bad")]
    pair = load_pairs(write_jsonl_lines(tmp_path, [json.dumps({"chosen": chosen, "rejected": rejected})]))[0]
    assert pair.prompt == chosen[:-1] and (pair.chosen, pair.rejected) == ("good", "bad")


def test_implicit_prompt_identical_conversations(tmp_path):
    conv = [_msg("user", "a"), _msg("assistant", "b")]
    pair = load_pairs(write_jsonl_lines(tmp_path, [json.dumps({"chosen": conv, "rejected": conv})]))[0]
    assert pair.prompt == conv[:1] and pair.chosen == pair.rejected == "b"


def test_implicit_prompt_errors(tmp_path):
    diverge = {"chosen": [_msg("user", "a"), _msg("assistant", "x")],
               "rejected": [_msg("user", "DIFFERENT"), _msg("assistant", "y")]}
    msg = error_of(load_pairs, write_jsonl_lines(tmp_path, [json.dumps(diverge)]))
    assert msg.endswith(
        "data.jsonl:1: no 'prompt' field, so 'chosen' and 'rejected' must be the same conversation "
        "except for the last (assistant) message, but they differ at message 1"
    )
    no_prompt = {"chosen": [_msg("assistant", "x")], "rejected": [_msg("assistant", "y")]}
    msg = error_of(load_pairs, write_jsonl_lines(tmp_path, [json.dumps(no_prompt)]))
    assert msg.endswith("data.jsonl:1: no 'prompt' field and 'chosen' and 'rejected' share no messages, so there is no prompt")
    longer = {"chosen": [_msg("user", "a"), _msg("assistant", "x")],
              "rejected": [_msg("user", "a"), _msg("assistant", "x"), _msg("user", "more"), _msg("assistant", "y")]}
    msg = error_of(load_pairs, write_jsonl_lines(tmp_path, [json.dumps(longer)]))
    assert "data.jsonl:1: no 'prompt' field, so 'chosen' and 'rejected' must be the same conversation" in msg
    assert msg.endswith("but 'chosen' has 2 messages and 'rejected' has 4")
    ends_user = {"chosen": [_msg("user", "a"), _msg("user", "x")], "rejected": [_msg("user", "a"), _msg("user", "y")]}
    msg = error_of(load_pairs, write_jsonl_lines(tmp_path, [json.dumps(ends_user)]))
    assert msg.endswith("data.jsonl:1: field 'chosen' must end with an assistant message, got user")


# --------------------------------------------------------------------------- columns


def test_columns_mapping_standard(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,good,bad,prompt\nHi,a,b,unused\n", encoding="utf-8")
    pairs = load_pairs(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert core(pairs) == [("Hi", "a", "b")]


def test_columns_mapping_llamafactory_style_alpaca(tmp_path):
    rec = {"q": "Translate to English", "ctx": "bonjour", "good": "hello", "bad": "goodbye", "sys": SYSTEM,
           "hist": [["Hello", "Hi there."]]}
    path = write_jsonl_lines(tmp_path, [json.dumps(rec)])
    cols = {"prompt": "q", "query": "ctx", "chosen": "good", "rejected": "bad", "system": "sys", "history": "hist"}
    assert core(load_pairs(path, columns=cols)) == EXPECTED[:1]
    cols2 = {"instruction": "q", "input": "ctx", "chosen": "good", "rejected": "bad", "system": "sys", "history": "hist"}
    assert core(load_pairs(path, columns=cols2)) == EXPECTED[:1]


def test_columns_mapping_sharegpt_messages(tmp_path):
    rec = dict(RECORDS["sharegpt"][0])
    rec["dialog"] = rec.pop("conversations")
    path = write_jsonl_lines(tmp_path, [json.dumps(rec)])
    assert core(load_pairs(path, columns={"messages": "dialog"})) == EXPECTED[:1]


def test_columns_errors(tmp_path):
    path = write_jsonl_lines(tmp_path, [GOOD])
    msg = error_of(load_pairs, path, columns={"promt": "q"})
    assert msg.startswith(f"{path}: columns: unknown name 'promt'; did you mean 'prompt'?")
    msg = error_of(load_pairs, path, columns={"prompt": "question"})
    assert msg == f"{path}:1: field 'question' is missing (columns maps prompt to it)"
    msg = error_of(load_pairs, path, columns={"input": "a", "query": "b"})
    assert "columns: 'input' and 'query' both name the input column" in msg


# --------------------------------------------------------------------------- LLaMA-Factory


def test_llamafactory_alpaca_columns():
    pairs = load_llamafactory("prefs_alpaca", LF_DIR)
    assert core(pairs) == EXPECTED
    assert pairs[0].source == f"{LF_DIR / 'alpaca_prefs.json'}:2 (record 1)"


def test_llamafactory_alpaca_defaults_ignore_unmapped_system():
    # LLaMA-Factory reads a system column only when "columns" maps one.
    pairs = load_llamafactory("prefs_alpaca_defaults", LF_DIR)
    assert core(pairs) == [([_msg("user", QUESTION)], "hello", "goodbye"), EXPECTED[1]]


def test_llamafactory_sharegpt_and_tags():
    sharegpt = load_llamafactory("prefs_sharegpt", LF_DIR)
    second = ([_msg("system", SYSTEM), _msg("user", "What is 2+2?")], "4", "5")  # system from a system-tag turn
    assert core(sharegpt) == [EXPECTED[0], second]
    assert core(load_llamafactory("prefs_openai_tags", LF_DIR)) == EXPECTED[:1]


def test_llamafactory_comma_separated_concatenates():
    pairs = load_llamafactory("prefs_alpaca, prefs_openai_tags", LF_DIR)
    assert core(pairs) == EXPECTED + EXPECTED[:1]


def test_llamafactory_matches_load_pairs_equivalents(tmp_path):
    # The same content loaded both ways is the same.
    direct = load_pairs(write(tmp_path, "jsonl", RECORDS["sharegpt"]))
    via_lf = load_llamafactory("prefs_sharegpt", LF_DIR)
    assert core(direct)[0] == core(via_lf)[0]


def test_llamafactory_directory_of_files(tmp_path):
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts", "jsonl", RECORDS["alpaca"][:1], name="a")
    write(tmp_path / "parts", "json", RECORDS["alpaca"][1:], name="b")
    info = {"d": {"file_name": "parts", "ranking": True, "columns": {"system": "system", "history": "history"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    assert core(load_llamafactory("d", tmp_path)) == EXPECTED


def test_llamafactory_errors(tmp_path):
    info = f"{LF_DIR / 'dataset_info.json'}"
    msg = error_of(load_llamafactory, "sft_only", LF_DIR)
    assert msg == f"{info}: dataset 'sft_only' is not a preference dataset (its entry needs \"ranking\": true)"
    msg = error_of(load_llamafactory, "hub_prefs", LF_DIR)
    assert msg.startswith(f"{info}: dataset 'hub_prefs' is loaded through 'hf_hub_url'; preftune reads local files only")
    msg = error_of(load_llamafactory, "prefs_alpacca", LF_DIR)
    assert msg.startswith(f"{info}: no dataset named 'prefs_alpacca'; did you mean 'prefs_alpaca'?")
    msg = error_of(load_llamafactory, "x", tmp_path)
    assert msg.startswith(f"{tmp_path / 'dataset_info.json'}: file not found")

    def entry_error(entry, data_lines=None):
        (tmp_path / "dataset_info.json").write_text(json.dumps({"d": entry}), encoding="utf-8")
        if data_lines is not None:
            write_jsonl_lines(tmp_path, data_lines, "d.jsonl")
        return error_of(load_llamafactory, "d", tmp_path)

    assert "dataset 'd' has formatting 'sharegtp'; did you mean 'sharegpt'?" in entry_error(
        {"file_name": "d.jsonl", "ranking": True, "formatting": "sharegtp"})
    assert "dataset 'd' maps column 'images': images is not supported" in entry_error(
        {"file_name": "d.jsonl", "ranking": True, "columns": {"images": "img"}})
    assert "dataset 'd' has unknown tag 'role'; did you mean 'role_tag'?" in entry_error(
        {"file_name": "d.jsonl", "ranking": True, "formatting": "sharegpt", "tags": {"role": "r"}})
    assert "dataset 'd' has no 'file_name'" in entry_error({"ranking": True})
    msg = entry_error({"file_name": "d.jsonl", "ranking": True, "columns": {"prompt": "q"}},
                      [json.dumps({"instruction": "x", "chosen": "a", "rejected": "b"})])
    assert msg == f"{tmp_path / 'd.jsonl'}:1: field 'q' is missing (columns maps prompt to it)"
    msg = entry_error({"file_name": "d.jsonl", "ranking": True, "formatting": "sharegpt"},
                      [json.dumps(RECORDS["sharegpt"][0] | {"chosen": {"from": "human", "value": "x"}})])
    assert msg == f"{tmp_path / 'd.jsonl'}:1: field 'chosen' has from 'human'; expected 'gpt'"
    (tmp_path / "dataset_info.json").write_text('{"d": {"file_name": "x",}}', encoding="utf-8")
    msg = error_of(load_llamafactory, "d", tmp_path)
    assert msg.startswith(f"{tmp_path / 'dataset_info.json'}:1: invalid JSON (")


# --------------------------------------------------------------------------- bad input: one line each


def test_error_missing_field_names_line(tmp_path):
    path = write_jsonl_lines(tmp_path, [GOOD] * 6 + [json.dumps({"prompt": "p", "rejected": "b"})])
    assert error_of(load_pairs, path) == f"{path}:7: field 'chosen' is missing"


def test_error_invalid_json_line(tmp_path):
    path = write_jsonl_lines(tmp_path, [GOOD, GOOD, '{"prompt": "a" "chosen": "b"}'])
    assert error_of(load_pairs, path) == f"{path}:3: invalid JSON (Expecting ',' delimiter: column 16)"


def test_error_jsonl_holding_pretty_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS["standard"], indent=2), encoding="utf-8")
    msg = error_of(load_pairs, path)
    assert msg.startswith(f"{path}:1: invalid JSON (") and "JSON Lines needs one complete object per line" in msg
    path.write_text(json.dumps(RECORDS["standard"]), encoding="utf-8")
    assert error_of(load_pairs, path) == f"{path}:1: expected a JSON object, got list (a JSON array belongs in a .json file)"


def test_error_invalid_json_file(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[\n  {"prompt": "a",\n   "chosen": "b"\n   "rejected": "c"}\n]', encoding="utf-8")
    assert error_of(load_pairs, path) == f"{path}:4: invalid JSON (Expecting ',' delimiter: column 4)"


def test_error_json_not_a_list(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps({"train": RECORDS["standard"]}), encoding="utf-8")
    msg = error_of(load_pairs, path)
    assert msg == (f"{path}: expected a JSON array of records, got an object (keys: train); "
                   "the records seem to be under 'train': make that list the whole file")
    path.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, "oops"]', encoding="utf-8")
    assert error_of(load_pairs, path) == f"{path}:1 (record 2): expected a JSON object, got string"


def test_error_parquet_wrong_type(tmp_path):
    path = write(tmp_path, "parquet", [{"prompt": "p", "chosen": "a", "rejected": None},
                                       {"prompt": "p", "chosen": "a", "rejected": None}])
    assert error_of(load_pairs, path) == f"{path} row 1: field 'rejected' must be a string, got null"
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "chosen": ["a", "b"], "rejected": [float("nan"), 1.5]}), path)
    assert error_of(load_pairs, path) == f"{path} row 1: field 'rejected' must be a string, got float"


def test_error_csv_rows(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,\n", encoding="utf-8")
    assert error_of(load_pairs, path) == f"{path}:3: empty completion in field 'rejected'"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,b\np,a\n", encoding="utf-8")
    assert error_of(load_pairs, path) == f"{path}:4: row has 2 cells but the header has 3 columns"
    path.write_text("prompt,chosen,prompt\np,a,b\n", encoding="utf-8")
    assert error_of(load_pairs, path) == f"{path}:1: column 'prompt' appears twice in the header"
    path.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    assert error_of(load_pairs, path) == f"{path}: no preference pairs found (the file has no records)"
    path.write_text("prompt,chosen,rejected,\np,a,b,\n", encoding="utf-8")  # trailing empty column is fine
    assert core(load_pairs(path)) == [("p", "a", "b")]


def test_error_not_utf8(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_bytes(b'[{"prompt": \xff"x"}]')
    msg = error_of(load_pairs, path)
    assert msg.startswith(f"{path}: not valid UTF-8 (byte 0xff at offset 12)")
    jl = tmp_path / "data.jsonl"
    jl.write_bytes(GOOD.encode() + b'\n{"prompt": "caf\xe9"}\n')
    assert "not valid UTF-8 (byte 0xe9 at offset" in error_of(load_pairs, jl)
    assert "on line 2" in error_of(load_pairs, jl)


def test_error_unsupported_file_type(tmp_path):
    path = tmp_path / "prefs.txt"
    path.write_text("hello", encoding="utf-8")
    assert error_of(load_pairs, path) == (
        f"{path}: unsupported file type '.txt'; use .json, .jsonl, .csv, .parquet or a save_to_disk directory"
    )


def test_error_empty_completion(tmp_path):
    path = write_jsonl_lines(tmp_path, [GOOD, json.dumps({"prompt": "p", "chosen": "  \n", "rejected": "b"})])
    assert error_of(load_pairs, path) == f"{path}:2: empty completion in field 'chosen'"
    conv = {"prompt": [_msg("user", "Hi")], "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "")]}
    path = write_jsonl_lines(tmp_path, [json.dumps(conv)])
    assert error_of(load_pairs, path) == f"{path}:1: empty completion in field 'rejected'"


def test_error_cannot_tell_format(tmp_path):
    path = write_jsonl_lines(tmp_path, [json.dumps({"a": 1, "b": 2})])
    assert error_of(load_pairs, path) == (
        f"{path}:1: cannot tell the format (keys: a, b); set format: standard|conversational|alpaca|sharegpt"
    )
    path = write_jsonl_lines(tmp_path, [json.dumps({"prompt": "p", "completion": "c", "label": True})])
    assert "looks like unpaired preference data" in error_of(load_pairs, path)


def test_error_unknown_format(tmp_path):
    path = write_jsonl_lines(tmp_path, [GOOD])
    assert error_of(load_pairs, path, format="alpacca") == f"{path}: unknown format 'alpacca'; did you mean 'alpaca'?"
    assert "(use auto, standard, conversational, alpaca, sharegpt)" in error_of(load_pairs, path, format="xyz")


def test_error_file_not_found_and_empty(tmp_path):
    path = tmp_path / "missing.jsonl"
    assert error_of(load_pairs, path) == f"{path}: file not found"
    (tmp_path / "prefs.jsonl").write_text(GOOD, encoding="utf-8")
    assert error_of(load_pairs, tmp_path / "prefs.json") == f"{tmp_path / 'prefs.json'}: file not found; did you mean 'prefs.jsonl'?"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n  \n", encoding="utf-8")
    assert error_of(load_pairs, empty) == f"{empty}: no preference pairs found (the file is empty)"
    arr = tmp_path / "empty.json"
    arr.write_text("[]", encoding="utf-8")
    assert error_of(load_pairs, arr) == f"{arr}: no preference pairs found (the file has no records)"
    pq_path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), pq_path)
    assert error_of(load_pairs, pq_path) == f"{pq_path}: no preference pairs found (the file has no records)"


def test_error_directory_and_corrupt_parquet(tmp_path):
    (tmp_path / "plain").mkdir()
    msg = error_of(load_pairs, tmp_path / "plain")
    assert msg.startswith(f"{tmp_path / 'plain'}: is a directory but not one written by datasets' save_to_disk")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert error_of(load_pairs, bad).startswith(f"{bad}: not a readable Parquet file (")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a list of messages, got int"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "field 'chosen' must be a string, got list"),
        ({"prompt": [{"content": "Hi"}], "chosen": "a", "rejected": "b"}, "field 'prompt' message 1 has no 'role'"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "field 'prompt' message 1 has no 'content'"),
        ({"prompt": ["Hi"], "chosen": "a", "rejected": "b"},
         "field 'prompt' message 1 must be an object with 'role' and 'content', got string"),
        ({"prompt": [{"role": "bot", "content": "Hi"}], "chosen": "a", "rejected": "b"},
         "field 'prompt' message 1 has role 'bot'; use system, user or assistant"),
        ({"prompt": [{"from": "human", "value": "Hi"}], "chosen": "a", "rejected": "b"},
         "field 'prompt' message 1 has no 'role' (sharegpt {from, value} messages need format: sharegpt)"),
        ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "chosen": "a", "rejected": "b"},
         "field 'prompt' message 1 'content' must be a string, got list"),
        ({"prompt": [_msg("user", "Hi"), _msg("assistant", "Hey")], "chosen": "a", "rejected": "b"},
         "field 'prompt' must end with a user message, but message 2 is from assistant"),
        ({"prompt": [_msg("user", "Hi"), _msg("system", "S"), _msg("user", "Hi")], "chosen": "a", "rejected": "b"},
         "field 'prompt' message 2 is a system message; a system message may only come first"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "field 'prompt' has no messages"),
        ({"prompt": [_msg("user", "Hi")], "chosen": [_msg("assistant", "a"), _msg("assistant", "b")], "rejected": "b"},
         "field 'chosen' must hold exactly one assistant message, got 2 messages"),
        ({"prompt": [_msg("user", "Hi")], "chosen": [_msg("user", "a")], "rejected": "b"},
         "field 'chosen' message 1 has role 'user'; expected assistant"),
        ({"instruction": "Hi", "chosen": "a", "rejected": "b", "history": [["only one"]]},
         "field 'history' item 1 must be a [user, assistant] pair, got a list of 1"),
        ({"instruction": "Hi", "chosen": "a", "rejected": "b", "history": "nope"},
         "field 'history' must be a list of [user, assistant] pairs, got string"),
        ({"instruction": 5, "chosen": "a", "rejected": "b"}, "field 'instruction' must be a string, got int"),
        ({"instruction": "Hi", "input": 7, "chosen": "a", "rejected": "b"}, "field 'input' must be a string, got int"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
         "field 'conversations' must end with a 'human' message, but the last is from 'gpt'"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Yo"}],
          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
         "field 'conversations' message 2 is from 'human', expected 'gpt'"),
        ({"conversations": [{"role": "user", "content": "Hi"}],
          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
         "field 'conversations' message 1 has no 'from' ({role, content} messages are the conversational format)"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"},
                            {"from": "observation", "value": "tool out"}],
          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
         "field 'conversations' message 3 is a 'observation' turn; tool calls are not supported"),
        ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": ["a"], "rejected": {"from": "gpt", "value": "b"}},
         "field 'chosen' must be an object like {\"from\": \"gpt\", \"value\": ...}, got list"),
        ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "a"},
          "rejected": {"from": "gpt", "value": ""}},
         "empty completion in field 'rejected'"),
        ({"conversations": "Hi", "chosen": "a", "rejected": "b"},
         "field 'conversations' must be a list of messages, got string"),
    ],
)
def test_error_wrong_types(tmp_path, record, message):
    path = write_jsonl_lines(tmp_path, [json.dumps(record)])
    msg = error_of(load_pairs, path)
    assert msg.startswith(f"{path}:1: {message}"), msg


def test_error_later_record_in_other_format(tmp_path):
    conv = json.dumps(RECORDS["conversational"][1])
    path = write_jsonl_lines(tmp_path, [GOOD, conv])
    msg = error_of(load_pairs, path)
    assert msg == f"{path}:2: field 'prompt' must be a string, got list (a list of messages is the conversational format)"
    path = write_jsonl_lines(tmp_path, [GOOD])
    msg = error_of(load_pairs, path, format="conversational")
    assert msg == (f"{path}:1: field 'prompt' must be a list of messages, got string "
                   "(a text prompt is the standard format)")


# --------------------------------------------------------------------------- detect_format


def test_detect_format():
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}, "w") == "standard"
    assert detect_format({"prompt": [], "chosen": [], "rejected": []}, "w") == "conversational"
    assert detect_format({"chosen": [], "rejected": []}, "w") == "conversational"
    assert detect_format({"instruction": "i", "chosen": "a", "rejected": "b"}, "w") == "alpaca"
    assert detect_format({"conversations": [], "chosen": {}, "rejected": {}}, "w") == "sharegpt"
    assert set(FORMATS) == {"standard", "conversational", "alpaca", "sharegpt"}
    assert error_of(detect_format, ["x"], "f.jsonl:3") == "f.jsonl:3: expected an object with fields, got list"


# --------------------------------------------------------------------------- split_eval


def _pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(f"p{i}", "a", "b", f"f:{i}") for i in range(n)]


def test_split_eval_sizes_and_determinism():
    pairs = _pairs(100)
    train, held = split_eval(pairs, 0.1, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert split_eval(pairs, 0.1, seed=3) == (train, held)
    assert split_eval(pairs, 0.1, seed=4)[1] != held
    assert sorted(p.source for p in train + held) == sorted(p.source for p in pairs)
    assert train == [p for p in pairs if p in train]  # input order kept
    assert len(split_eval(_pairs(10), 0.26, 0)[1]) == 3
    assert len(split_eval(_pairs(10), 0.01, 0)[1]) == 1  # at least one when fraction > 0
    assert len(split_eval(_pairs(2), 0.9, 0)[1]) == 1  # training keeps at least one
    assert split_eval(_pairs(5), 0.0, 0) == (_pairs(5), [])
    assert "eval_split 0.5 holds out no pair" in error_of(split_eval, _pairs(1), 0.5, 0)  # nothing to evaluate
    assert split_eval(_pairs(1), 0.0, 0) == (_pairs(1), [])
    assert split_eval([], 0.5, 0) == ([], [])


def test_split_eval_bad_fraction():
    assert "eval fraction must be from 0 up to (not including) 1, got 1.5" in error_of(split_eval, _pairs(3), 1.5, 0)
    assert "got -0.1" in error_of(split_eval, _pairs(3), -0.1, 0)


# --------------------------------------------------------------------------- issue 14: bad input, one line


def test_require_eval_pairs(chat_tokenizer):
    from preftune.data import require_eval_pairs
    from preftune.templates import tokenize_pairs

    require_eval_pairs({"total": 3, "kept": 1, "dropped_truncated": 2, "dropped_identical": 0}, "e.jsonl")
    require_eval_pairs({"total": 0, "kept": 0, "dropped_truncated": 0, "dropped_identical": 0}, "e.jsonl")
    same = [PreferencePair("q", "Same.", "Same.", "e.jsonl:1"), PreferencePair("r", "A.", "A.", "e.jsonl:2")]
    _, stats = tokenize_pairs(same, chat_tokenizer, max_length=64)
    assert error_of(require_eval_pairs, vars(stats), "e.jsonl", 64) == (
        "e.jsonl: no usable eval pair: 2 loaded, 0 dropped by truncation (max_length=64), 2 with chosen == rejected"
    )


def test_csv_quote_that_closes_rows_later(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('prompt,chosen,rejected\nQ1,a,b\n"Q2,a,b\nQ3,a",b\nQ4,a,b\n')
    assert error_of(load_pairs, path) == (
        f"{path}:3: row has 2 cells but the header has 3 columns; a quoted cell spans 2 lines (lines 3-4): "
        "is a quote unclosed?"
    )


def test_csv_stray_quote_in_a_cell_is_text(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('prompt,chosen,rejected\nA 12" pizza?,Yes.,No.\n"Quoted, ""really""",a,b\n')
    assert core(load_pairs(path)) == [('A 12" pizza?', "Yes.", "No."), ('Quoted, "really"', "a", "b")]


def test_strict_json_keeps_valid_files(tmp_path):
    rows = [{"prompt": "p\u00e9 \ud83d\ude00", "chosen": "a" * 10, "rejected": "b", "n": 10**30, "f": 1e300}]
    for kind in ("jsonl", "json"):
        path = write(tmp_path, kind, rows)
        assert core(load_pairs(path)) == [("p\u00e9 \U0001f600", "a" * 10, "b")]  # a surrogate pair is one char
