"""The end of a run: held-out scores and answers before/after, written next to final/."""

from __future__ import annotations

import json
from typing import Any

from preftune import report
from preftune.distributed import Ranks, full_model_state
from preftune.memory import peak_gpu_mb, peak_rss_mb
from preftune.training.metrics import TOKENS_COUNTED
from preftune.modeling import Reference, load_causal_lm, save_final, weight_dtype


def write_final(cfg, model, reference, tokenizer, eval_pairs, eval_prompts, model_path, device, out,
                ranks: Ranks, *, sharded: bool) -> None:  # fmt: skip
    """The final report and final/ (adapter/ for LoRA), written by rank 0; an FSDP2-sharded model is
    gathered whole first (every rank takes part)."""
    if sharded:
        model = consolidated_model(model, cfg, model_path, device)
    if ranks.is_main:
        final_report(cfg, model, reference, tokenizer, eval_pairs, eval_prompts, model_path, device, out)
        save_final(model, tokenizer, out, is_lora=cfg.model.finetuning_type == "lora")  # merges in place


def consolidated_model(sharded, cfg, model_path, device):
    """The FSDP2-sharded policy whole again, as a plain model on rank 0 (None on the others; every
    rank must call this): what the report scores and final/ holds, one safetensors model."""
    state = full_model_state(sharded)
    if state is None:
        return None
    model = load_causal_lm(model_path, cfg.model, weight_dtype(cfg.model, device), device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    names = {name for name, _ in model.named_parameters()}
    if unexpected or any(k in names for k in missing):  # only a tied head's second name may be absent
        raise RuntimeError(f"consolidated weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model


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


def run_summary(cfg, log_history, data_stats, ranks: Ranks, device, *, runtime, train_seconds, tokens_seen,
                last_step, precision, ref_logps, plan) -> dict[str, Any]:  # fmt: skip
    """summary.json (every rank calls it: peak memory is the fullest rank's)."""
    peak_rss, peak_gpu = ranks.max([peak_rss_mb(), peak_gpu_mb(device) or 0.0])
    summary = report.build_summary(
        cfg, log_history, data_stats, runtime=runtime, train_seconds=train_seconds, tokens_seen=tokens_seen,
        peak_rss_mb=peak_rss, peak_gpu_mb=peak_gpu if device.type == "cuda" else None, total_steps=last_step,
        device=str(device), reference_mode=ref_logps.mode,
    )  # fmt: skip
    summary["tokens_counted"] = TOKENS_COUNTED
    summary["world_size"] = ranks.world_size
    if ranks.enabled:
        summary["distributed"] = cfg.training.distributed
    summary["precision"] = report.precision_record(precision)
    summary["reference_seconds"] = round(ref_logps.seconds, 2)
    summary.update(plan.summary())  # what the memory plan did
    return summary
