"""The DPO training recipe: one plain PyTorch loop, top to bottom.

1. config -> ranks -> data -> token ids (fails fast, before anything is written)
2. policy + reference, optimizer, the memory plan, the reference log-probs
3. for each optimizer step: this rank's share of each micro-batch -> log-probs -> loss -> backward;
   sum the gradients over the ranks; clip; step
4. log, evaluate, guard, checkpoint; at the end write final/ and the reports

Under torchrun every rank runs this same loop (see distributed.py); rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from preftune import losses, report, tensorboard_log
from preftune.config import TrainConfig, load_config, parse_override
from preftune.distributed import Ranks, close_ranks, init_ranks
from preftune.generation import load_prompts
from preftune.errors import PreftuneError, RunStopped, TrainingDiverged
from preftune.guard import CollapseGuard
from preftune.memory import MemoryPlan, make_autocast, resolve_precision
from preftune.packing import segment_length
from preftune.modeling import build_policy_and_reference, load_tokenizer, resolve_device, resolve_model_path
from preftune.training.finish import run_summary, write_final
from preftune.training.metrics import StepMetrics, evaluate, loss_params, pair_logps, sequence_tokens
from preftune.training.prepare import (
    build_guard, make_forward, precompute_reference_logps, precomputes_reference, prepare_data, reference_source,
    run_generate_step, shard_if_fsdp,
)  # fmt: skip
from preftune.training.state import (
    build_schedule, check_output_dir, check_run_identity, clear_previous_run, clip_and_step, find_checkpoint,
    lock_output_dir, make_optimizer, make_scheduler, prune_checkpoints, remove_end_checkpoint, restore_checkpoint,
    run_identity, save_checkpoint,
)  # fmt: skip
from preftune.training.signals import StopSignals
from preftune.util import onednn_cache_capacity


def train(config: TrainConfig | dict | str | Path, overrides=None, *, allow_code: bool = False) -> dict[str, Any]:
    """Run DPO training; returns the summary written to ``summary.json``. The caller's logging
    verbosity, warning filters and environment are as they were afterwards.

    ``allow_code``: a YAML file may ask to run code (``trust_remote_code: true``, a `generate:` line
    with ``--reward module:function``) only with this set (the CLI's ``--allow-code``)."""
    cfg = load_config(config, overrides)
    if isinstance(config, (str, Path)) and not allow_code:
        refuse_code_from_file(cfg, config, overrides)
    with onednn_cache_capacity(), report.quiet_libraries(), ExitStack() as cleanup:
        return run_training(cfg, cleanup, allow_code=allow_code)


def refuse_code_from_file(cfg: TrainConfig, path, overrides) -> None:
    given = {parse_override(o)[0] for o in overrides or []} if not isinstance(overrides, dict) else set(overrides)
    if cfg.model.trust_remote_code and "trust_remote_code" not in given:
        raise PreftuneError("trust_remote_code: true in a config file runs the model directory's Python code; pass "
                            "--allow-code on the command line (or trust_remote_code=true there) to allow it", str(path))  # fmt: skip


def run_training(cfg: TrainConfig, cleanup: ExitStack, *, allow_code: bool = False) -> dict[str, Any]:
    started = time.time()
    ranks, device_name = init_ranks(cfg.training.device, cfg.training.ddp_timeout)  # torchrun: join the others
    cleanup.callback(close_ranks, ranks)
    cleanup.enter_context(console_quiet(not ranks.is_main))  # one voice: rank 0's
    device = resolve_device(device_name)
    cfg, precision = resolve_precision(cfg, device)  # bf16/fp16 "auto" -> what this hardware runs fast
    t = cfg.training
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    # 1. data (all user mistakes surface here, before anything is written)
    out = check_output_dir(cfg)
    run_generate_step(cfg, ranks, allow_code)
    checkpoint = find_checkpoint(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    tokenizer = load_tokenizer(cfg.model, model_path)
    prepared = prepare_data(cfg, tokenizer)
    eval_prompts, retain_prompts = (load_prompts(f) if f else [] for f in (cfg.data.eval_prompts,
                                                                           cfg.data.retain_prompts))
    report.print_data_stats(prepared.stats, cfg.data.special_tokens_in_text)
    report.print_precision(precision)
    ranks.print_setup(t.distributed, t.per_device_train_batch_size, t.gradient_accumulation_steps)

    # 2. policy + reference, optimizer, memory plan, reference log-probs
    need_ref = losses.needs_reference(cfg.loss_types)
    model, reference = build_policy_and_reference(cfg.model, model_path, device, need_ref)
    model.train()
    ranks.broadcast_parameters(model)  # every rank starts from rank 0's weights
    precompute = precomputes_reference(cfg, need_ref)
    sharded = shard_if_fsdp(cfg, model, ranks, precompute)  # FSDP2: each rank keeps a shard of the policy
    ranks = dataclasses.replace(ranks, lockstep=sharded)
    world_average = ranks.world_size if sharded else 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t)
    schedule, steps_per_epoch = build_schedule(len(prepared.train), cfg, ranks.world_size)
    total_steps = len(schedule)
    scheduler = make_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler(device.type) if t.fp16 is True else None  # resolved: a bool
    autocast = make_autocast(cfg, device)
    forward = make_forward(cfg, tokenizer.pad_token_id, device)
    plan = cleanup.enter_context(
        MemoryPlan.apply(cfg, model, reference, device, precompute_reference=precompute, distributed=ranks.enabled))
    for note in plan.notes:
        report.print_warning(note)
    ref_logps = precompute_reference_logps(cfg, reference, prepared, forward, autocast, precompute, ranks)
    reference = None if ref_logps.train is not None and reference.frozen is not None else reference  # served
    plan.after_setup()
    train_ref = reference_source(reference, ref_logps.train, forward, autocast, device)
    eval_ref = reference_source(reference, ref_logps.eval, forward, autocast, device)

    guard = build_guard(cfg, model, tokenizer, eval_prompts, retain_prompts, autocast)  # its baseline: the start
    identity = run_identity(cfg, prepared, ranks.world_size)
    resumed = resume(checkpoint, identity, model, optimizer, scheduler, scaler, guard, ranks)  # {}: a fresh run
    start_step, log_history = resumed.get("step", 0), resumed.get("log_history", [])
    ranks.same_on_all(start_step, "the step to start from")
    tokens_seen, train_seconds = resumed.get("tokens_seen", 0), resumed.get("train_seconds", 0.0)
    window = StepMetrics.from_state(resumed.get("log_window"), ranks)  # a partly filled logging window
    guard_every = t.eval_steps or max(1, total_steps // 10)
    stopped: dict[str, Any] | None = None
    guard_warnings: list[str] = []
    scalars = claim_output_dir(cfg, out, ranks, checkpoint is not None, cleanup)  # rank 0: lock, config.yaml
    evaluate_now = lambda: evaluate(model, forward, eval_ref, prepared.eval, cfg, autocast, ranks)  # noqa: E731
    pair_tokens = [segment_length(p) for p in prepared.train]  # P + C + R: shares the ranks' work

    def save(step: int, **extra) -> None:  # every rank calls it (FSDP gathers), rank 0 writes
        state = {"step": step, "log_history": log_history, "tokens_seen": tokens_seen,
                 "train_seconds": train_seconds, "run_identity": identity, **extra}  # fmt: skip
        save_checkpoint(out / "checkpoints" / f"step-{step}", model, optimizer, scheduler, scaler, state, ranks)
        if ranks.is_main:
            prune_checkpoints(out, t.save_total_limit)

    # 3. the loop
    progress = report.Progress(total_steps, start_step, enabled=t.progress and ranks.is_main)
    with progress, StopSignals() as stop:
        for step_index in range(start_step, total_steps):
            step_started = time.time()
            micro_batches = schedule[step_index]
            step_pairs = sum(len(indices) for indices in micro_batches)
            # mean chosen length over the whole step: token-mean losses stay exact under accumulation
            chosen_tokens_mean = sum(len(prepared.train[i].chosen_ids) for idx in micro_batches for i in idx)
            chosen_tokens_mean /= step_pairs
            step_loss = 0.0
            for global_indices in micro_batches:
                # this rank's pairs (none, or under FSDP a placeholder pair of weight 0, if its share is empty)
                indices, counted = ranks.share(global_indices, [pair_tokens[i] for i in global_indices])
                if not indices:
                    continue
                pairs = [prepared.train[i] for i in indices]
                ref = train_ref(indices, pairs)
                with autocast():
                    pol = forward(model, pairs)
                lp = pair_logps(pol, ref, chosen_tokens_mean)
                per_pair = losses.combined_loss(lp, cfg.loss_types, cfg.loss.loss_weights, loss_params(cfg))
                loss = per_pair.sum() * counted / step_pairs  # mean over the pairs of the optimizer step (all ranks')
                backward = loss * world_average  # FSDP2 averages over the ranks: then undo it, for the sum
                (scaler.scale(backward) if scaler is not None else backward).backward()
                if counted:
                    step_loss += loss.item()
                    guard.observe(pol.chosen.logps, lp.ref_chosen, pol.chosen.tokens)
                    window.add_pairs(pol, lp, cfg)
                    window.tokens += sequence_tokens(pairs)
            if not sharded:  # (FSDP2 summed them into each rank's shard during backward)
                ranks.sum_gradients(params)  # every rank now holds the gradient of the whole step
            (step_loss,) = ranks.sum([step_loss])
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
                window.sum_over_ranks(ranks)
                row = window.log_row(lr, step, steps_per_epoch)
                tokens_seen += window.tokens
                log_history.append(row)
                scalars.add_row(row)
                window = StepMetrics()
            progress.update(step, row)
            if prepared.eval and t.eval_steps and step % t.eval_steps == 0 and step != total_steps:
                log_history.append({**evaluate_now(), "epoch": round(step / steps_per_epoch, 4), "step": step})
                progress.print_eval(log_history[-1])
                scalars.add_row(log_history[-1])
            if step % guard_every == 0 or step == total_steps:
                stopped = check_guard(guard, step, t.stop_on_collapse, log_history, guard_warnings, progress, ranks)
                if stopped is not None:
                    break
            signal_received = ranks.any_signal(stop.received)  # SIGTERM / Ctrl-C on any rank: keep the step, stop
            if (t.save_steps and step % t.save_steps == 0 and step != total_steps) or signal_received:
                save(step, log_window=window.state(ranks), guard_window=ranks.sum([guard.drop_sum, guard.drop_pairs]))
            if signal_received:
                ranks.barrier()  # the checkpoint is complete before any rank exits
                raise RunStopped(signal_received.name, signal_received.value, step)

    # 4. final evaluation, model and reports; a kill from here on loses nothing: the last step is checkpointed
    if stopped is None and start_step < total_steps:
        save(total_steps, end_of_run=True)
    last_step = total_steps if stopped is None else stopped["step"]
    diverged = stopped is not None and "diverged" in stopped
    if prepared.eval and not diverged:
        log_history.append({**evaluate_now(), "epoch": round(last_step / steps_per_epoch, 4), "step": last_step})
        progress.print_eval(log_history[-1])
        scalars.add_row(log_history[-1])
    plan.finish_training(model, model_path, cfg)  # the report and final/: plain gradients, fp32 as loaded
    optimizer.state.clear()  # AdamW's moments are in the last checkpoint: their memory serves the report now
    if not diverged:  # the report (before/after) and final/, from rank 0
        write_final(cfg, model, reference, tokenizer, prepared.eval_pairs, eval_prompts, model_path, device, out,
                    ranks, sharded=sharded)  # fmt: skip
        reference = None
    summary = run_summary(cfg, log_history, prepared.stats, ranks, device, runtime=time.time() - started,
                          train_seconds=train_seconds, tokens_seen=tokens_seen, last_step=last_step,
                          precision=precision, ref_logps=ref_logps, plan=plan)  # fmt: skip
    summary["stopped_early"] = stopped
    summary["guard_warnings"] = guard_warnings
    if ranks.is_main:
        report.write_reports(out, log_history, summary)
        if not t.save_steps:  # checkpoints were not asked for: the end-of-run one served its purpose
            remove_end_checkpoint(out)
    ranks.barrier(patient=True)  # rank 0's files are complete before any rank exits
    if diverged:
        raise TrainingDiverged(stopped["diverged"])
    return summary


def resume(checkpoint: Path | None, identity: dict, model, optimizer, scheduler, scaler, guard: CollapseGuard,
           ranks: Ranks) -> dict[str, Any]:  # fmt: skip
    """Continue from ``checkpoint`` (None: a fresh run, ``{}``); returns its trainer state."""
    if checkpoint is None:
        return {}
    check_run_identity(checkpoint, identity)  # another model, LoRA shape or data: refused
    resumed = restore_checkpoint(checkpoint, model, optimizer, scheduler, scaler)
    guard.resume_at(resumed["step"], resumed.get("guard_window") if ranks.is_main else None)
    return resumed


def claim_output_dir(cfg: TrainConfig, out: Path, ranks: Ranks, resuming: bool, cleanup: ExitStack):
    """Rank 0 takes ``out`` (a lock held to the end; with ``overwrite_output_dir`` the previous run
    removed first) and writes config.yaml; returns the TensorBoard writer (a no-op unless asked)."""
    if not ranks.is_main:
        return tensorboard_log.NullWriter()
    out.mkdir(parents=True, exist_ok=True)
    cleanup.enter_context(lock_output_dir(out))  # one run per output_dir at a time
    if cfg.training.overwrite_output_dir and not resuming:
        clear_previous_run(out)  # the previous run is gone before this one writes
    (out / "config.yaml").write_text(cfg.to_yaml())
    return cleanup.enter_context(tensorboard_log.open_for(cfg, out))


@contextmanager
def console_quiet(quiet: bool):
    previous = report.console.quiet
    report.console.quiet = quiet or previous
    try:
        yield
    finally:
        report.console.quiet = previous


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
                progress: report.Progress, ranks: Ranks = Ranks()) -> dict[str, Any] | None:  # fmt: skip
    """Run the collapse guard's check and log it; returns how the run stopped, or None to go on.
    Under torchrun the drop is summed over the ranks' pairs, every rank runs the check (its forwards
    need every rank where the model is sharded) and rank 0's verdict decides for all."""
    guard.drop_sum, drop_pairs = ranks.sum([guard.drop_sum, guard.drop_pairs])
    guard.drop_pairs = int(drop_pairs)
    verdict = ranks.broadcast(guard.check(step))
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
