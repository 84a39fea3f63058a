"""Data -> template -> training across the formats and shipped configs."""

import json
from pathlib import Path

import pytest

from preftune import train
from preftune.config import load_config
from preftune.data import load_llamafactory, load_pairs
from preftune.templates import tokenize_pairs

REPO = Path(__file__).parent.parent

SYSTEM = "Be brief."
CONTENT = [("What is the capital of Spain?", "Madrid.", "Paris."), ("Hello, how are you?", "I am fine.", "Go away.")]


def write_formats(tmp_path):
    rows = {
        "conversational": [
            {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in CONTENT
        ],
        "implicit": [
            {"chosen": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                        {"role": "assistant", "content": c}],
             "rejected": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": r}]}
            for q, c, r in CONTENT
        ],
        "alpaca": [{"instruction": q, "input": "", "system": SYSTEM, "chosen": c, "rejected": r} for q, c, r in CONTENT],
        "sharegpt": [
            {"conversations": [{"from": "human", "value": q}], "system": SYSTEM,
             "chosen": {"from": "gpt", "value": c}, "rejected": {"from": "gpt", "value": r}}
            for q, c, r in CONTENT
        ],
    }  # fmt: skip
    paths = {}
    for name, records in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        paths[name] = path
    standard = tmp_path / "standard.json"
    standard.write_text(json.dumps([{"prompt": q, "chosen": c, "rejected": r} for q, c, r in CONTENT]))
    paths["standard"] = standard
    return paths


def test_same_content_any_format_same_token_ids(tmp_path, chat_tokenizer):
    paths = write_formats(tmp_path)
    ids = {}
    for name, path in paths.items():
        # a string prompt gets the system message from system_prompt
        system = SYSTEM if name == "standard" else None
        tokenized, stats = tokenize_pairs(load_pairs(path), chat_tokenizer, system_prompt=system)
        assert stats.kept == 2
        ids[name] = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in tokenized]
    first = ids.pop("standard")
    for name, value in ids.items():
        assert value == first, name


def test_bf16_autocast_trains_on_cpu(tiny_model_dir, tmp_path):
    paths = write_formats(tmp_path)
    common = dict(model_name_or_path=tiny_model_dir, train_file=str(paths["alpaca"]), max_steps=3,
                  logging_steps=1, learning_rate=1e-2, progress=False, per_device_train_batch_size=2)  # fmt: skip
    fp32 = train({**common, "output_dir": str(tmp_path / "fp32"), "bf16": False})
    bf16 = train({**common, "output_dir": str(tmp_path / "bf16"), "bf16": True})
    a, b = fp32["final_metrics"], bf16["final_metrics"]
    # same run at lower precision: close, not identical
    assert b["loss"] == pytest.approx(a["loss"], abs=0.02)
    assert b["logps/chosen"] == pytest.approx(a["logps/chosen"], rel=0.05)
    assert b["loss"] != a["loss"]


def test_seed_001_llamafactory_yaml_runs(tiny_model_dir, tmp_path):
    """The shipped LLaMA-Factory YAML goes through dataset_info.json, pref_* keys and bf16 as is;
    only the model is swapped for the tiny one (the real model runs in the real_model test)."""
    src = REPO / "examples" / "llamafactory_dpo.yaml"
    cfg = load_config(src, [f"model_name_or_path={tiny_model_dir}", f"output_dir={tmp_path / 'out'}",
                            "progress=false", "num_train_epochs=1"])  # fmt: skip
    assert cfg.data.dataset == "my_dpo_data" and cfg.model.lora_r == 64 and cfg.training.bf16
    pairs = load_llamafactory(cfg.data.dataset, cfg.data.dataset_dir)
    summary = train(cfg)
    assert summary["pairs"]["train_used"] == len(pairs) == 16
    assert summary["steps"] == 1  # 16 pairs = 1 x 16 accumulation
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.real_model
def test_default_model_short_run(tmp_path):
    summary = train(REPO / "examples" / "tiny.yaml", [f"output_dir={tmp_path / 'out'}", "max_steps=2",
                                                      "eval_steps=null", "progress=false"])  # fmt: skip
    metrics = summary["final_metrics"]
    assert summary["steps"] == 2 and metrics["logps/chosen"] < 0
    assert summary["pairs"]["train_used"] == 16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert model.config.num_hidden_layers == 30
