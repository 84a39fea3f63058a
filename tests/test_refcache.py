"""Cached reference log-probs equal the on-the-fly reference, and are reused across runs."""


import pytest
import torch
from safetensors.torch import load_file

from preftune import train
from preftune.refcache import fingerprint_reference
from test_train import base_config, close_rows, rows

KEYS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"]


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_cached_reference_equals_on_the_fly(tiny_model_dir, tmp_path, monkeypatch, finetuning_type):
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    common = dict(finetuning_type=finetuning_type, max_steps=4, per_device_train_batch_size=3, eval_split=0.25,
                  eval_steps=2)  # fmt: skip
    fly = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "fly"),
                            precompute_ref_log_probs=False, **common))  # fmt: skip
    cached = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "cached"), **common))
    assert fly["reference"] == "on the fly" and cached["reference"].startswith("cached (computed")
    close_rows(rows(tmp_path / "fly"), rows(tmp_path / "cached"), KEYS, tol=1e-5)
    close_rows(rows(tmp_path / "fly", "eval_loss"), rows(tmp_path / "cached", "eval_loss"),
               ["eval_loss", "eval_rewards/margins"], tol=1e-5)  # fmt: skip
    # gradients included: the trained weights agree
    name = "final/model.safetensors"
    a, b = load_file(tmp_path / "fly" / name), load_file(tmp_path / "cached" / name)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_cache_is_reused_across_a_beta_sweep(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    first = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "b1"), max_steps=1, beta=0.1))
    second = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "b2"), max_steps=1, beta=0.5))
    assert first["reference"].startswith("cached (computed")
    assert second["reference"].startswith("cached (reused")
    # other data -> another key
    third = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "b3"), max_steps=1, system_prompt="Be brief."))
    assert third["reference"].startswith("cached (computed")
    assert len(list((tmp_path / "home" / "ref_logps").glob("*.safetensors"))) == 2


def test_reference_free_losses_use_no_reference(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    summary = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "s"), max_steps=1,
                                loss_type="simpo"))  # fmt: skip
    assert summary["reference"] == "none"
    assert not (tmp_path / "home" / "ref_logps").exists()


def test_fingerprint_sees_weights_not_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fp = fingerprint_reference(base)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=2, target_modules="all-linear"))  # fmt: skip
    assert fingerprint_reference(peft_model) == fp  # the adapter-disabled model is the base
    with torch.no_grad():
        base.lm_head.weight[0, 0] += 1e-3
    assert fingerprint_reference(base) != fp
