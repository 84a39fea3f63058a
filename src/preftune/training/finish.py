"""The end of a run: held-out scores and answers before/after, written next to final/."""

from __future__ import annotations

import json
from typing import Any

from preftune import report
from preftune.modeling import Reference, load_causal_lm, weight_dtype


def final_report(cfg, model, reference, tokenizer, eval_pairs, eval_prompts, model_path, device, out) -> None:
    """Held-out pair accuracies and before/after answers of the original and the trained model:
    printed, and written to eval.json and report.md."""
    from preftune import evaluation

    if not eval_pairs and not eval_prompts:
        return
    if cfg.model.finetuning_type == "lora":
        before = Reference(model, None)  # the adapter-disabled policy is the original model
    elif reference is not None:
        before = reference.model
    else:  # the frozen copy was dropped after caching its log-probs: load the original again
        before = load_causal_lm(model_path, cfg.model, weight_dtype(cfg.model, device), device).eval()
    model.eval()
    result: dict[str, Any] = {"model": str(out / "final"), "reference": cfg.model.model_name_or_path}
    if eval_pairs:
        result["data"] = cfg.data.eval_file or f"eval_split {cfg.data.eval_split}"
        result["scores"] = evaluation.pair_scores(
            model, tokenizer, eval_pairs, reference=before, system_prompt=cfg.data.system_prompt,
            max_length=cfg.data.max_length, beta=cfg.loss.beta, batch_size=cfg.training.per_device_eval_batch_size,
        )  # fmt: skip
    if eval_prompts:
        result["prompts"] = cfg.data.eval_prompts
        result["generations"] = evaluation.compare_generations(
            model, before, tokenizer, eval_prompts, system_prompt=cfg.data.system_prompt,
            max_new_tokens=cfg.training.eval_max_new_tokens,
        )  # fmt: skip
    result["settings"] = {"beta": cfg.loss.beta, "max_new_tokens": cfg.training.eval_max_new_tokens}
    (out / "eval.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(evaluation.report_markdown(result))
    if cfg.training.progress:
        evaluation.print_tables(result, report.console)
