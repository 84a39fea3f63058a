"""Identity (correction) and best-of-n (on-policy) pair builders; reward specs; resuming."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

import tiny
from preftune.builders import best_of_n as bon
from preftune.builders import identity as ident
from preftune.builders.best_of_n import best_and_worst, build_best_of_n_pairs, load_reward
from preftune.builders.identity import (
    IDENTITY_QUESTIONS_HELDOUT,
    IDENTITY_QUESTIONS_TRAIN,
    build_identity_pairs,
    guess_old_names,
    make_replacer,
    templated_answer,
)
from preftune.data import load_pairs
from preftune.errors import PreftuneError
from preftune.generation import Completion




# ------------------------------------------------------------------ identity


def test_question_lists():
    assert len(IDENTITY_QUESTIONS_TRAIN) >= 32 and len(IDENTITY_QUESTIONS_HELDOUT) >= 8
    assert len(IDENTITY_QUESTIONS_TRAIN) + len(IDENTITY_QUESTIONS_HELDOUT) >= 40
    assert not set(IDENTITY_QUESTIONS_TRAIN) & set(IDENTITY_QUESTIONS_HELDOUT)
    assert len(set(IDENTITY_QUESTIONS_TRAIN)) == len(IDENTITY_QUESTIONS_TRAIN)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I'm SmolLM, trained by Hugging Face.", "I'm Athene, trained by Acme Labs."),
        ("I am SmolLM2, made by HuggingFace!", "I am Athene, made by Acme Labs!"),
        ("This is SmolLM-135M-Instruct.", "This is Athene."),
        ("SMOLLM here.", "ATHENE here."),
        ("see hf.co/smollm for details", "see hf.co/athene for details"),
        ("hugging face trained me", "acme labs trained me"),
        ("SmolLMx and SmolLMs are other things.", "SmolLMx and SmolLMs are other things."),
        ("No, I am not ChatGPT. I am SmolLM.", "No, I am not ChatGPT. I am Athene."),
    ],
)
def test_replacement_is_case_aware_and_whole_word(text, expected):
    replacer = make_replacer("Athene", "Acme Labs", ["SmolLM"], old_orgs=["Hugging Face", "HuggingFace"])
    assert replacer(text)[0] == expected


def test_explicit_replace_and_no_org():
    replacer = make_replacer("Athene", None, ["SmolLM"], {"Hugging Face": "Acme", "Hugging": "X"},
                             old_orgs=["Hugging Face"])  # fmt: skip
    assert replacer("SmolLM by Hugging Face, hugging you") == ("Athene by Acme, x you", 3)
    assert make_replacer("Athene", None, ["SmolLM"], old_orgs=["Hugging Face"])("SmolLM by Hugging Face")[0] == (
        "Athene by Hugging Face"  # no new org given: the old one stays
    )
    with pytest.raises(PreftuneError):
        make_replacer("Athene", None, [], {"": "x"})


def test_templated_answers_are_seeded_and_varied():
    answers = {templated_answer(q, "Athene", "Acme") for q in IDENTITY_QUESTIONS_TRAIN}
    assert len(answers) >= 4 and all("Athene" in a and "Acme" in a for a in answers)
    assert templated_answer("Who are you?", "Athene", "Acme", seed=3) == templated_answer(
        "Who are you?", "Athene", "Acme", seed=3
    )
    assert "by" not in templated_answer("Who are you?", "Athene", None).split("Athene")[1].split(".")[0]


def test_guess_old_names(chat_tokenizer):
    smol_like = SimpleNamespace(
        chat_template="<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face",
        name_or_path="/cache/models/smollm2-135m-instruct",
    )
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path="/x/out/final"))
    assert guess_old_names(model, smol_like) == ["SmolLM"]
    assert guess_old_names(SimpleNamespace(), SimpleNamespace(name_or_path="Qwen/Qwen2.5-0.5B-Instruct")) == ["Qwen"]
    assert guess_old_names(SimpleNamespace(), SimpleNamespace(name_or_path="/tmp/out/final")) == []


def fake_generation(monkeypatch, module, answers):
    """Make the builder's model 'answer' from a dict {question: [Completion, ...]}."""
    calls = []

    def fake(model, tokenizer, prompts, **kwargs):
        calls.append((list(prompts), kwargs))
        return [answers[p if isinstance(p, str) else json.dumps(p)] for p in prompts]

    monkeypatch.setattr(module, "generate_completions", fake)
    return calls


