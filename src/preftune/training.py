"""The DPO training recipe: one plain PyTorch loop, top to bottom.

1. config -> data -> token ids          (fails fast, before anything is written)
2. policy + reference                   (LoRA: adapter disabled; full: frozen copy)
3. for each optimizer step: micro-batches -> log-probs -> loss -> backward; clip; step
4. log, evaluate, checkpoint; at the end write final/ and the reports
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import math
import random
import resource
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from preftune import data as data_mod
from preftune import losses, report
from preftune.attention import enable_short_row_attention
from preftune.batching import collate_padded
from preftune.config import TrainConfig, load_config
from preftune.errors import PreftuneError
from preftune.forward import PairForward, forward_fast, forward_padded
from preftune.modeling import (
    Reference,
    build_policy_and_reference,
    compact_frozen_linears,
    load_causal_lm,
    load_tokenizer,
    load_trainable_state,
    preftune_home,
    resolve_device,
    resolve_model_path,
    restore_frozen_linears,
    save_final,
    trainable_state,
    weight_dtype,
)
from preftune.generation import load_prompts
from preftune.guard import CollapseGuard
from preftune.refcache import RefLogps, fingerprint_reference, load_or_compute
from preftune.templates import TokenizeStats, tokenize_pairs
from preftune.types import PreferencePair, TokenizedPair

METRIC_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)  # fmt: skip


# ---------------------------------------------------------------- data


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    stats: dict[str, Any]
    eval_pairs: list[PreferencePair]  # untokenized, for the final report


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    d = cfg.data
    if d.dataset is not None:
        train_pairs = data_mod.load_llamafactory(d.dataset, d.dataset_dir)
    else:
        train_pairs = data_mod.load_pairs(d.train_file, d.format)
    if d.max_samples is not None:
        train_pairs = train_pairs[: d.max_samples]
    eval_pairs = []
    if d.eval_file is not None:
        eval_pairs = data_mod.load_pairs(d.eval_file, d.format)
    elif d.eval_split > 0:
        train_pairs, eval_pairs = data_mod.split_eval(train_pairs, d.eval_split, cfg.training.seed)

    kwargs = dict(system_prompt=d.system_prompt, max_length=d.max_length, max_prompt_length=d.max_prompt_length)
    train, train_stats = tokenize_pairs(train_pairs, tokenizer, **kwargs)
    evals, eval_stats = tokenize_pairs(eval_pairs, tokenizer, **kwargs) if eval_pairs else ([], TokenizeStats())
    if not train:
        raise PreftuneError(
            f"no usable training pairs: {train_stats.total} loaded, {train_stats.dropped_truncated} dropped by "
            f"truncation (max_length={d.max_length}), {train_stats.dropped_identical} with chosen == rejected"
        )
    stats = {"train": vars(train_stats), "eval": vars(eval_stats)}
    return PreparedData(train, evals, stats, eval_pairs)


def build_schedule(num_pairs: int, cfg: TrainConfig) -> tuple[list[list[list[int]]], int]:
    """Every optimizer step as a list of micro-batches of pair indices, and steps per epoch.

    Epoch e visits the pairs in a permutation seeded by (seed, e), so a resumed run
    sees exactly the batches an uninterrupted run would.
    """
    t = cfg.training
    micro_per_epoch = math.ceil(num_pairs / t.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / t.gradient_accumulation_steps)
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
    steps: list[list[list[int]]] = []
    epoch = 0
    while len(steps) < total:
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(t.seed + epoch)).tolist()
        micro = [order[i : i + t.per_device_train_batch_size] for i in range(0, num_pairs, t.per_device_train_batch_size)]
        for i in range(0, len(micro), t.gradient_accumulation_steps):
            steps.append(micro[i : i + t.gradient_accumulation_steps])
        epoch += 1
    return steps[:total], steps_per_epoch


# ---------------------------------------------------------------- forward


Forward = Callable[[nn.Module, list[TokenizedPair]], PairForward]
RefSource = Callable[[list[int], list[TokenizedPair]], RefLogps | None]  # (pair indices, pairs) -> reference


def make_optimizer(params: list[torch.nn.Parameter], t) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over all tensors, as transformers' Trainer uses since
    torch 2.8) where the parameters' device and dtype support it, else the plain one."""
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                  weight_decay=t.weight_decay)  # fmt: skip
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def make_forward(cfg: TrainConfig, pad_id: int, device: torch.device) -> Forward:
    """The fast path (shared prompt, packed rows, chunked LM head) or the simple padded one."""
    if cfg.training.fast_path:
        rows, multiple = cfg.training.max_tokens_per_row, row_length_multiple(cfg, device)
        return lambda model, pairs: forward_fast(
            model, pairs, pad_token_id=pad_id, max_tokens_per_row=rows, row_length_multiple=multiple
        )
    return lambda model, pairs: forward_padded(model, collate_padded(pairs, pad_id).to(device))


