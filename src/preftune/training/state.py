"""What a run carries from step to step: the batch schedule, optimizer, learning-rate schedule and
checkpoints (save, find, prune, restore), and the output directory they live in."""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from preftune import report
from preftune.config import TrainConfig
from preftune.distributed import (
    Ranks, full_model_state, full_optimizer_state, is_sharded, load_full_model_state, load_full_optimizer_state,
)  # fmt: skip
from preftune.errors import PreftuneError
from preftune.memory import Bf16WeightGrads
from preftune.modeling import load_trainable_state, trainable_state
from preftune.util import atomic_dir


def check_output_dir(cfg: TrainConfig) -> Path:
    """The output directory, checked before anything loads: a usable path, and not a finished run
    unless ``overwrite_output_dir`` or ``resume_from_checkpoint`` says what to do with it. A run whose
    end was interrupted (an end-of-run checkpoint, no summary.json) is not finished: it resumes."""
    t = cfg.training
    out = Path(t.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise PreftuneError(f"output_dir '{out}' exists and is not a directory")
    if not out.exists():
        _check_creatable(out)
    end = end_checkpoint(out)
    finished = (out / "summary.json").exists() or ((out / "final").exists() and end is None)
    if finished and not t.overwrite_output_dir and not t.resume_from_checkpoint:
        raise PreftuneError(
            f"output_dir '{out}' already holds a finished run; set overwrite_output_dir: true or choose another"
        )
    if sorted_checkpoints(out) and end is None and not t.overwrite_output_dir and not t.resume_from_checkpoint:
        raise PreftuneError(f"output_dir '{out}' holds checkpoints of an earlier run; continue it with "
                            "resume_from_checkpoint=true, or set overwrite_output_dir: true")  # fmt: skip
    if t.overwrite_output_dir and not t.resume_from_checkpoint:
        _refuse_removing_inputs(cfg, out)
    if t.overwrite_output_dir and not t.resume_from_checkpoint and _holds_files(out) and not _is_run_dir(out):
        raise PreftuneError(f"overwrite_output_dir: '{out}' holds files but no preftune run; it is not removed, "
                            "choose another output_dir")  # fmt: skip
    return out


def _check_creatable(out: Path) -> None:
    """A directory can be made at ``out``: its nearest existing ancestor is a directory that takes a
    new entry (tried with a probe directory, removed at once)."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PreftuneError(f"output_dir '{out}': '{ancestor}' is a file, not a directory")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".preftune-probe-", dir=ancestor))
        probe.rmdir()
    except OSError as e:
        raise PreftuneError(f"output_dir '{out}' cannot be created in '{ancestor}' ({e.strerror})") from None


def _holds_files(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def _is_run_dir(out: Path) -> bool:
    return (out / ".preftune.lock").exists() or (out / "config.yaml").exists() and (
        (out / "log_history.json").exists() or (out / "checkpoints").is_dir())  # fmt: skip


RUN_OUTPUTS = ("config.yaml", "summary.json", "log_history.json", "training_metrics.csv", "training_curves.png",
               "eval.json", "report.md", "final", "adapter", "checkpoints", "runs")  # fmt: skip


def _refuse_removing_inputs(cfg: TrainConfig, out: Path) -> None:
    """``overwrite_output_dir`` removes the previous run's outputs: never an input of this run."""
    root = out.resolve()
    inputs = [cfg.model.model_name_or_path, cfg.data.train_file, cfg.data.eval_file, cfg.data.eval_prompts,
              cfg.data.retain_prompts]  # fmt: skip
    for value in inputs:
        if not value:
            continue
        path = Path(str(value)).expanduser().resolve()
        inside = [name for name in RUN_OUTPUTS if path == root / name or (root / name) in path.parents]
        if inside:
            raise PreftuneError(f"overwrite_output_dir would remove '{value}', an input of this run, with the "
                                f"previous run's {inside[0]}; choose another output_dir")  # fmt: skip


def clear_previous_run(out: Path) -> None:
    """``overwrite_output_dir``: the previous run's outputs (``RUN_OUTPUTS``, nothing else) are moved
    aside (one rename each, into a hidden directory) and removed before the new run writes anything."""
    aside = out / f".previous-run-{os.getpid()}"
    for stale in out.glob(".previous-run-*"):  # a removal interrupted before
        shutil.rmtree(stale, ignore_errors=True)
    entries = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if not entries:
        return
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    shutil.rmtree(aside)


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


class Schedule:
    """Every optimizer step as a list of global micro-batches of pair indices (each of
    ``per_device_train_batch_size × world_size`` pairs; under torchrun every rank takes its share of
    each). Built step by step when asked (``schedule[i]``): a run of 10^9 steps costs one epoch's order.

    Epoch e visits the pairs in a permutation seeded by (seed, e), so a resumed run sees exactly
    the batches an uninterrupted run would; an epoch's last step may hold fewer micro-batches.
    """

    def __init__(self, num_pairs: int, batch: int, accumulation: int, seed: int, total_steps: int | None = None):
        self.num_pairs, self.batch, self.accumulation, self.seed = num_pairs, batch, accumulation, seed
        self.steps_per_epoch = math.ceil(math.ceil(num_pairs / batch) / accumulation)
        self.total = total_steps if total_steps is not None else self.steps_per_epoch
        self._epoch: tuple[int, list[int]] | None = None  # the last epoch's order, kept

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int) -> list[list[int]]:
        if not 0 <= step < self.total:
            raise IndexError(step)
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch = (epoch, torch.randperm(self.num_pairs, generator=gen).tolist())
        order = self._epoch[1]
        first = within * self.accumulation * self.batch
        last = min(first + self.accumulation * self.batch, self.num_pairs)
        return [order[i : min(i + self.batch, last)] for i in range(first, last, self.batch)]

    def __iter__(self):
        return (self[i] for i in range(self.total))


