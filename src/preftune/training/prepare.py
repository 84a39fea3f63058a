"""Everything a run needs before its first step: data and token ids, the forward, the reference
log-probs, the collapse guard."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from preftune import data as data_mod
from preftune import report
from preftune.batching import collate_padded
from preftune.config import TrainConfig
from preftune.distributed import Ranks, shard_model
from preftune.errors import PreftuneError
from preftune.forward import PairForward, forward_fast, forward_padded
from preftune.guard import CollapseGuard
from preftune.memory.precision import autocast_dtype, precision_name
from preftune.modeling import Reference, preftune_home
from preftune.refcache import RefLogps, fingerprint_reference, load_or_compute
from preftune.templates import TokenizeStats, tokenize_pairs
from preftune.types import PreferencePair, TokenizedPair

Forward = Callable[[nn.Module, list[TokenizedPair]], PairForward]
RefSource = Callable[[list[int], list[TokenizedPair]], RefLogps | None]  # (pair indices, pairs) -> reference


# ---------------------------------------------------------------- data


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    stats: dict[str, Any]
    eval_pairs: list[PreferencePair]  # untokenized, for the final report


def run_generate_step(cfg: TrainConfig, ranks: Ranks = Ranks(), allow_code: bool = False) -> None:
    """A recipe's `generate:` line builds train_file when it does not exist yet (rank 0 builds it,
    the other ranks wait for it)."""
    step = cfg.data.generate
    if not step or cfg.data.train_file is None:
        return
    if not ranks.is_main:
        ranks.barrier(patient=True)  # generating may take hours: not bounded by ddp_timeout
        if not Path(cfg.data.train_file).exists():
            raise PreftuneError(f"train_file {cfg.data.train_file} was not written by rank 0's generate step "
                                "(nodes without a shared disk: generate it before launching)", rank_only=True)  # fmt: skip
        return
    try:
        _generate_train_file(cfg, step, allow_code)
    finally:
        ranks.barrier(patient=True)  # also when it failed: the other ranks stop on the missing file, not on a timeout


# options of `preftune generate ...` whose value is a file it writes
WRITTEN_BY_GENERATE = ("--output", "--heldout-output", "--heldout-prompts")


def runs_no_code(reward: str) -> bool:
    """The built-in rewards (best_of_n.load_reward); anything else names Python to import."""
    reward = reward.strip()
    return reward in ("length", "-length") or reward.startswith(("regex:", "keyword:"))


def check_generate_step(args: list[str], base_dir: Path, allow_code: bool) -> None:
    """A recipe's `generate:` line comes from a file, maybe someone else's: it may write only under the
    recipe's own directory (not under output_dir, which the same file names), and it may run code
    (``--reward module:function``) only when the command line says ``--allow-code``."""
    roots = [base_dir.resolve()]
    for i, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if option in WRITTEN_BY_GENERATE and value:
            target = (base_dir / Path(value).expanduser()).resolve()
            if not any(target == root or root in target.parents for root in roots):
                raise PreftuneError(f"generate: {option} {value} writes outside the recipe's directory "
                                    f"{base_dir}; a recipe may not write there")  # fmt: skip
        if option == "--reward" and value and not runs_no_code(value) and not allow_code:
            raise PreftuneError(f"generate: --reward {value} runs Python code named in the recipe; pass --allow-code "
                                "on the command line to allow it")  # fmt: skip


def _generate_train_file(cfg: TrainConfig, step, allow_code: bool = False) -> None:
    if Path(cfg.data.train_file).exists():
        return
    args = shlex.split(step) if isinstance(step, str) else [str(a) for a in step]
    check_generate_step(args, Path(cfg.base_dir or "."), allow_code)
    report.console.print(f"{cfg.data.train_file} does not exist yet: preftune generate {shlex.join(args)}")
    cmd = [sys.executable, "-P", "-m", "preftune.cli", "generate", *args]  # -P: nothing imported from cwd
    if subprocess.run(cmd, cwd=cfg.base_dir or None).returncode != 0:
        raise PreftuneError(f"the generate step failed: preftune generate {shlex.join(args)}")
    if not Path(cfg.data.train_file).exists():
        raise PreftuneError(f"the generate step did not write train_file {cfg.data.train_file}")


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

    kwargs = dict(system_prompt=d.system_prompt, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                  special_tokens_in_text=d.special_tokens_in_text)  # fmt: skip
    train, train_stats = tokenize_pairs(train_pairs, tokenizer, **kwargs)
    evals, eval_stats = tokenize_pairs(eval_pairs, tokenizer, **kwargs) if eval_pairs else ([], TokenizeStats())
    if eval_pairs:  # eval data none of which survived: say so now, not after training
        data_mod.require_eval_pairs(vars(eval_stats), d.eval_file or f"eval_split {d.eval_split}", d.max_length)
    if not train:
        raise PreftuneError(
            f"no usable training pairs: {train_stats.total} loaded, {train_stats.dropped_truncated} dropped by "
            f"truncation (max_length={d.max_length}), {train_stats.dropped_identical} with chosen == rejected"
        )
    stats = {"train": vars(train_stats), "eval": vars(eval_stats)}
    return PreparedData(train, evals, stats, eval_pairs)


# ---------------------------------------------------------------- forward


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


# ---------------------------------------------------------------- ranks


def shard_if_fsdp(cfg: TrainConfig, model: nn.Module, ranks: Ranks, precompute: bool) -> bool:
    """``distributed: fsdp`` under torchrun: shard the policy with FSDP2 (before the optimizer is
    made, which then holds only this rank's shards). Returns whether it did."""
    if not ranks.enabled or cfg.training.distributed != "fsdp":
        return False
    if cfg.model.finetuning_type == "lora":
        report.print_warning("distributed: fsdp shards full fine-tuning; LoRA runs as ddp (the frozen base is "
                             "replicated, its adapters are small)")  # fmt: skip
        return False
    if not precompute:
        raise PreftuneError("distributed: fsdp holds no reference weights during training: keep "
                            "precompute_ref_log_probs on (or use distributed: ddp)")  # fmt: skip
    amp = autocast_dtype(cfg)
    layers = shard_model(model, amp if amp == torch.bfloat16 else None)
    report.console.print(f"fsdp: {layers} decoder layers and the root sharded over {ranks.world_size} ranks")
    return True


# ---------------------------------------------------------------- reference


def precomputes_reference(cfg: TrainConfig, needs_reference: bool) -> bool:
    """Reference log-probs computed once before training (the default where a loss needs them)."""
    precompute = cfg.training.precompute_ref_log_probs
    return precompute if precompute is not None else needs_reference


@dataclass
class ReferenceLogps:
    train: RefLogps | None = None  # cached log-probs of every training pair, or None: see ``mode``
    eval: RefLogps | None = None
    seconds: float = 0.0  # computing (or loading) the cached ones
    mode: str = "none"  # for the summary: "none", "on the fly" or "cached (...)"


def precompute_reference_logps(cfg: TrainConfig, reference: Reference | None, prepared: PreparedData,
                               forward: Forward, autocast, precompute: bool,
                               ranks: Ranks = Ranks()) -> ReferenceLogps:  # fmt: skip
    """Reference log-probs once, cached on disk, instead of a reference forward every step (under
    torchrun each rank computes a share of the batches)."""
    if reference is None:
        return ReferenceLogps()
    if not precompute:
        return ReferenceLogps(mode="on the fly")
    started = time.time()
    cache_kwargs = dict(
        forward=forward, batch_size=cfg.training.per_device_eval_batch_size, autocast=autocast,
        precision=precision_name(cfg), cache_dir=preftune_home() / "ref_logps",
        reference_fingerprint=fingerprint_reference(reference.model), ranks=ranks,
    )  # fmt: skip
    cached_train, hit = load_or_compute(reference, prepared.train, **cache_kwargs)
    cached_eval = None
    if prepared.eval:
        cached_eval, _ = load_or_compute(reference, prepared.eval, **cache_kwargs)
    seconds = time.time() - started
    mode = f"cached ({'reused' if hit else 'computed'} in {seconds:.1f}s)"
    return ReferenceLogps(cached_train, cached_eval, seconds, mode)


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


# ---------------------------------------------------------------- collapse guard


def build_guard(cfg: TrainConfig, model: nn.Module, tokenizer, eval_prompts: list, retain_prompts: list,
                autocast) -> CollapseGuard:  # fmt: skip
    """The collapse guard; its "healthy" snapshot starts from the weights training continues from."""
    t = cfg.training
    return CollapseGuard(
        model, tokenizer, eval_prompts[: t.guard_prompts], max_logp_drop=t.collapse_max_logp_drop,
        system_prompt=cfg.data.system_prompt, max_new_tokens=t.guard_max_new_tokens,
        keep_healthy=t.stop_on_collapse, retain_prompts=retain_prompts, max_retain_drop=t.collapse_max_retain_drop,
        autocast=autocast,
    )  # fmt: skip