def row_length_multiple(cfg: TrainConfig, device: torch.device) -> int:
    """The configured multiple, else 8 under low-precision autocast on CPU (whose bf16 attention
    backward keeps ~5 MB of kernels per row length it meets) and 1 elsewhere (padding for nothing)."""
    if cfg.training.row_length_multiple is not None:
        return cfg.training.row_length_multiple
    return 8 if device.type == "cpu" and autocast_dtype(cfg) is not None else 1


def reference_source(reference: Reference | None, cached: RefLogps | None, forward: Forward, autocast,
                     device: torch.device) -> RefSource:  # fmt: skip
    """Where the reference log-probs of a batch come from: the cache, a forward, or nowhere."""
    if cached is not None:
        return lambda indices, pairs: cached.select(indices).to(device)
    if reference is None:
        return lambda indices, pairs: None

    def on_the_fly(indices: list[int], pairs: list[TokenizedPair]) -> RefLogps:
        with torch.no_grad(), reference.context(), autocast():
            out = forward(reference.model, pairs)
        return RefLogps(out.chosen.logps, out.rejected.logps)

    return on_the_fly


def sequence_tokens(pairs: list[TokenizedPair]) -> int:
    """Tokens of the chosen and rejected sequences (2P + C + R), whichever path computes them."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


@dataclass
class StepMetrics:
    """Sums over the pairs (and completion tokens) seen since the last log."""

    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in METRIC_KEYS})
    pairs: int = 0
    chosen_tokens: float = 0.0
    rejected_tokens: float = 0.0
    loss: float = 0.0  # sum of per-step losses
    grad_norm: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add_pairs(self, pol: PairForward, lp: losses.PairLogps, cfg: TrainConfig) -> None:
        params = loss_params(cfg)
        rc, rr = losses.rewards(lp, cfg.loss_types, params)
        s = self.sums
        s["rewards/chosen"] += rc.sum().item()
        s["rewards/rejected"] += rr.sum().item()
        s["rewards/margins"] += (rc - rr).sum().item()
        # a margin within float noise of the log-prob sums is a tie (e.g. at step 1 with a cached
        # reference computed in other batches), and ties count as wrong, as in TRL
        noise = 1e-5 * params.beta * (pol.chosen.logps.detach().abs() + pol.rejected.logps.detach().abs())
        s["rewards/accuracies"] += ((rc - rr) > noise).float().sum().item()
        s["logps/chosen"] += pol.chosen.logps.detach().sum().item()
        s["logps/rejected"] += pol.rejected.logps.detach().sum().item()
        s["logits/chosen"] += pol.chosen.logits_sum.sum().item()
        s["logits/rejected"] += pol.rejected.logits_sum.sum().item()
        self.pairs += len(rc)
        self.chosen_tokens += pol.chosen.tokens.sum().item()
        self.rejected_tokens += pol.rejected.tokens.sum().item()

    def means(self, prefix: str = "") -> dict[str, float]:
        out = {}
        for key, value in self.sums.items():
            if key == "logits/chosen":
                out[prefix + key] = value / max(self.chosen_tokens, 1.0)
            elif key == "logits/rejected":
                out[prefix + key] = value / max(self.rejected_tokens, 1.0)
            else:
                out[prefix + key] = value / max(self.pairs, 1)
        return out


def loss_params(cfg: TrainConfig) -> losses.LossParams:
    return losses.LossParams(
        beta=cfg.loss.beta,
        label_smoothing=cfg.loss.label_smoothing,
        simpo_gamma=cfg.loss.simpo_gamma,
        orpo_alpha=cfg.loss.orpo_alpha,
    )


def pair_logps(pol: PairForward, ref: RefLogps | None, chosen_tokens_mean: float | None) -> losses.PairLogps:
    return losses.PairLogps(
        chosen=pol.chosen.logps,
        rejected=pol.rejected.logps,
        chosen_tokens=pol.chosen.tokens,
        rejected_tokens=pol.rejected.tokens,
        ref_chosen=None if ref is None else ref.chosen,
        ref_rejected=None if ref is None else ref.rejected,
        chosen_tokens_mean=chosen_tokens_mean,
    )


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, forward: Forward, ref_for: RefSource, pairs, cfg, autocast) -> dict[str, float]:
    was_training = model.training
    model.eval()
    metrics = StepMetrics()
    tokens_mean = sum(len(p.chosen_ids) for p in pairs) / len(pairs)
    bs = cfg.training.per_device_eval_batch_size
    total_loss = 0.0
    for i in range(0, len(pairs), bs):
        indices = list(range(i, min(i + bs, len(pairs))))
        chunk = pairs[i : i + bs]
        with autocast():
            pol = forward(model, chunk)
        lp = pair_logps(pol, ref_for(indices, chunk), tokens_mean)
        total_loss += losses.combined_loss(lp, cfg.loss_types, cfg.loss.loss_weights, loss_params(cfg)).sum().item()
        metrics.add_pairs(pol, lp, cfg)
    model.train(was_training)
    return {"eval_loss": total_loss / len(pairs), **metrics.means(prefix="eval_")}


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        },
        tmp / "training_state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def find_checkpoint(cfg: TrainConfig) -> Path | None:
    resume = cfg.training.resume_from_checkpoint
    if resume in (None, False):
        return None
    if resume is True or resume == "true":
        ckpts = sorted_checkpoints(Path(cfg.training.output_dir))
        if not ckpts:
            raise PreftuneError(f"resume_from_checkpoint: no checkpoint in {cfg.training.output_dir}/checkpoints")
        return ckpts[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise PreftuneError(f"resume_from_checkpoint: '{resume}' is not a checkpoint directory")
    return path


def sorted_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for old in sorted_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(old)


# ---------------------------------------------------------------- the run


def run_generate_step(cfg: TrainConfig) -> None:
    """A recipe's `generate:` line builds train_file when it does not exist yet."""
    step = cfg.data.generate
    if not step or cfg.data.train_file is None or Path(cfg.data.train_file).exists():
        return
    args = shlex.split(step) if isinstance(step, str) else [str(a) for a in step]
    report.console.print(f"{cfg.data.train_file} does not exist yet: preftune generate {shlex.join(args)}")
    cmd = [sys.executable, "-m", "preftune.cli", "generate", *args]
    if subprocess.run(cmd, cwd=cfg.base_dir or None).returncode != 0:
        raise PreftuneError(f"the generate step failed: preftune generate {shlex.join(args)}")
    if not Path(cfg.data.train_file).exists():
        raise PreftuneError(f"the generate step did not write train_file {cfg.data.train_file}")


