"""The collapse guard warns, stops, and keeps the last healthy weights."""

import torch
from safetensors.torch import load_file

from preftune import train
from preftune.generation import degeneration
from test_train import base_config


def test_degeneration_flags_seed_003_output():
    assert degeneration("Deep deep Deep Deep Deep deep")["degenerate"]
    assert not degeneration("I am Deep Qwen, an assistant made to help you.")["degenerate"]


def test_logp_collapse_stops_and_keeps_last_healthy_weights(tiny_model_dir, tmp_path):
    common = dict(finetuning_type="full", per_device_train_batch_size=2, lr_scheduler_type="constant",
                  learning_rate=5e-2, precompute_ref_log_probs=False)  # fmt: skip
    guarded = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "g"), max_steps=12, eval_steps=1,
                                stop_on_collapse=True, collapse_max_logp_drop=0.3, **common))  # fmt: skip
    stop = guarded["stopped_early"]
    assert stop is not None and "below the reference" in stop["reasons"][0]
    assert 1 <= stop["kept_step"] < stop["step"] < 12
    assert guarded["steps"] == stop["step"]
    # final/ holds exactly what an uninterrupted run of kept_step steps ends with
    plain = tmp_path / "plain"
    train(base_config(tiny_model_dir, tmp_path, output_dir=str(plain), max_steps=stop["kept_step"], **common))
    a = load_file(tmp_path / "g" / "final" / "model.safetensors")
    b = load_file(plain / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_without_stop_the_guard_only_warns(tiny_model_dir, tmp_path):
    summary = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "w"), max_steps=6, eval_steps=1,
                                finetuning_type="full", per_device_train_batch_size=2, lr_scheduler_type="constant",
                                learning_rate=5e-2, collapse_max_logp_drop=0.3))  # fmt: skip
    assert summary["stopped_early"] is None and summary["steps"] == 6
    assert summary["guard_warnings"] and "collapse guard" in summary["guard_warnings"][0]


def test_degenerate_answers_stop_training(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append(1)
        text = "A calm and ordinary answer." if len(calls) < 3 else "Deep deep Deep Deep Deep"
        return [[text] for _ in prompts]

    monkeypatch.setattr("preftune.guard.generate", fake_generate)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who are you?\nWhat is your name?\n")
    summary = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "d"), max_steps=8, eval_steps=2,
                                eval_prompts=str(prompts), stop_on_collapse=True, collapse_max_logp_drop=100.0))  # fmt: skip
    # baseline, step 2 healthy, step 4 degenerate
    assert summary["stopped_early"]["step"] == 4 and summary["stopped_early"]["kept_step"] == 2
    assert "degenerate" in summary["stopped_early"]["reasons"][0]


def test_a_warn_only_guard_keeps_no_copy_of_the_weights(tiny_model_dir):
    """Without stop_on_collapse nothing is restored, so no snapshot (a second copy of the
    weights in full fine-tuning) is held."""
    import pytest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.guard import CollapseGuard

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    guard = CollapseGuard(model, tokenizer, [], max_logp_drop=1.0, keep_healthy=False)
    assert guard.healthy_state is None
    assert guard.check(1).healthy and guard.healthy_state is None and guard.healthy_step == 1
    with pytest.raises(RuntimeError, match="no healthy weights"):
        guard.restore_healthy()
    kept = CollapseGuard(model, tokenizer, [], max_logp_drop=1.0)
    assert set(kept.healthy_state) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_retain_prompts_catch_a_model_that_changed_where_it_should_not(tiny_model_dir):
    """The guard answers retain prompts with the starting model, then measures the nats per token
    the policy loses on those answers: 0 for the same weights; large once the weights are scrambled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.guard import CollapseGuard

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["What is the capital of France?", "How do I boil an egg?"]
    guard = CollapseGuard(model, tokenizer, [], max_logp_drop=1.0, keep_healthy=False, retain_prompts=prompts,
                          max_retain_drop=0.1, max_new_tokens=8)  # fmt: skip
    assert guard.retain_answers and len(guard.retain_answers) == len(guard.retain_prompts) <= 2
    same = guard.check(1)
    assert same.healthy and abs(same.retain_logp_drop) < 1e-5
    assert same.row()["guard/retain_logp_drop"] == same.retain_logp_drop
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved = guard.check(2)
    assert moved.retain_logp_drop > 0.1 and not moved.healthy
    assert "retain prompts lost" in moved.reasons[0]


def test_answer_logps_sum_the_answer_tokens_and_end_of_turn(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.evaluation import answer_logps
    from preftune.templates import render_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    logps, tokens = answer_logps(model, tokenizer, ["Hi", "Name a colour."], ["Hello there.", "Blue"])
    for prompt, answer, lp, n in zip(["Hi", "Name a colour."], ["Hello there.", "Blue"], logps, tokens):
        prompt_ids = render_prompt(prompt, tokenizer)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=True,
                                             return_dict=False)  # fmt: skip
        assert full[: len(prompt_ids)] == prompt_ids
        answer_ids = full[len(prompt_ids) :]
        answer_ids = answer_ids[: answer_ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
        want = sum(logits[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(answer_ids))
        assert n == len(answer_ids) and abs(lp - want) < 1e-4


def test_a_newly_degenerate_answer_counts_even_when_another_one_recovered(tiny_model_dir, monkeypatch):
    """Seed 003's settings here: at the start one guard prompt already looped ("The infamous You ...");
    later that one read fine and "Identify yourself" became a row of emoji. Same count, still a collapse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.guard import CollapseGuard

    replies = iter([["You you you you you you", "I'm an assistant."], ["I'm an assistant.", "🌍" * 16]])
    monkeypatch.setattr("preftune.guard.generate", lambda model, tok, prompts, **kw: [[a] for a in next(replies)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    guard = CollapseGuard(model, tokenizer, ["Who made you?", "Identify yourself."], max_logp_drop=1.0)
    assert guard.baseline == 1
    verdict = guard.check(1)
    assert verdict.degenerate == 1 and not verdict.healthy
    assert "1 of 2 held-out answers degenerate where the starting model's were not" in verdict.reasons[0]


def test_retain_prompts_alone_are_answered_once_and_watched_for_degeneration(tiny_model_dir, monkeypatch):
    """No guard prompts, only retain prompts (message lists allowed): the starting model answers them
    in one generate call, and an answer that turns degenerate later stops the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.guard import CollapseGuard

    calls = []
    replies = iter([["Paris is the capital.", "Boil it for eight minutes."],
                    ["Paris is the capital.", "Boil boil boil boil boil"]])  # fmt: skip

    def fake_generate(model, tok, prompts, **kw):
        calls.append(list(prompts))
        return [[a] for a in next(replies)]

    monkeypatch.setattr("preftune.guard.generate", fake_generate)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    retain = ["What is the capital of France?", [{"role": "user", "content": "How do I boil an egg?"}]]
    guard = CollapseGuard(model, tokenizer, [], max_logp_drop=1.0, keep_healthy=False, retain_prompts=retain)
    assert len(calls) == 1 and guard.retain_answers == ["Paris is the capital.", "Boil it for eight minutes."]
    verdict = guard.check(1)
    assert not verdict.healthy and any("degenerate where the starting model's were not" in r for r in verdict.reasons)