def build_schedule(num_pairs: int, cfg: TrainConfig, world_size: int = 1) -> tuple[Schedule, int]:
    """The run's ``Schedule`` (``max_steps``, else ``num_train_epochs`` passes) and steps per epoch."""
    t = cfg.training
    schedule = Schedule(num_pairs, t.per_device_train_batch_size * world_size, t.gradient_accumulation_steps, t.seed)
    per_epoch = schedule.steps_per_epoch
    schedule.total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * per_epoch))
    return schedule, per_epoch


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
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2's DTensor gradients: the norm over every rank's shard
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, state: dict, ranks: Ranks = Ranks()) -> None:
    """Every rank calls this; rank 0 writes. A model sharded by FSDP2 is gathered whole first
    (weights as safetensors, AdamW's state keyed by parameter name), so the checkpoint is the same
    files at any world size and resumes at any other."""
    if is_sharded(model):
        weights = full_model_state(model)
        optim_state = {"optimizer_by_name": full_optimizer_state(model, optimizer)}
    elif ranks.is_main:
        weights, optim_state = trainable_state(model), {"optimizer": optimizer.state_dict()}
    if not ranks.is_main:
        return

    def write(tmp: Path) -> None:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(
            {
                **optim_state,
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


def restore_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Weights, optimizer, schedule, scaler and random states as they were at the checkpoint;
    returns its trainer state (step, log history, tokens seen, training seconds, the partly filled
    logging and guard windows). Written by a sharded or a replicated run, read by either."""
    weights = load_file(path / "trainable.safetensors")
    blob = load_training_state(path / "training_state.pt")
    if is_sharded(model):
        load_full_model_state(model, weights)
        by_name = blob.get("optimizer_by_name") or optimizer_state_by_name(model, blob["optimizer"])
        load_full_optimizer_state(model, optimizer, by_name)
    else:
        load_trainable_state(model, weights)
        if "optimizer_by_name" in blob:
            optimizer.load_state_dict(optimizer_state_by_index(model, blob["optimizer_by_name"]))
        else:
            optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    random.setstate(blob["rng"]["python"])
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return json.loads((path / "trainer_state.json").read_text())


def _trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]  # the optimizer's order


def optimizer_state_by_name(model, state: dict) -> dict:
    """torch's optimizer state (parameters numbered in the optimizer's order) keyed by name instead."""
    names = _trainable_names(model)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_index(model, state: dict) -> dict:
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    groups = [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


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
    out = Path(cfg.training.output_dir).expanduser()
    if resume in (None, False):
        end = end_checkpoint(out)
        if end is not None and not (out / "summary.json").exists() and not cfg.training.overwrite_output_dir:
            report.console.print(f"{out} holds a run stopped while writing its results: finishing it from {end}")
            return end
        return None
    if resume is True or resume == "true":
        ckpts = sorted_checkpoints(out)
        if not ckpts:
            raise PreftuneError(f"resume_from_checkpoint: no checkpoint in {out}/checkpoints")
        return ckpts[-1]
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise PreftuneError(f"resume_from_checkpoint: '{resume}' is not a checkpoint directory")
    return path


def end_checkpoint(out: Path) -> Path | None:
    """The checkpoint of a run's last step, written before its final evaluation, final/ and reports."""
    ckpts = sorted_checkpoints(out)
    if not ckpts:
        return None
    try:
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return ckpts[-1] if state.get("end_of_run") else None


def run_identity(cfg: TrainConfig, prepared, world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint must share with the config that resumes it (the global batch too: another
    one would visit other pairs at the same step; the world size may change with it)."""
    from preftune.refcache import fingerprint_pairs

    m = cfg.model
    identity: dict[str, Any] = {"model": m.model_name_or_path, "finetuning_type": m.finetuning_type}
    if m.finetuning_type == "lora":
        identity["lora"] = [m.lora_r, m.lora_alpha, str(m.lora_target)]
    identity["training data"] = fingerprint_pairs(prepared.train)
    t = cfg.training
    identity["global batch"] = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    return identity


def remove_end_checkpoint(out: Path) -> None:
    end = end_checkpoint(out)
    if end is not None:
        shutil.rmtree(end)
        if not any(end.parent.iterdir()):
            end.parent.rmdir()


def check_run_identity(checkpoint: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another run: another model, fine-tuning type, LoRA shape or
    training data (token ids) than this config's."""
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("run_identity")
    except (OSError, ValueError) as e:
        raise PreftuneError(f"resume_from_checkpoint: {checkpoint}/trainer_state.json cannot be read ({e})") from None
    if saved is None:
        return  # written before checkpoints recorded it
    for key, value in identity.items():
        if saved.get(key) != value:
            raise PreftuneError(f"resume_from_checkpoint: {checkpoint} belongs to another run: its {key} is "
                                f"{saved.get(key)!r}, this config's {value!r}")  # fmt: skip


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
