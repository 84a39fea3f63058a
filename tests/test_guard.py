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