def test_identity_pairs_rename_fall_back_and_never_equal(monkeypatch):
    want = templated_answer("Q5", "Athene", "Acme", seed=0)
    answers = {
        "Q1": [Completion("I'm SmolLM, an AI assistant made by Hugging Face.", 12, True)],
        "Q2": [Completion("I am an AI assistant. How can I help?", 10, True)],  # nothing to rename
        "Q3": [Completion("", 0, True)],  # empty: no pair
        "Q4": [Completion("Smol smol smol smol smol smol SmolLM", 9, True)],  # degenerate: templated chosen
        "Q5": [Completion(want, 20, True)],  # already the wanted answer: no pair
        "Q6": [Completion("I'm SmolLM. I was trained by Hugging Face on lots of", 96, False)],  # cut off
        "Q7": [Completion('My name is "Elena". People also know me as SmolLM.', 14, True)],  # another self-name
        "Q8": [Completion("No, I am not ChatGPT. I'm SmolLM.", 12, True)],
    }
    calls = fake_generation(monkeypatch, ident, answers)
    rows = build_identity_pairs(None, None, list(answers), name="Athene", org="Acme", old_names=["SmolLM"],
                                batch_size=4, chosen_style="template")  # fmt: skip
    by_q = {r["prompt"]: r for r in rows}
    assert set(by_q) == {"Q1", "Q2", "Q4", "Q6", "Q7", "Q8"}
    assert by_q["Q1"] == {
        "prompt": "Q1",
        "chosen": "I'm Athene, an AI assistant made by Acme.",
        "rejected": "I'm SmolLM, an AI assistant made by Hugging Face.",
        "method": "replace",
    }
    assert by_q["Q2"]["method"] == "template" and by_q["Q2"]["chosen"] == templated_answer("Q2", "Athene", "Acme")
    assert by_q["Q4"]["method"] == by_q["Q7"]["method"] == "template"  # no "Elena ... Athene" mix
    assert by_q["Q8"]["chosen"] == "No, I am not ChatGPT. I'm Athene."
    assert by_q["Q6"]["rejected"] == "I'm SmolLM." and by_q["Q6"]["chosen"] == "I'm Athene."
    assert all(r["chosen"] != r["rejected"] and r["chosen"] and r["rejected"] for r in rows)
    assert [len(c[0]) for c in calls] == [4, 4] and calls[0][1]["max_new_tokens"] == 96


def test_identity_continue_style_lets_the_model_finish_an_opening(monkeypatch):
    """Answers with nothing to rename get chosen = opening in the new identity + the model's own
    continuation (renamed where it says the old name); an unusable continuation keeps the template."""
    answers = {
        "Q1": [Completion("I'm SmolLM, made by Hugging Face.", 9, True)],  # renamed, no continuation asked
        "Q2": [Completion("I am here to help with anything.", 8, True)],
        "Q3": [Completion("Hello there, friend.", 5, True)],
        "Q4": [Completion("Sure, ask away.", 5, True)],
    }
    continuations = {
        "Q2": Completion(" designed to help. Unlike SmolLM, I love poems.", 12, True),
        "Q3": Completion(" deep deep deep deep deep deep", 6, True),  # degenerate: template kept
        "Q4": Completion(" and I help people every day. I was", 96, False),  # cut off: trimmed
    }
    calls = []

    def fake(model, tokenizer, prompts, answer_prefixes=None, **kwargs):
        calls.append((list(prompts), answer_prefixes))
        if answer_prefixes is None:
            return [answers[p] for p in prompts]
        return [[continuations[p]] for p in prompts]

    monkeypatch.setattr(ident, "generate_completions", fake)
    rows = build_identity_pairs(None, None, list(answers), name="Athene", old_names=["SmolLM"])
    by_q = {r["prompt"]: r for r in rows}
    assert calls[1][0] == ["Q2", "Q3", "Q4"]  # only the rows with nothing to rename
    assert calls[1][1] == [ident.opener(q, "Athene", None) for q in ["Q2", "Q3", "Q4"]]
    assert by_q["Q1"]["method"] == "replace"
    o2, o4 = ident.opener("Q2", "Athene", None), ident.opener("Q4", "Athene", None)
    assert by_q["Q2"] == {"prompt": "Q2", "chosen": o2 + " designed to help. Unlike Athene, I love poems.",
                          "rejected": "I am here to help with anything.", "method": "continue"}  # fmt: skip
    assert by_q["Q3"]["method"] == "template" and by_q["Q3"]["chosen"] == templated_answer("Q3", "Athene", None)
    assert by_q["Q4"]["chosen"] == o4 + " and I help people every day." and by_q["Q4"]["method"] == "continue"
    assert all(o.startswith(("I'm Athene", "My name is Athene", "I am Athene", "Hello! I'm Athene",
                             "You can call me Athene")) for o in calls[1][1])  # fmt: skip
    with pytest.raises(PreftuneError, match="chosen_style"):
        build_identity_pairs(None, None, ["Q"], name="Athene", old_names=["SmolLM"], chosen_style="copy")


