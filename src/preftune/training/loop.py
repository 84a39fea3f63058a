"""The DPO training recipe: one plain PyTorch loop, top to bottom.

1. config -> data -> token ids          (fails fast, before anything is written)
2. policy + reference, optimizer, the memory plan, the reference log-probs
3. for each optimizer step: micro-batches -> log-probs -> loss -> backward; clip; step
4. log, evaluate, guard, checkpoint; at the end write final/ and the reports
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from preftune import losses, report
from preftune.config import TrainConfig, load_config
from preftune.generation import load_prompts
from preftune.errors import RunStopped, TrainingDiverged
from preftune.guard import CollapseGuard
from preftune.memory import MemoryPlan, make_autocast, peak_gpu_mb, peak_rss_mb, resolve_precision
from preftune.modeling import build_policy_and_reference, load_tokenizer, resolve_device, resolve_model_path, save_final
from preftune.training.finish import final_report
from preftune.training.metrics import StepMetrics, evaluate, loss_params, pair_logps, sequence_tokens
from preftune.training.prepare import (
    build_guard, make_forward, precompute_reference_logps, precomputes_reference, prepare_data, reference_source,
    run_generate_step,
)  # fmt: skip
from preftune.training.state import (
    build_schedule, check_output_dir, clip_and_step, find_checkpoint, lock_output_dir, make_optimizer,
    make_scheduler, prune_checkpoints, restore_checkpoint, save_checkpoint,
)  # fmt: skip
from preftune.training.signals import StopSignals
from preftune.util import onednn_cache_capacity


def train(config: TrainConfig | dict | str | Path, overrides=None) -> dict[str, Any]:
    """Run DPO training; returns the summary written to ``summary.json``. The caller's logging
    verbosity, warning filters and environment are as they were afterwards."""
    cfg = load_config(config, overrides)
    with onednn_cache_capacity(), report.quiet_libraries(), ExitStack() as cleanup:
        return run_training(cfg, cleanup)


def run_training(cfg: TrainConfig, cleanup: ExitStack) -> dict[str, Any]:
    started = time.time()
    device = resolve_device(cfg.training.device)
    cfg, precision = resolve_precision(cfg, device)  # bf16/fp16 "auto" -> what this hardware runs fast
    t = cfg.training
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    # 1. data (all user mistakes surface here, before anything is written)
    out = check_output_dir(cfg)
    run_generate_step(cfg)
    checkpoint = find_checkpoint(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    tokenizer = load_tokenizer(cfg.model, model_path)
    prepared = prepare_data(cfg, tokenizer)
    eval_prompts = load_prompts(cfg.data.eval_prompts) if cfg.data.eval_prompts else []
    retain_prompts = load_prompts(cfg.data.retain_prompts) if cfg.data.retain_prompts else []
    report.print_data_stats(prepared.stats)
    report.print_precision(precision)

    # 2. policy + reference, optimizer, memory plan, reference log-probs
    need_ref = losses.needs_reference(cfg.loss_types)
    model, reference = build_policy_and_reference(cfg.model, model_path, device, need_ref)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t)
    schedule, steps_per_epoch = build_schedule(len(prepared.train), cfg)
    total_steps = len(schedule)
    scheduler = make_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler(device.type) if t.fp16 is True else None  # resolved: a bool
    autocast = make_autocast(cfg, device)
    forward = make_forward(cfg, tokenizer.pad_token_id, device)
    precompute = precomputes_reference(cfg, need_ref)
    plan = cleanup.enter_context(MemoryPlan.apply(cfg, model, reference, device, precompute_reference=precompute))
    ref_logps = precompute_reference_logps(cfg, reference, prepared, forward, autocast, precompute)
    if ref_logps.train is not None and reference.frozen is not None:
        reference = None  # full fine-tuning: the frozen copy only served the precompute
    plan.after_setup()
    train_ref = reference_source(reference, ref_logps.train, forward, autocast, device)
    eval_ref = reference_source(reference, ref_logps.eval, forward, autocast, device)

    log_history: list[dict[str, Any]] = []
    start_step, tokens_seen, train_seconds = 0, 0, 0.0
    if checkpoint is not None:
        start_step, log_history, tokens_seen, train_seconds = restore_checkpoint(
            checkpoint, model, optimizer, scheduler, scaler)  # fmt: skip
    guard = build_guard(cfg, model, tokenizer, eval_prompts, retain_prompts, autocast)
    guard_every = t.eval_steps or max(1, total_steps // 10)
    stopped: dict[str, Any] | None = None
    guard_warnings: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    cleanup.enter_context(lock_output_dir(out))  # one run per output_dir at a time
    (out / "config.yaml").write_text(cfg.to_yaml())
    evaluate_now = lambda: evaluate(model, forward, eval_ref, prepared.eval, cfg, autocast)  # noqa: E731
    window = StepMetrics()

    # 3. the loop
    progress = report.Progress(total_steps, start_step, enabled=t.progress)
    with progress, StopSignals() as stop:
        for step_index in range(start_step, total_steps):
            step_started = time.time()
            micro_batches = schedule[step_index]
            step_pairs = sum(len(indices) for indices in micro_batches)
            # mean chosen length over the whole step: token-mean losses stay exact under accumulation
            chosen_tokens_mean = sum(len(prepared.train[i].chosen_ids) for idx in micro_batches for i in idx)
            chosen_tokens_mean /= step_pairs
            step_loss = 0.0
            for indices in micro_batches:
                pairs = [prepared.train[i] for i in indices]
                ref = train_ref(indices, pairs)
                with autocast():
                    pol = forward(model, pairs)
                lp = pair_logps(pol, ref, chosen_tokens_mean)
                guard.observe(pol.chosen.logps, lp.ref_chosen, pol.chosen.tokens)
                per_pair = losses.combined_loss(lp, cfg.loss_types, cfg.loss.loss_weights, loss_params(cfg))
                loss = per_pair.sum() / step_pairs  # mean over the pairs of the optimizer step
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.item()
                window.add_pairs(pol, lp, cfg)
                window.tokens += sequence_tokens(pairs)
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            grad_norm = clip_and_step(optimizer, params, t.max_grad_norm, scaler, plan.bf16_grads)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            plan.after_step()

            step = step_index + 1
            elapsed = time.time() - step_started
            window.add_step(step_loss, grad_norm, elapsed)
            train_seconds += elapsed
            if not math.isfinite(step_loss):  # the weights are broken now: report what ran, keep no final/
                stopped = {"step": step - 1, "diverged": divergence_message(step_loss, step, cfg)}
                break
            row = None
            if step % t.logging_steps == 0 or step in (1, total_steps):  # first step: the baseline
                row = window.log_row(lr, step, steps_per_epoch)
                tokens_seen += window.tokens
                log_history.append(row)
                window = StepMetrics()
            progress.update(step, row)
            if prepared.eval and t.eval_steps and step % t.eval_steps == 0 and step != total_steps:
                log_history.append({**evaluate_now(), "epoch": round(step / steps_per_epoch, 4), "step": step})
                progress.print_eval(log_history[-1])
            if step % guard_every == 0 or step == total_steps:
                stopped = check_guard(guard, step, t.stop_on_collapse, log_history, guard_warnings, progress)
                if stopped is not None:
                    break
            signal_received = stop.received  # SIGTERM / Ctrl-C during this step: keep it, then stop
            if (t.save_steps and step % t.save_steps == 0 and step != total_steps) or signal_received:
                state = {"step": step, "log_history": log_history, "tokens_seen": tokens_seen,
                         "train_seconds": train_seconds}  # fmt: skip
                save_checkpoint(out / "checkpoints" / f"step-{step}", model, optimizer, scheduler, scaler, state)
                prune_checkpoints(out, t.save_total_limit)
            if signal_received:
                raise RunStopped(signal_received.name, signal_received.value, step)

    # 4. final evaluation, model and reports
    last_step = total_steps if stopped is None else stopped["step"]
    diverged = stopped is not None and "diverged" in stopped
    if prepared.eval and not diverged:
        log_history.append({**evaluate_now(), "epoch": round(last_step / steps_per_epoch, 4), "step": last_step})
        progress.print_eval(log_history[-1])
    plan.finish_training(model, model_path, cfg)  # the report and final/: plain gradients, fp32 as loaded
    if not diverged:
        final_report(cfg, model, reference, tokenizer, prepared.eval_pairs, eval_prompts, model_path, device, out)
        reference = None
        save_final(model, tokenizer, out, is_lora=cfg.model.finetuning_type == "lora")  # merges in place
    summary = report.build_summary(
        cfg, log_history, prepared.stats, runtime=time.time() - started, train_seconds=train_seconds,
        tokens_seen=tokens_seen, peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(device),
        total_steps=last_step, device=str(device), reference_mode=ref_logps.mode,
    )  # fmt: skip
    summary["precision"] = report.precision_record(precision)
    summary["reference_seconds"] = round(ref_logps.seconds, 2)
    summary.update(plan.summary())  # what the memory plan did
    summary["stopped_early"] = stopped
    summary["guard_warnings"] = guard_warnings
    report.write_reports(out, log_history, summary)
    if diverged:
        raise TrainingDiverged(stopped["diverged"])
    return summary


def divergence_message(loss: float, step: int, cfg: TrainConfig) -> str:
    """One line: where the loss broke, the likely cause, and what is kept."""
    hint = "lower learning_rate (or max_grad_norm)"
    if cfg.training.fp16:
        hint += ", or use bf16 instead of fp16 (fp16 overflows)"
    out = cfg.training.output_dir
    return (f"loss is {loss} at step {step}: training diverged; {hint}. {out}/log_history.json and summary.json "
            f"hold the steps before it, no final/ was written; rerun with overwrite_output_dir=true or resume from "
            f"a checkpoint")


def check_guard(guard: CollapseGuard, step: int, stop_on_collapse: bool, log_history: list, warnings: list,
                progress: report.Progress) -> dict[str, Any] | None:  # fmt: skip
    """Run the collapse guard's check and log it; returns how the run stopped, or None to go on."""
    verdict = guard.check(step)
    if verdict.chosen_logp_drop is not None or guard.prompts or guard.retain_answers:
        log_history.append(verdict.row())
    if verdict.healthy:
        return None
    message = f"collapse guard at step {step}: " + "; ".join(verdict.reasons)
    warnings.append(message)
    progress.warn(message)
    if not stop_on_collapse:
        return None
    kept = guard.restore_healthy()
    progress.warn(f"stop_on_collapse: stopped; final/ holds the weights of step {kept}")
    return {"step": step, "reasons": verdict.reasons, "kept_step": kept}