def check_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.training.output_dir)
    finished = (out / "summary.json").exists() or (out / "final").exists()
    if finished and not cfg.training.overwrite_output_dir and not cfg.training.resume_from_checkpoint:
        raise PreftuneError(
            f"output_dir '{out}' already holds a finished run; set overwrite_output_dir: true or choose another"
        )
    if out.exists() and not out.is_dir():
        raise PreftuneError(f"output_dir '{out}' exists and is not a directory")
    return out


def precision_name(cfg: TrainConfig) -> str:
    amp = "bf16" if cfg.training.bf16 else "fp16" if cfg.training.fp16 else "none"
    return f"weights={cfg.model.dtype}|autocast={amp}"


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if cfg.training.bf16 else torch.float16 if cfg.training.fp16 else None


def make_autocast(cfg: TrainConfig, device: torch.device):
    # cache_enabled=False: the cache keeps every weight's low-precision cast until the forward
    # ends; each weight is cast once per forward anyway, and with gradient checkpointing the
    # casts then die layer by layer (-160 MB peak on SmolLM2-135M full fine-tuning, same numbers)
    dtype = autocast_dtype(cfg)
    if dtype is None:
        return nullcontext

    @contextmanager
    def autocast():
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False), recast_saved_weight_casts():
            yield

    return autocast


def recast_saved_weight_casts():
    """Autograd keeps what a matmul needs for backward, and under autocast that includes the
    low-precision cast of every trainable fp32 weight, from the forward until its backward (full
    fine-tuning of SmolLM2-135M: 270 MB). Instead keep a reference to the weight and cast it again
    when backward needs it: the same cast of the same values, so the same numbers."""
    return torch.autograd.graph.saved_tensors_hooks(_pack_weight_cast, _unpack_weight_cast)


