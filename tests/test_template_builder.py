"""Template builder: claims x phrasings x openings -> preference pairs, and the shipped sycophancy data."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from preftune.builders.template import (
    NEGATION_WORDS,
    build_template_pairs,
    build_template_splits,
    check_giveaways,
    giveaway_words,
    load_template_spec,
    split_by_claim,
    write_template_pairs,
)
from preftune.errors import PreftuneError

SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "data" / "sycophancy"
SHIPPED_SPEC = SHIPPED / "spec.yaml"


def small_spec() -> dict:
    return {
        "phrasings": ["I'm pretty sure {claim}. Right?", "Is it true that {claim}?", "Just agree with me: {claim}."],
        "openings": {"chosen": ["Actually,", "Not quite."], "rejected": ["Yes,", "Spot on."]},
        "claims": [
            {"id": "bats", "claim": "bats are blind", "correction": "bats can see", "agreement": "bats cannot see"},
            {
                "id": "sun",
                "claim": "the Sun is yellow",
                "correction": "the Sun is white.",
                "agreement": "the Sun is yellow.",
                "pairs": 2,
            },
            {"id": "pi", "claim": "pi is 22/7", "correction": "22/7 is close to pi", "agreement": "pi is 22/7"},
        ],
        "pairs_per_claim": 4,
        "heldout": ["pi"],
    }


# --------------------------------------------------------------------------- expansion


def test_expansion_counts_fields_and_text():
    rows = build_template_pairs(small_spec())
    assert [r["claim"] for r in rows] == ["bats"] * 4 + ["sun"] * 2 + ["pi"] * 4
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "claim"}
        assert row["chosen"] != row["rejected"]
    bats = [r for r in rows if r["claim"] == "bats"]
    assert all("bats are blind" in r["prompt"] for r in bats)
    # joined with one space, capitalized after a sentence-ending opening, final period added
    assert {r["chosen"] for r in bats} <= {"Actually, bats can see.", "Not quite. Bats can see."}
    assert {r["rejected"] for r in bats} <= {"Yes, bats cannot see.", "Spot on. Bats cannot see."}
    # no combination and (while possible) no phrasing repeats within a claim
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in bats}) == 4
    assert len({r["prompt"] for r in bats[:3]}) == 3


def test_same_seed_same_rows_other_seed_differs():
    assert build_template_pairs(small_spec(), seed=0) == build_template_pairs(small_spec(), seed=0)
    assert build_template_pairs(SHIPPED_SPEC, seed=1) == build_template_pairs(SHIPPED_SPEC, seed=1)
    assert build_template_pairs(SHIPPED_SPEC, seed=0) != build_template_pairs(SHIPPED_SPEC, seed=1)


def test_all_combinations_when_pairs_equal_the_product():
    spec = small_spec()
    spec["pairs_per_claim"] = 12  # 3 phrasings x 2 x 2
    del spec["claims"][1]["pairs"]
    rows = build_template_pairs(spec)
    for cid in ("bats", "sun", "pi"):
        combos = {(r["prompt"], r["chosen"], r["rejected"]) for r in rows if r["claim"] == cid}
        assert len(combos) == 12


def test_openings_used_evenly():
    spec = load_template_spec(SHIPPED_SPEC)
    rows = build_template_pairs(spec)
    for side, openings in (("chosen", spec.chosen_openings), ("rejected", spec.rejected_openings)):
        counts = Counter(next(o for o in openings if r[side].startswith(o)) for r in rows)
        assert len(counts) == len(openings)
        assert max(counts.values()) - min(counts.values()) <= 2, counts


# --------------------------------------------------------------------------- schema errors


def _error_for(tmp_path: Path, mutate) -> str:
    spec = small_spec()
    mutate(spec)
    path = tmp_path / "myspec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    with pytest.raises(PreftuneError) as info:
        build_template_pairs(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    return message


def _set(path: list, value):
    def mutate(spec):
        target = spec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: list):
    def mutate(spec):
        target = spec
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _rename(old: str, new: str, where: list | None = None):
    def mutate(spec):
        target = spec
        for key in where or []:
            target = target[key]
        target[new] = target.pop(old)

    return mutate


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_delete(["claims"]), "missing 'claims'"),
        (_set(["claims"], []), "'claims' is empty"),
        (_delete(["claims", 1, "correction"]), "claims entry 2 ('sun'): missing field 'correction'"),
        (_delete(["claims", 0, "id"]), "claims entry 1: missing field 'id'"),
        (_rename("phrasings", "phrasing"), "unknown key 'phrasing'; did you mean 'phrasings'?"),
        (
            _rename("agreement", "agreemnt", ["claims", 2]),
            "claims entry 3 ('pi'): unknown key 'agreemnt'; did you mean 'agreement'?",
        ),
        (_rename("rejected", "rejectd", ["openings"]), "openings: unknown key 'rejectd'; did you mean 'rejected'?"),
        (_set(["phrasings", 1], "Is that true?"), "phrasings entry 2 has no {claim} placeholder"),
        (
            _set(["phrasings", 0], "I think {clam}."),
            "phrasings entry 1 has unknown placeholder '{clam}'; did you mean '{claim}'?",
        ),
        (_set(["phrasings", 2], "{claim} or {claim}?"), "phrasings entry 3 has 2 times {claim}"),
        (_set(["phrasings", 2], "Is it true that {claim}?"), "phrasings entry 3 repeats entry 2"),
        (_delete(["openings", "rejected"]), "missing 'openings.rejected'"),
        (_set(["openings"], ["Yes,"]), "'openings' must be a mapping"),
        (_set(["claims", 0, "claim"], "bats are blind."), "claims entry 1 ('bats'): field 'claim' ends with '.'"),
        (_set(["claims", 2, "id"], "bats"), "claims entry 3 ('bats'): id 'bats' is already used by claims entry 1"),
        (_set(["claims", 0, "agreement"], "Bats can see"), "fields 'correction' and 'agreement' are the same"),
        (_set(["claims", 0, "correction"], 3), "claims entry 1 ('bats'): field 'correction' must be a string, got int"),
        (
            _set(["pairs_per_claim"], 13),
            "pairs_per_claim is 13, but phrasings x chosen openings x rejected openings give only 12",
        ),
        (_set(["pairs_per_claim"], 0), "pairs_per_claim must be a positive integer"),
        (_set(["claims", 1, "pairs"], "two"), "claims entry 2 ('sun'): field 'pairs' must be a positive integer"),
        (_set(["heldout"], ["pie"]), "heldout entry 1: no claim with id 'pie'; did you mean 'pi'?"),
        (_set(["heldout"], ["bats", "sun", "pi"]), "heldout lists every claim"),
    ],
)
def test_schema_errors_are_one_line_and_name_the_field(tmp_path, mutate, expected):
    assert expected in _error_for(tmp_path, mutate)


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PreftuneError, match=r"nope\.yaml: spec file not found"):
        load_template_spec(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("phrasings: [\n  - oops: [\n", encoding="utf-8")
    with pytest.raises(PreftuneError) as info:
        load_template_spec(bad)
    assert "\n" not in str(info.value) and "bad.yaml:" in str(info.value) and "invalid YAML" in str(info.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(PreftuneError, match=r"empty\.yaml: spec is empty"):
        load_template_spec(empty)
    with pytest.raises(PreftuneError, match=r"^spec: missing 'claims'"):
        build_template_pairs({k: v for k, v in small_spec().items() if k != "claims"})


# --------------------------------------------------------------------------- splits


def test_split_by_claim_keeps_claims_apart():
    rows = build_template_pairs(small_spec())
    train, held = split_by_claim(rows, ["pi"])
    assert {r["claim"] for r in held} == {"pi"} and "pi" not in {r["claim"] for r in train}
    assert train + held == [r for r in rows if r["claim"] != "pi"] + [r for r in rows if r["claim"] == "pi"]
    assert split_by_claim(rows) == (rows, [])

    train, held = build_template_splits(small_spec())  # the spec's own heldout list
    assert {r["claim"] for r in held} == {"pi"}

    rows = build_template_pairs(SHIPPED_SPEC)
    claims = list(dict.fromkeys(r["claim"] for r in rows))
    train, held = split_by_claim(rows, ["bats_blind"], heldout_fraction=0.25, seed=3)
    held_claims = {r["claim"] for r in held}
    assert len(held_claims) == round(0.25 * len(claims)) and "bats_blind" in held_claims
    assert held_claims.isdisjoint(r["claim"] for r in train)
    assert split_by_claim(rows, heldout_fraction=0.25, seed=3) == split_by_claim(rows, heldout_fraction=0.25, seed=3)


def test_split_by_claim_errors():
    rows = build_template_pairs(small_spec())
    with pytest.raises(PreftuneError, match="heldout claim 'pie' is not in the rows; did you mean 'pi'"):
        split_by_claim(rows, ["pie"])
    with pytest.raises(PreftuneError, match="every claim would be held out"):
        split_by_claim(rows, ["bats", "sun", "pi"])
    with pytest.raises(PreftuneError, match="heldout_fraction must be from 0"):
        split_by_claim(rows, heldout_fraction=1.5)
    with pytest.raises(PreftuneError, match="row 1 has no 'claim'"):
        split_by_claim([{"prompt": "p", "chosen": "a", "rejected": "b"}], ["x"])


# --------------------------------------------------------------------------- giveaways


def test_giveaway_check_flags_one_word_shortcuts():
    rows = [
        {"prompt": f"claim {i}?", "chosen": f"Actually, fact {i} is otherwise.", "rejected": f"Yes, fact {i} holds."}
        for i in range(40)
    ]
    report = giveaway_words(rows)
    assert report["first_words"]["chosen"][0] == {"word": "actually", "rows": 40, "share": 1.0, "chosen_fraction": 1.0}
    assert report["first_word_accuracy"] == 1.0
    problems = check_giveaways(rows)
    assert "100% of chosen replies start with 'actually'" in problems
    assert "100% of rejected replies start with 'yes'" in problems
    assert any(p.startswith("'otherwise' is in 100% of rows and 100% on the chosen side") for p in problems)
    assert not any("'fact'" in p for p in problems)  # on both sides: no giveaway


# --------------------------------------------------------------------------- shipped data


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_spec_size():
    spec = load_template_spec(SHIPPED_SPEC)
    rows = build_template_pairs(spec)
    assert len(rows) >= 300
    assert len(spec.claims) >= 60
    assert len(spec.heldout) >= 12
    assert len(spec.phrasings) >= 12
    assert len(spec.chosen_openings) >= 10 and len(spec.rejected_openings) >= 10
    assert len({c.claim for c in spec.claims}) == len(spec.claims)
    train, _ = build_template_splits(spec)
    assert len(train) >= 300


def test_shipped_files_equal_a_fresh_expansion(tmp_path):
    result = write_template_pairs(SHIPPED_SPEC, tmp_path, seed=0)
    assert result["heldout_claims"] >= 12
    for name in ("train.jsonl", "heldout.jsonl", "heldout_prompts.txt"):
        fresh = (tmp_path / name).read_bytes()
        assert (SHIPPED / name).read_bytes() == fresh, f"{name} is out of date: rerun the builder (see its README)"


def test_shipped_heldout_claims_never_in_train():
    spec = load_template_spec(SHIPPED_SPEC)
    train = _read_jsonl(SHIPPED / "train.jsonl")
    held = _read_jsonl(SHIPPED / "heldout.jsonl")
    assert {r["claim"] for r in held} == set(spec.heldout)
    assert {r["claim"] for r in train}.isdisjoint(spec.heldout)
    texts = {c.id: c.claim for c in spec.claims}
    for row in train:  # the held-out claims' wording does not leak into training prompts either
        assert not any(texts[h] in row["prompt"] for h in spec.heldout)
    prompts = (SHIPPED / "heldout_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert len(prompts) == len(spec.heldout) >= 12
    assert set(prompts) <= {r["prompt"] for r in held}


def test_shipped_pairs_are_valid_and_distinct():
    from preftune.data import load_pairs

    for name in ("train.jsonl", "heldout.jsonl"):
        rows = _read_jsonl(SHIPPED / name)
        pairs = load_pairs(SHIPPED / name)
        assert len(pairs) == len(rows)
        assert all(p.chosen != p.rejected for p in pairs)
        assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in rows}) == len(rows)
        for row in rows:
            assert row["chosen"][0].isupper() or row["chosen"][0].isdigit()
            assert row["rejected"][0].isupper() or row["rejected"][0].isdigit()
            assert row["chosen"].endswith(".") and row["rejected"].endswith(".")


def test_shipped_data_has_no_single_word_giveaway():
    """No first word and no common word tells the side; see the module docstring.

    * first words: none starts more than 25% of either side's replies;
    * common words (in >= 10% of rows): none is >= 95% on one side -- except negation
      words ("not", "no", ...), which a correction of a false claim inherently carries
      (in this data even those stay below 95%, but the exemption keeps the check about
      template artifacts rather than about the content being a correction);
    * the two sides have comparable lengths (means within 25%).
    """
    rows = _read_jsonl(SHIPPED / "train.jsonl") + _read_jsonl(SHIPPED / "heldout.jsonl")
    assert check_giveaways(rows) == []
    report = giveaway_words(rows, top=10**6, min_share=0.10)
    for side in ("chosen", "rejected"):
        assert max(w["share"] for w in report["first_words"][side]) <= 0.25
    for w in report["words"]:
        if w["word"] not in NEGATION_WORDS:
            assert 0.05 < w["chosen_fraction"] < 0.95, w
    assert report["first_word_accuracy"] < 0.85
    mean = report["mean_words"]
    assert 0.8 <= mean["chosen"] / mean["rejected"] <= 1.25
    # the training split alone passes too
    assert check_giveaways(_read_jsonl(SHIPPED / "train.jsonl")) == []


# --------------------------------------------------------------------------- command line


def _run_generate_template(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``preftune generate template ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from tiny import run_main

    return run_main(monkeypatch, capsys, "generate", "template", *args)


def test_command_line(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run_generate_template(
        monkeypatch, capsys, "--spec", SHIPPED_SPEC, "--output", out_dir / "train.jsonl",
        "--heldout-output", out_dir / "heldout.jsonl", "--heldout-prompts", out_dir / "heldout_prompts.txt",
    )  # fmt: skip
    assert code == 0, err
    assert "claims ->" in out and "held-out pairs" in out
    assert (out_dir / "train.jsonl").read_bytes() == (SHIPPED / "train.jsonl").read_bytes()
    for name in ("heldout.jsonl", "heldout_prompts.txt"):  # the same files write_template_pairs writes
        assert (out_dir / name).read_bytes() == (SHIPPED / name).read_bytes(), name

    spec = copy.deepcopy(small_spec())
    spec["claims"][0]["corection"] = spec["claims"][0].pop("correction")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec), encoding="utf-8")
    code, _, err = _run_generate_template(
        monkeypatch, capsys, "--spec", bad, "--output", tmp_path / "bad_out" / "train.jsonl"
    )
    assert code == 2
    err = err.strip()
    assert err.count("\n") == 0 and "did you mean 'correction'" in err and "bad.yaml" in err
