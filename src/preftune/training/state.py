"""What a run carries from step to step: the batch schedule, optimizer, learning-rate schedule and
checkpoints (save, find, prune, restore), and the output directory they live in."""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from preftune.config import TrainConfig
from preftune.errors import PreftuneError
from preftune.memory import Bf16WeightGrads
from preftune.modeling import load_trainable_state, trainable_state
from preftune.util import atomic_dir


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


@contextmanager
def lock_output_dir(out: Path):
    """Hold ``out/.preftune.lock`` while a run writes into ``out``: a second run on the same directory
    gets a one-line error naming the first one's pid instead of racing it (flock: released by the
    kernel when the holder dies, so a killed run leaves no stale lock)."""
    path = out / ".preftune.lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise PreftuneError(f"output_dir '{out}' is in use by another preftune run (pid {holder}); wait for it "
                                "or choose another output_dir") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock


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


def make_optimizer(params: list[torch.nn.Parameter], t) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over all tensors, as transformers' Trainer uses since
    torch 2.8) where the parameters' device and dtype support it, else the plain one."""
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                  weight_decay=t.weight_decay)  # fmt: skip
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int):
    """transformers' learning-rate schedule; warmup_steps wins over warmup_ratio."""
    from transformers import get_scheduler

    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_grad_norm: float, scaler,
                  bf16_grads: Bf16WeightGrads | None) -> float:  # fmt: skip
    """Unscale (fp16), clip the gradient norm to ``max_grad_norm`` (0: no clipping) and take one
    optimizer step; returns the norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    if bf16_grads is not None:  # the same clip and step, over the gradients it holds in bf16
        return bf16_grads.clip_and_step(optimizer, params, max_norm)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, state: dict) -> None:
    def write(tmp: Path) -> None:
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

    atomic_dir(path, write)


def restore_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> tuple[int, list[dict[str, Any]], int, float]:
    """Weights, optimizer, schedule, scaler and random states as they were at the checkpoint;
    returns (step, log history, tokens seen, training seconds) so far."""
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    blob = load_training_state(path / "training_state.pt")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    random.setstate(blob["rng"]["python"])
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    state = json.loads((path / "trainer_state.json").read_text())
    return state["step"], state["log_history"], state["tokens_seen"], state["train_seconds"]


def load_training_state(file: Path) -> dict[str, Any]:
    """Optimizer, scheduler, scaler and RNG states, loaded with ``weights_only=True``: tensors and
    plain containers only, so a checkpoint from someone else cannot run code when resumed."""
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:  # a crafted pickle (refused by the weights-only unpickler) or a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PreftuneError(f"resume_from_checkpoint: {file} cannot be loaded safely ({reason[:200]})") from None


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