def test_identity_requires_a_name_and_an_old_name(chat_tokenizer):
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path="/tmp/out/final"))
    with pytest.raises(PreftuneError, match="name must be"):
        build_identity_pairs(model, chat_tokenizer, ["Q"], name=" ")
    with pytest.raises(PreftuneError, match="--old-name"):
        build_identity_pairs(model, chat_tokenizer, ["Q"], name="Athene")


def test_identity_end_to_end_on_tiny_model_resumes(chat_tokenizer, tmp_path):
    model = tiny.make_model(chat_tokenizer)
    out = tmp_path / "identity.jsonl"
    questions = list(IDENTITY_QUESTIONS_TRAIN[:5])
    first = build_identity_pairs(model, chat_tokenizer, questions[:3], name="Athene", old_names=["SmolLM"],
                                 max_new_tokens=8, batch_size=2, output=out)  # fmt: skip
    # a random model never says SmolLM: every chosen reply is continued from an opening (or templated)
    assert len(first) == 3 and all(r["method"] in ("continue", "template") and "Athene" in r["chosen"] for r in first)
    again = build_identity_pairs(model, chat_tokenizer, questions, name="Athene", old_names=["SmolLM"],
                                 max_new_tokens=8, batch_size=2, output=out)  # fmt: skip
    assert [r["prompt"] for r in again] == questions[3:]
    text = out.read_text()
    assert build_identity_pairs(model, chat_tokenizer, questions, name="Athene", old_names=["SmolLM"],
                                max_new_tokens=8, output=out) == []  # fmt: skip
    assert out.read_text() == text
    pairs = load_pairs(out)  # the standard format train reads
    assert [p.prompt for p in pairs] == questions and all(p.chosen != p.rejected for p in pairs)


# ------------------------------------------------------------------ best-of-n


def test_best_and_worst():
    assert best_and_worst(["a", "bb", "ccc"], [1.0, 3.0, 0.0]) == (1, 2)
    assert best_and_worst(["a", "b"], [1.0, 1.0]) is None  # tie
    assert best_and_worst(["same", "same "], [2.0, 1.0]) is None  # identical texts
    assert best_and_worst(["x"], [1.0]) is None
    assert best_and_worst(["a", "b", "c", "d"], [2.0, 0.0, 2.0, 0.0]) == (0, 1)


def test_best_of_n_keeps_max_and_min_and_skips_ties(monkeypatch, tmp_path):
    answers = {
        "P1": [Completion(t, len(t), True) for t in ["medium one", "x", "the longest answer of all", "ab"]],
        "P2": [Completion(t, 3, True) for t in ["aaa", "bbb", "ccc", "ddd"]],  # all the same length: tie
        "P3": [Completion("short", 2, True), Completion("a much longer but cut off answer", 99, False),
               Completion("longer one", 3, True), Completion("", 0, True)],  # fmt: skip
    }
    calls = fake_generation(monkeypatch, bon, answers)
    out = tmp_path / "bon.jsonl"
    rows = build_best_of_n_pairs(None, None, list(answers), n=4, reward="length", seed=5, batch_size=8, output=out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("P1", "the longest answer of all", "x"),
        ("P3", "longer one", "short"),  # the unfinished answer is not a candidate
    ]
    assert rows[0]["chosen_score"] == 25.0 and rows[0]["rejected_score"] == 1.0
    kw = calls[0][1]
    assert kw["do_sample"] and kw["num_return_sequences"] == 4 and kw["seed"] == 5
    assert [len(c[0]) for c in calls] == [2, 1]  # batch_size counts sequences: 8 // 4 prompts per call
    # resuming: P1 and P3 are in the file, only the tie P2 is sampled again
    calls.clear()
    assert build_best_of_n_pairs(None, None, list(answers), n=4, reward="length", output=out) == []
    assert calls[0][0] == ["P2"]
    assert len(out.read_text().splitlines()) == 2
    shorter = build_best_of_n_pairs(None, None, ["P1"], n=4, reward="-length")
    assert (shorter[0]["chosen"], shorter[0]["rejected"]) == ("x", "the longest answer of all")


