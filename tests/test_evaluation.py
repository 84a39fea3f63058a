"""Evaluation: pair accuracies against an independent loop, before/after answers, reports."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from torch import nn

import tiny
from preftune.errors import PreftuneError
from preftune.evaluation import compare_generations, pair_scores, report_markdown, run_eval
from preftune.generation import generate
from preftune.modeling import Reference
from preftune.templates import tokenize_pair
from preftune.types import PreferencePair



PAIRS = [
    PreferencePair("What is the capital of Spain?", "Madrid is the capital of Spain.", "Paris.", "p:1"),
    PreferencePair("Hello, how are you today?", "I am fine, thank you.", "The cat sat on the mat.", "p:2"),
    PreferencePair(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Water boils at?"}],
        "One hundred degrees Celsius at sea level.",
        "Zero.",
        "p:3",
    ),
    PreferencePair("The quick brown fox", "jumps over the lazy dog!", "sat on the mat and looked at the dog.", "p:4"),
    PreferencePair("Is Berlin the capital of France?", "No, Paris is.", "I think you are right.", "p:5"),
]


@pytest.fixture(scope="module")
def policy(chat_tokenizer):
    return tiny.make_model(chat_tokenizer, seed=0)


@pytest.fixture(scope="module")
def reference(chat_tokenizer):
    return tiny.make_model(chat_tokenizer, seed=1)


def loop_logps(model, tokenizer, pair, system_prompt=None):
    """Independent check: one unpadded forward per sequence, sum of completion log-probs."""
    tp = tokenize_pair(pair, tokenizer, system_prompt=system_prompt)
    out = []
    for completion in (tp.chosen_ids, tp.rejected_ids):
        ids = tp.prompt_ids + completion
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        total = sum(float(logp[t - 1, ids[t]]) for t in range(len(tp.prompt_ids), len(ids)))
        out += [total, len(completion)]
    return out  # chosen logp, chosen tokens, rejected logp, rejected tokens


def test_pair_scores_match_an_independent_loop(chat_tokenizer, policy, reference):
    result = pair_scores(policy, chat_tokenizer, PAIRS, reference=reference, batch_size=2, beta=0.2)
    assert result["pairs"] == result["scored"] == len(PAIRS)
    pol = [loop_logps(policy, chat_tokenizer, p) for p in PAIRS]
    ref = [loop_logps(reference, chat_tokenizer, p) for p in PAIRS]
    for row, (pc, nc, pr, nr), (rc, _, rr, _) in zip(result["per_pair"], pol, ref):
        assert row["chosen_logps"] == pytest.approx(pc, abs=1e-3)
        assert row["rejected_logps"] == pytest.approx(pr, abs=1e-3)
        assert (row["chosen_tokens"], row["rejected_tokens"]) == (nc, nr)
        assert row["ref_chosen_logps"] == pytest.approx(rc, abs=1e-3)
    n = len(PAIRS)
    assert result["policy"]["accuracy_sum"] == pytest.approx(sum(pc > pr for pc, _, pr, _ in pol) / n)
    assert result["policy"]["accuracy_mean"] == pytest.approx(sum(pc / nc > pr / nr for pc, nc, pr, nr in pol) / n)
    assert result["reference"]["accuracy_sum"] == pytest.approx(sum(rc > rr for rc, _, rr, _ in ref) / n)
    diffs = [(p[0] - r[0]) - (p[2] - r[2]) for p, r in zip(pol, ref)]
    assert result["reward_accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / n)
    assert result["reward_margin"] == pytest.approx(0.2 * sum(diffs) / n, abs=1e-3)
    assert result["beta"] == 0.2
    assert result["policy"]["chosen_logps"] == pytest.approx(sum(p[0] for p in pol) / n, abs=1e-3)
    # batch size does not change anything
    again = pair_scores(policy, chat_tokenizer, PAIRS, reference=reference, batch_size=8, beta=0.2)
    assert again["policy"] == pytest.approx(result["policy"])


def test_policy_as_its_own_reference_has_zero_reward_accuracy(chat_tokenizer, policy):
    result = pair_scores(policy, chat_tokenizer, PAIRS, reference=policy)
    assert result["reward_accuracy"] == 0.0  # ties are not wins (TRL's strict >)
    assert result["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert "reference" not in pair_scores(policy, chat_tokenizer, PAIRS[:1])


def test_reference_as_a_path_and_as_a_lora_reference(chat_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    by_path = pair_scores(base, chat_tokenizer, PAIRS, reference=tiny_model_dir)
    assert by_path["reward_accuracy"] == 0.0 and by_path["reward_margin"] == pytest.approx(0.0, abs=1e-5)

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules="all-linear")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # move the policy away from its base
    result = pair_scores(lora, chat_tokenizer, PAIRS, reference=Reference(lora, None))
    assert result["reference"]["chosen_logps"] == pytest.approx(by_path["policy"]["chosen_logps"], abs=1e-3)
    assert result["policy"]["chosen_logps"] != pytest.approx(result["reference"]["chosen_logps"], abs=1e-2)


class UnigramLM(nn.Module):
    """Every position predicts the same fixed distribution: log p(completion) is a sum of unigram terms."""

    def __init__(self, logits):
        super().__init__()
        self.table = nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table.expand(*input_ids.shape, -1).clone())


def test_sum_and_mean_accuracy_disagree_on_length(chat_tokenizer):
    tok = chat_tokenizer
    chosen, rejected = "the the the the the the the the the the", "dog"
    logits = torch.zeros(len(tok))
    for t in tok(chosen, add_special_tokens=False)["input_ids"]:
        logits[t] = 8.0  # each chosen token is likely...
    logits[tok.convert_tokens_to_ids("<|im_end|>")] = 8.0
    for t in tok(rejected, add_special_tokens=False)["input_ids"]:
        logits[t] = 5.0  # ...the rejected token less so, but it is one token against ten
    pair = PreferencePair("Say something.", chosen, rejected)
    result = pair_scores(UnigramLM(logits), tok, [pair])
    row = result["per_pair"][0]
    assert row["chosen_tokens"] > 3 * row["rejected_tokens"]
    assert row["chosen_logps"] < row["rejected_logps"]  # the long reply loses on the sum...
    # ...but wins per token
    assert row["chosen_logps"] / row["chosen_tokens"] > row["rejected_logps"] / row["rejected_tokens"]
    assert result["policy"]["accuracy_sum"] == 0.0 and result["policy"]["accuracy_mean"] == 1.0


def test_dropped_pairs_are_counted(chat_tokenizer, policy):
    pairs = PAIRS[:2] + [PreferencePair("Hi", "Same.", "Same.")]
    result = pair_scores(policy, chat_tokenizer, pairs)
    assert (result["pairs"], result["scored"], result["dropped_identical"]) == (3, 2, 1)
    with pytest.raises(PreftuneError, match="no pair left"):
        pair_scores(policy, chat_tokenizer, pairs[2:])


def test_compare_generations(chat_tokenizer, policy, reference):
    prompts = ["Hello", "What is the capital of Spain?"]
    rows = compare_generations(policy, reference, chat_tokenizer, prompts, max_new_tokens=6)
    assert [r["after"] for r in rows] == [g[0] for g in generate(policy, chat_tokenizer, prompts, max_new_tokens=6)]
    assert [r["before"] for r in rows] == [g[0] for g in generate(reference, chat_tokenizer, prompts, max_new_tokens=6)]
    for r in rows:
        assert r["prompt"] in prompts and 0 < r["after_tokens"] <= 6 and "degenerate" in r["after_flags"]
    alone = compare_generations(policy, None, chat_tokenizer, prompts[:1], max_new_tokens=3)
    assert alone[0]["before"] is None and alone[0]["before_flags"] is None


def test_report_markdown_escapes_and_warns():
    result = {
        "model": "out/final",
        "reference": "base",
        "scores": {
            "pairs": 4, "scored": 4, "dropped_identical": 0, "dropped_truncated": 0,
            "policy": {"accuracy_sum": 1.0, "accuracy_mean": 0.75}, "reference": {"accuracy_sum": 0.25},
            "reward_accuracy": 1.0, "reward_margin": 0.5, "beta": 0.1,
        },
        "generations": [
            {"prompt": "Who are you?", "before": "I'm SmolLM | an AI.\nHi", "after": "Deep deep Deep Deep",
             "before_flags": {"degenerate": False}, "after_flags": {"runaway": True, "degenerate": True}},
        ],
    }  # fmt: skip
    md = report_markdown(result)
    assert "| accuracy (summed log-prob) | 1.000 | 0.250 |" in md
    assert "| accuracy (mean log-prob per token) | 0.750 | - |" in md
    assert "implicit reward accuracy | 1.000" in md and "reward margin (beta=0.1) | 0.500" in md
    assert "I'm SmolLM \\| an AI.<br>Hi" in md
    assert "Deep deep Deep Deep **[runaway]**" in md and "**Warning:** 1 of 1" in md
    assert report_markdown({"model": "m"}).startswith("# Evaluation")


def test_run_eval_writes_eval_json_and_prints_tables(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in PAIRS if isinstance(p.prompt, str)))  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nWhat is the capital of Spain?\n")
    console = Console(record=True, width=160)
    result = run_eval(tiny_model_dir, data, tiny_model_dir, prompts, tmp_path / "ev", max_new_tokens=4, console=console)
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["scores"]["scored"] == len(PAIRS) - 1 and len(saved["generations"]) == 2
    assert saved["scores"]["policy"]["accuracy_sum"] == pytest.approx(result["scores"]["policy"]["accuracy_sum"])
    assert saved["scores"]["reward_accuracy"] == 0.0  # the model is its own reference
    assert all(g["before"] == g["after"] for g in saved["generations"])
    text = console.export_text()
    assert "accuracy (summed log-prob)" in text and "before (reference)" in text and "eval.json" in text
    assert not math.isnan(saved["scores"]["policy"]["accuracy_mean"])


def test_run_eval_user_errors(tiny_model_dir, tmp_path):
    with pytest.raises(PreftuneError, match="nothing to evaluate"):
        run_eval(tiny_model_dir)
    with pytest.raises(PreftuneError, match="not found"):
        run_eval(tiny_model_dir, prompts_path=tmp_path / "missing.txt")
