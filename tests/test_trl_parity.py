"""Parity with TRL 1.16's DPOTrainer on the same tiny model and data.

Plain-text pairs, a tokenizer without chat template, all pairs in one batch, same lr,
linear schedule without warmup, clipping 1.0, AdamW defaults, fp32, dropout off:
the first three steps' logged loss, rewards/*, logps/* and grad_norm must agree within 1e-4.
"""

import copy
import json

import pytest
import torch

import tiny

trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "The cat sat on", "chosen": " the mat.", "rejected": " the dog and looked at the fox."},
    {"prompt": "What is the capital of Spain?", "chosen": " Madrid is the capital.", "rejected": " Paris."},
    {"prompt": "Water boils at", "chosen": " one hundred degrees Celsius.", "rejected": " ten degrees."},
    {"prompt": "Hello, how are you", "chosen": " today? I am fine, thank you.", "rejected": " ?"},
]
COMPARED = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]  # fmt: skip
LR = 5e-3  # large enough that three steps move the metrics


def run_trl(model, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        per_device_train_batch_size=len(PAIRS),
        max_steps=3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=False,
        fp16=False,
        use_cpu=True,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=1024,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


def run_preftune(model_dir, tmp_path, fast_path=True):
    from preftune import train

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    train(
        {
            "model_name_or_path": model_dir,
            "finetuning_type": "full",
            "train_file": str(data),
            "learning_rate": LR,
            "lr_scheduler_type": "linear",
            "max_grad_norm": 1.0,
            "per_device_train_batch_size": len(PAIRS),
            "max_steps": 3,
            "logging_steps": 1,
            "beta": 0.1,
            "loss_type": "sigmoid",
            "output_dir": str(tmp_path / "preftune"),
            "progress": False,
            "seed": 0,
            "fast_path": fast_path,
            "bf16": False,  # as TRL's run above
            # TRL computes the reference on the fly; so do we here (at step 1 policy == reference exactly)
            "precompute_ref_log_probs": False,
        }
    )
    history = json.loads((tmp_path / "preftune" / "log_history.json").read_text())
    return [row for row in history if "loss" in row]


@pytest.fixture(scope="module")
def trl_rows(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trl")
    model_dir = tiny.save_tiny(tmp_path / "model", chat_template=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model_dir, run_trl(model, tokenizer, tmp_path)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "padded"])
def test_first_three_steps_match_trl(trl_rows, tmp_path, fast_path):
    model_dir, theirs = trl_rows
    ours = run_preftune(model_dir, tmp_path, fast_path)
    assert len(theirs) == 3 and len(ours) == 3
    for step, (a, b) in enumerate(zip(theirs, ours), start=1):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-4), f"step {step} {key}: preftune {b[key]} vs TRL {a[key]}"
    # the metrics moved: the comparison is not of three identical rows
    assert abs(ours[2]["loss"] - ours[0]["loss"]) > 1e-3