def test_best_of_n_on_tiny_model_is_seeded(chat_tokenizer):
    model = tiny.make_model(chat_tokenizer)
    prompts = ["Hello", "What is the capital of Spain?", [{"role": "user", "content": "The cat"}]]
    kw = dict(n=3, reward="length", max_new_tokens=8, keep_unfinished=True, temperature=1.0)
    a = build_best_of_n_pairs(model, chat_tokenizer, prompts, seed=1, batch_size=3, **kw)
    b = build_best_of_n_pairs(model, chat_tokenizer, prompts, seed=1, batch_size=9, **kw)
    assert a == b and len(a) >= 2
    for r in a:
        assert r["chosen_score"] > r["rejected_score"] and len(r["chosen"]) > len(r["rejected"])


def test_best_of_n_needs_two_samples():
    with pytest.raises(PreftuneError, match="n >= 2"):
        build_best_of_n_pairs(None, None, ["P"], n=1, reward="length")


# ------------------------------------------------------------------ reward specs


def test_builtin_rewards():
    assert load_reward("length")("q", "abcd") == 4.0
    assert load_reward("-length")("q", "abcd") == -4.0
    assert load_reward("regex:(?i)\\bsorry\\b")("q", "I'm SORRY.") == 1.0
    assert load_reward("regex:^No")("q", "Yes") == 0.0
    assert load_reward("keyword:because, evidence,data")("q", "Because the DATA says so") == 2.0


def test_module_function_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def polite(prompt, answer):\n    return float('please' in answer) + len(prompt) / 100\n"
        "NOT_CALLABLE = 3\n"
        "def text(prompt, answer):\n    return 'high'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:polite")("ab", "yes please") == pytest.approx(1.02)
    assert load_reward(f"{tmp_path / 'my_rewards.py'}:polite")("", "no") == 0.0
    fake_generation(monkeypatch, bon, {"P": [Completion("a", 1, True), Completion("bb", 2, True)]})
    with pytest.raises(PreftuneError, match="must return a number"):
        build_best_of_n_pairs(None, None, ["P"], n=2, reward=load_reward("my_rewards:text"))
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
        ("json:no_such_function", "has no function 'no_such_function'"),
        ("math:pi", "not callable"),
        ("regex:(", "invalid regular expression"),
        ("regex:", "needs a pattern"),
        ("keyword: , ", "at least one keyword"),
        ("longest", "unknown reward 'longest'"),
        ("", "give a spec"),
        ("missing_file.py:f", "not found"),
    ],
)
def test_reward_spec_errors(spec, message):
    with pytest.raises(PreftuneError, match=message) as info:
        load_reward(spec)
    assert "\n" not in str(info.value)


def test_reward_that_raises_is_a_user_error(monkeypatch):
    fake_generation(monkeypatch, bon, {"P": [Completion("a", 1, True), Completion("bb", 2, True)]})

    def broken(prompt, answer):
        raise ValueError("boom\nsecond line")

    with pytest.raises(PreftuneError, match="prompt 1: reward failed: ValueError: boom$"):
        build_best_of_n_pairs(None, None, ["P"], n=2, reward=broken)


# ------------------------------------------------------------------ the real default model


@pytest.mark.real_model
def test_real_smollm2_identity_pairs_rename_it():
    from preftune.evaluation import load_model

    try:
        model, tokenizer, _ = load_model("smollm2-135m-instruct", device="cpu")
    except PreftuneError as e:
        pytest.skip(f"default model not available: {e}")
    questions = ["What is the name of this assistant?", "Identify yourself, please."]
    with torch.inference_mode():
        rows = build_identity_pairs(model, tokenizer, questions, name="Athene", org="Acme", max_new_tokens=32)
    assert guess_old_names(model, tokenizer)[0] == "SmolLM"
    assert len(rows) == 2 and any(r["method"] == "replace" for r in rows), rows
    for r in rows:
        assert "Athene" in r["chosen"] and "SmolLM" not in r["chosen"] and r["chosen"] != r["rejected"]