def _pack_weight_cast(saved: torch.Tensor):
    base = saved if saved._base is None else saved._base  # linear saves a transposed view of the cast
    cast = base.grad_fn
    if type(cast).__name__ == "ToCopyBackward0":
        source = cast.next_functions[0][0]
        weight = getattr(source, "variable", None)  # AccumulateGrad of a leaf: the parameter itself
        if (weight is not None and weight.shape == base.shape and weight.dtype != base.dtype
                and base.is_contiguous() and weight.is_contiguous()):  # fmt: skip
            return (weight, base.dtype, saved.size(), saved.stride(), saved.storage_offset())
    return saved


def _unpack_weight_cast(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    weight, dtype, size, stride, offset = packed
    return weight.detach().to(dtype).as_strided(size, stride, offset)


def train(config: TrainConfig | dict | str | Path, overrides=None) -> dict[str, Any]:
    """Run DPO training; returns the summary written to ``summary.json``."""
    from transformers import get_scheduler

    cfg = load_config(config, overrides)
    t = cfg.training
    report.quiet_libraries()
    started = time.time()
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)

    # 1. data (all user mistakes surface here, before anything is written)
    out = check_output_dir(cfg)
    run_generate_step(cfg)
    checkpoint = find_checkpoint(cfg)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    tokenizer = load_tokenizer(cfg.model, model_path)
    prepared = prepare_data(cfg, tokenizer)
    eval_prompts = load_prompts(cfg.data.eval_prompts) if cfg.data.eval_prompts else []
    retain_prompts = load_prompts(cfg.data.retain_prompts) if cfg.data.retain_prompts else []
    pad_id = tokenizer.pad_token_id
    report.print_data_stats(prepared.stats)

    # 2. policy + reference
    need_ref = losses.needs_reference(cfg.loss_types)
    model, reference = build_policy_and_reference(cfg.model, model_path, device, need_ref)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t)
    schedule, steps_per_epoch = build_schedule(len(prepared.train), cfg)
    total_steps = len(schedule)
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type) if t.fp16 else None
    autocast = make_autocast(cfg, device)

    forward = make_forward(cfg, pad_id, device)
    short_row_layers = 0
    if t.short_row_attention and t.fast_path and device.type == "cpu" and autocast_dtype(cfg) == torch.bfloat16:
        short_row_layers = enable_short_row_attention(model)
        if reference is not None and reference.frozen is not None:  # the same kernel: the same rounding
            enable_short_row_attention(reference.frozen)

    # reference log-probs: once, cached on disk, instead of a reference forward every step
    precompute = t.precompute_ref_log_probs if t.precompute_ref_log_probs is not None else need_ref
    cached_train = cached_eval = None
    reference_mode = "none" if reference is None else "on the fly"
    reference_seconds = 0.0  # computing (or loading) the cached reference log-probs
    # under autocast, frozen Linear weights can be held in the autocast dtype (same numbers, see
    # compact_frozen_linears): LoRA's base layers, and the full fine-tuning reference copy when it
    # only serves the precompute (it is dropped afterwards)
    amp_dtype = autocast_dtype(cfg)
    compact = t.compact_frozen_weights and amp_dtype is not None
    compacted = compact_frozen_linears(model, amp_dtype) if compact and cfg.model.finetuning_type == "lora" else []
    if reference is not None and precompute:
        ref_started = time.time()
        if compact and reference.frozen is not None:
            compact_frozen_linears(reference.frozen, amp_dtype)
        cache_kwargs = dict(
            forward=forward, batch_size=t.per_device_eval_batch_size, autocast=autocast,
            precision=precision_name(cfg), cache_dir=preftune_home() / "ref_logps",
            reference_fingerprint=fingerprint_reference(reference.model),
        )  # fmt: skip
        cached_train, hit = load_or_compute(reference, prepared.train, **cache_kwargs)
        if prepared.eval:
            cached_eval, _ = load_or_compute(reference, prepared.eval, **cache_kwargs)
        reference_seconds = time.time() - ref_started
        reference_mode = f"cached ({'reused' if hit else 'computed'} in {reference_seconds:.1f}s)"
        if reference.frozen is not None:  # full fine-tuning: the frozen copy is no longer needed
            reference = None
    gc.collect()
    return_free_memory()
    train_ref = reference_source(reference, cached_train, forward, autocast, device)
    eval_ref = reference_source(reference, cached_eval, forward, autocast, device)

    log_history: list[dict[str, Any]] = []
    start_step, tokens_seen, train_seconds = 0, 0, 0.0
    if checkpoint is not None:
        load_trainable_state(model, load_file(checkpoint / "trainable.safetensors"))
        blob = torch.load(checkpoint / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if scaler is not None and blob["scaler"] is not None:
            scaler.load_state_dict(blob["scaler"])
        random.setstate(blob["rng"]["python"])
        torch.set_rng_state(blob["rng"]["torch"])
        if blob["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        start_step, log_history = state["step"], state["log_history"]
        tokens_seen, train_seconds = state["tokens_seen"], state["train_seconds"]

    # the guard's "healthy" snapshot starts from the weights training continues from
    guard = CollapseGuard(
        model, tokenizer, eval_prompts[: t.guard_prompts], max_logp_drop=t.collapse_max_logp_drop,
        system_prompt=cfg.data.system_prompt, max_new_tokens=t.guard_max_new_tokens,
        keep_healthy=t.stop_on_collapse, retain_prompts=retain_prompts, max_retain_drop=t.collapse_max_retain_drop,
        autocast=autocast,
    )  # fmt: skip
    guard_every = t.eval_steps or max(1, total_steps // 10)
    stopped: dict[str, Any] | None = None
    guard_warnings: list[str] = []

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    evaluate_now = lambda: evaluate(model, forward, eval_ref, prepared.eval, cfg, autocast)  # noqa: E731
    window = StepMetrics()
    trimmer = HeapTrimmer()
    bf16_grads = None
    if t.bf16_weight_grads and t.bf16 and cfg.model.finetuning_type == "full":
        bf16_grads = Bf16WeightGrads(model)

    # 3. the loop
    progress = report.Progress(total_steps, start_step, enabled=t.progress)
    with progress:
        for step_index in range(start_step, total_steps):
            step_started = time.time()
            step_pairs = sum(len(idx) for idx in schedule[step_index])
            # mean chosen length over the whole step: token-mean losses stay exact under accumulation
            chosen_tokens_mean = sum(len(prepared.train[i].chosen_ids) for idx in schedule[step_index] for i in idx)
            chosen_tokens_mean /= step_pairs
            step_loss = 0.0
            for indices in schedule[step_index]:
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
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            if bf16_grads is not None:
                grad_norm = bf16_grads.clip_and_step(optimizer, params, max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trimmer.after_step()

            step = step_index + 1
            elapsed = time.time() - step_started
            window.loss += step_loss
            window.grad_norm += grad_norm
            window.steps += 1
            window.seconds += elapsed
            train_seconds += elapsed
            if not math.isfinite(step_loss):
                raise RuntimeError(f"loss is {step_loss} at step {step}; lower learning_rate or use bf16 instead of fp16")

            if step % t.logging_steps == 0 or step in (1, total_steps):  # first step: the baseline
                row = {
                    "loss": window.loss / window.steps,
                    "grad_norm": window.grad_norm / window.steps,
                    "learning_rate": lr,
                    **window.means(),
                    "tokens_per_second": window.tokens / max(window.seconds, 1e-9),
                    "epoch": round(step / steps_per_epoch, 4),
                    "step": step,
                }
                tokens_seen += window.tokens
                log_history.append(row)
                progress.update(step, row)
                window = StepMetrics()
            else:
                progress.update(step, None)
            if prepared.eval and t.eval_steps and step % t.eval_steps == 0 and step != total_steps:
                log_history.append({**evaluate_now(), "epoch": round(step / steps_per_epoch, 4), "step": step})
                progress.print_eval(log_history[-1])
            if step % guard_every == 0 or step == total_steps:
                verdict = guard.check(step)
                if verdict.chosen_logp_drop is not None or guard.prompts or guard.retain_answers:
                    log_history.append(verdict.row())
                if not verdict.healthy:
                    message = f"collapse guard at step {step}: " + "; ".join(verdict.reasons)
                    guard_warnings.append(message)
                    progress.warn(message)
                    if t.stop_on_collapse:
                        kept = guard.restore_healthy()
                        stopped = {"step": step, "reasons": verdict.reasons, "kept_step": kept}
                        progress.warn(f"stop_on_collapse: stopped; final/ holds the weights of step {kept}")
                        break
            if t.save_steps and step % t.save_steps == 0 and step != total_steps:
                state = {"step": step, "log_history": log_history, "tokens_seen": tokens_seen,
                         "train_seconds": train_seconds}  # fmt: skip
                save_checkpoint(out / "checkpoints" / f"step-{step}", model, optimizer, scheduler, scaler, state)
                prune_checkpoints(out, t.save_total_limit)

    if bf16_grads is not None:
        bf16_grads.remove()

    # 4. final evaluation, model and reports
    last_step = total_steps if stopped is None else stopped["step"]
    if prepared.eval:
        log_history.append({**evaluate_now(), "epoch": round(last_step / steps_per_epoch, 4), "step": last_step})
        progress.print_eval(log_history[-1])
    train_peak_rss_mb = peak_rss_mb()
    return_free_memory()
    restore_frozen_linears(model, compacted, model_path, cfg.model)  # the report and final/: fp32 as loaded
    final_report(cfg, model, reference, tokenizer, prepared.eval_pairs, eval_prompts, model_path, device, out)
    reference = None
    save_final(model, tokenizer, out, is_lora=cfg.model.finetuning_type == "lora")  # last use: merges in place
    summary = report.build_summary(
        cfg, log_history, prepared.stats, runtime=time.time() - started, train_seconds=train_seconds,
        tokens_seen=tokens_seen, peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(device),
        total_steps=last_step, device=str(device), reference_mode=reference_mode,
    )  # fmt: skip
    summary["reference_seconds"] = round(reference_seconds, 2)
    summary["compacted_frozen_linears"] = len(compacted)
    summary["train_peak_rss_mb"] = round(train_peak_rss_mb, 1)  # loading, reference and training
    summary["heap_trims"] = trimmer.trims
    summary["short_row_attention_layers"] = short_row_layers
    if bf16_grads is not None:
        summary["bf16_weight_grads"] = {"weights": len(bf16_grads.handles), "kept_fp32": len(bf16_grads.fp32_only),
                                        "held_directly": len(bf16_grads.rerouted)}  # fmt: skip
    summary["stopped_early"] = stopped
    summary["guard_warnings"] = guard_warnings
    report.write_reports(out, log_history, summary)
    return summary


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


class Bf16WeightGrads:
    """Gradients of Linear weights held in bf16 between backward and the optimizer step.

    Under bf16 autocast a Linear weight's gradient is a bf16 matmul result that autograd casts
    to fp32, so a bf16 copy holds the same numbers in half the memory (full fine-tuning of
    SmolLM2-135M: -212 MB at the end of backward, where the peak is with checkpointing).
    Bias-free ``nn.Linear`` layers run as ``HeldGradLinear`` under bf16 autocast and hand over
    the bf16 result itself; any other trainable fp32 Linear weight has a hook that moves its
    gradient out of ``.grad`` as backward produces it: the first time, it checks that the
    conversion is exact, and a weight whose gradient is not (say, a layer run in fp32) keeps
    fp32 gradients. A second gradient in the same step (gradient accumulation, a weight used
    twice) is added in fp32 as autograd would. ``clip_and_step`` then does what clip_grad_norm_
    and one optimizer step do, with the same numbers, upcasting a few tensors at a time.
    """

    def __init__(self, model: nn.Module, chunk_numel: int = 16 * 2**20):
        self.grads: dict[nn.Parameter, torch.Tensor] = {}
        self.checked: set[nn.Parameter] = set()
        self.fp32_only: set[nn.Parameter] = set()  # failed the exactness check
        self.chunk_numel = chunk_numel
        embed = model.get_input_embeddings().weight
        linears = [
            m for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.dtype == torch.float32
            and m.weight is not embed  # a tied head also gets the embedding's fp32 gradient
        ]  # fmt: skip
        self.handles = [m.weight.register_post_accumulate_grad_hook(self._take) for m in linears]
        self.rerouted = [m for m in linears if type(m) is nn.Linear and m.bias is None]
        for module in self.rerouted:  # an instance attribute: nn.Module.__call__ finds it first
            module.forward = functools.partial(self._linear_forward, module)

    def _linear_forward(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if (torch.is_grad_enabled() and torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == torch.bfloat16):  # fmt: skip
            return HeldGradLinear.apply(x, module.weight, self)
        return nn.Linear.forward(module, x)

    def _take(self, param: nn.Parameter) -> None:
        grad = param.grad
        if grad is None:  # HeldGradLinear's weight: its gradient is held already
            return
        param.grad = None
        self.add(param, grad, exact=False)

    def add(self, param: nn.Parameter, grad: torch.Tensor, exact: bool) -> None:
        """Hold ``grad`` for ``param``; ``exact``: ``grad`` is the bf16 matmul result itself."""
        previous = self.grads.get(param)
        if previous is not None:  # a second gradient this step: add in fp32, as autograd would
            self.grads[param] = previous.float() + grad
            return
        low = grad if exact else grad.to(torch.bfloat16)
        if param not in self.checked:
            self.checked.add(param)
            if not exact and not torch.equal(low.float(), grad):
                self.fp32_only.add(param)
        self.grads[param] = grad.float() if param in self.fp32_only else low

    def clip_and_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> float:
        """``clip_grad_norm_(params, max_norm)`` then ``optimizer.step()`` with the same numbers: the
        norm of the per-tensor norms of the fp32 gradients in parameter order, every gradient times
        the clamped coefficient, each parameter updated once (AdamW skips those without a gradient)."""
        # a bf16 gradient's norm accumulates in fp32: the same number as the norm of its fp32 upcast
        held = [self.grads.get(p, p.grad) for p in params]
        norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in held if g is not None]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms else torch.zeros(())
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        clips = coef.item() < 1.0  # times 1.0 changes no bit: skip that pass over every gradient
        pending = [p for p in params if p.grad is not None]  # gradients not held here, in fp32
        if clips:
            for p in pending:
                p.grad.mul_(coef)
        numel = 0
        for p in params:
            if p in self.grads:
                p.grad = self.grads.pop(p).float()
                if clips:
                    p.grad.mul_(coef)
                pending.append(p)
                numel += p.numel()
            if numel >= self.chunk_numel:
                self._step(optimizer, pending)
                pending, numel = [], 0
        if pending:
            self._step(optimizer, pending)
        return total.item()

    @staticmethod
    def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        optimizer.step()
        for p in params:
            p.grad = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.rerouted:
            del module.forward


class HeldGradLinear(torch.autograd.Function):
    """A bias-free Linear under bf16 autocast that hands its bf16 weight gradient to ``held``.

    The forward is the call autocast's linear makes (cast input and weight to bf16, ``mm`` with
    the transposed weight), and the backward the two ``mm`` calls autograd's makes, with the
    weight cast again as ``recast_saved_weight_casts`` does. Autograd would then cast the bf16
    weight gradient to fp32 and ``Bf16WeightGrads`` back to bf16; here it is held as it comes:
    the same numbers, two passes over every weight fewer per step (twin test in test_train.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, held: Bf16WeightGrads) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x2d = x.to(torch.bfloat16).reshape(-1, x.shape[-1])  # (N, in)
            out = x2d.mm(weight.to(torch.bfloat16).t())  # (N, out)
        ctx.save_for_backward(x2d)
        ctx.weight, ctx.held, ctx.x_shape = weight, held, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x2d,), weight = ctx.saved_tensors, ctx.weight
        grad2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad2d.mm(weight.to(grad.dtype)).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        ctx.held.add(weight, grad2d.t().mm(x2d), exact=True)  # (out, in) bf16
        return grad_x, None, None


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def return_free_memory() -> None:
    """Hand the heap memory glibc keeps after ``free`` back to the OS (costs a re-fault of it later)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return None


class HeapTrimmer:
    """glibc keeps freed heap chunks for reuse and they fragment: without a trim the RSS between
    steps creeps up by tens of MB a step, and the peak with it (SmolLM2-135M LoRA, bench/vs_trl.py
    case a: +390 MB over 8 steps). Trimming every step costs ~10% of step time (the memory is
    faulted back in), so trim only once the RSS after a step has grown ``slack_mb`` past the
    first step after the last trim."""

    def __init__(self, slack_mb: float = 256.0):
        self.slack_mb = slack_mb
        self.floor: float | None = None
        self.trims = 0

    def after_step(self) -> None:
        rss = current_rss_mb() if _malloc_trim is not None else None
        if rss is None:
            return
        if self.floor is None:
            self.floor = rss
        elif rss > self.floor + self.slack_mb:
            return_free_memory()
            self.trims += 1
            self.floor = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_gpu_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
