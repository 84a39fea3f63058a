"""Several processes under torchrun: which rank this is, which pairs are its own, and sums over ranks.

A run on W ranks with ``per_device_train_batch_size`` b gives the numbers of one process with batch
W·b: the schedule is built once over global micro-batches of W·b pairs (every rank builds the same
one), each rank takes its share of every micro-batch (balanced by tokens), every loss is divided by
the pair count of the whole optimizer step, and the gradients are summed over the ranks once per
optimizer step. The metrics are sums and counts, summed the same way.

One process (no torchrun) is ``Ranks()``: world size 1, every collective a no-op.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from preftune.errors import PreftuneError

BUCKET_BYTES = 32 * 2**20  # gradients are summed in flat buckets of about this size


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" once the process group is up
    lockstep: bool = False  # FSDP: every rank runs every forward and backward (their collectives pair up)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _device(self) -> torch.device:  # where tensors of a collective live
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def print_setup(self, mode: str, per_device: int, accumulation: int) -> None:
        if self.enabled:
            from preftune import report

            report.console.print(f"distributed: {self.world_size} ranks ({self.backend}), {mode}; global batch "
                                 f"{per_device} x {accumulation} x {self.world_size}")  # fmt: skip

    # ------------------------------------------------------------ sharding

    def shard(self, indices: list[int], sizes: list[int]) -> list[int]:
        """This rank's pairs of a global micro-batch: at most ceil(n / W) each, tokens balanced
        (longest pair first to the rank with the fewest tokens so far); in the order of ``indices``.
        ``sizes[i]`` is the token count of ``indices[i]``; every rank computes the same split."""
        if not self.enabled:
            return list(indices)
        cap = -(-len(indices) // self.world_size)
        load = [0] * self.world_size
        count = [0] * self.world_size
        owner = [0] * len(indices)
        for pos in sorted(range(len(indices)), key=lambda p: (-sizes[p], p)):
            r = min((r for r in range(self.world_size) if count[r] < cap), key=lambda r: (load[r], r))
            owner[pos] = r
            load[r] += sizes[pos]
            count[r] += 1
        return [idx for pos, idx in enumerate(indices) if owner[pos] == self.rank]

    def share(self, indices: list[int], sizes: list[int]) -> tuple[list[int], float]:
        """(pairs, weight) this rank runs of a global micro-batch: its ``shard`` with weight 1. When that
        is empty (the last micro-batch of an epoch may leave a rank nothing): nothing, or in ``lockstep``
        the batch's first pair with weight 0 (FSDP's collectives need every rank in every forward)."""
        mine = self.shard(indices, sizes)
        if mine or not self.lockstep:
            return mine, 1.0
        return indices[:1], 0.0

    def any_signal(self, received: signal.Signals | None) -> signal.Signals | None:
        """A stop signal received by any rank (SIGTERM where another rank got it): all stop together."""
        (requests,) = self.max([float(received is not None)])
        return (received or signal.SIGTERM) if requests else None

    def mine(self, batch_number: int) -> bool:
        """Round-robin ownership of whole batches (reference precompute, evaluation)."""
        return batch_number % self.world_size == self.rank

    # ------------------------------------------------------------ collectives

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64, so counts stay exact)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum_tensor_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks in place (moved to the collective's device and back)."""
        if self.enabled:
            t = tensor.to(self._device)
            dist.all_reduce(t)
            if t is not tensor:
                tensor.copy_(t)
        return tensor

    def sum_gradients(self, params: list[nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in flat buckets. A rank whose share of the
        step was empty (or never reached a parameter) adds zeros; a parameter no rank reached keeps
        no gradient, as in one process (the optimizer skips it)."""
        if not self.enabled:
            return
        reached = self.sum([float(p.grad is not None) for p in params])
        bucket: list[nn.Parameter] = []
        size = 0
        for p, count in zip(params, reached):
            if count == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
            if size >= BUCKET_BYTES:
                self._sum_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, bucket: list[nn.Parameter]) -> None:
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in bucket:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group]).to(self._device)
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Every rank starts from rank 0's weights (trainable ones: LoRA's initialisation)."""
        if not self.enabled:
            return
        for p in model.parameters():
            if p.requires_grad:
                t = p.data.to(self._device)
                dist.broadcast(t, src=0)
                if t is not p.data:
                    p.data.copy_(t)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (small picklable values: a decision, a dict)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._device if self.backend == "nccl" else None)
        return box[0]

    def barrier(self, patient: bool = False) -> None:
        """Wait for every rank; ``patient``: while rank 0 alone does long work (a recipe's generate step,
        the final report), not bounded by ``ddp_timeout`` (a gloo group with a week's timeout)."""
        if not self.enabled:
            return
        if patient:
            dist.barrier(group=_patient_group())
        else:
            dist.barrier()

    def same_on_all(self, value: int, what: str) -> None:
        """One line, on every rank, when ranks disagree (e.g. nodes whose disks hold different checkpoints)."""
        low, high = self.max([-value, value])
        if -low != high:
            raise PreftuneError(f"the ranks disagree on {what} ({-low} to {high}): do all nodes see the same "
                                "output_dir?", rank_only=True)  # fmt: skip


_PATIENT_GROUP = None


def _patient_group():
    global _PATIENT_GROUP
    if _PATIENT_GROUP is None:
        _PATIENT_GROUP = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return _PATIENT_GROUP


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_ranks(device_name: str, timeout_seconds: int) -> tuple[Ranks, str]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) and name this rank's device
    (``cuda:LOCAL_RANK`` for "auto" or "cuda"); one process: ``Ranks()`` and the name unchanged."""
    rank, world, local_rank = launched_ranks()
    if world <= 1:
        return Ranks(), device_name
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if device_name not in ("auto", "cuda"):
            raise PreftuneError(f"device '{device_name}' under torchrun: use device: auto or cuda (each rank takes "
                                "cuda:LOCAL_RANK)")  # fmt: skip
        if local_rank >= torch.cuda.device_count():
            raise PreftuneError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                                "devices (--nproc_per_node too large?)", rank_only=True)  # fmt: skip
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return Ranks(rank, world, local_rank, backend), device_name


def close_ranks(ranks: Ranks) -> None:
    global _PATIENT_GROUP
    if ranks.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _PATIENT_GROUP = None


# ---------------------------------------------------------------- FSDP2


def shard_model(model: nn.Module, param_dtype: torch.dtype | None) -> int:
    """``distributed: fsdp``: FSDP2 ``fully_shard`` on every decoder layer, then on the root (the
    embedding, final norm and LM head). ``param_dtype``: the MixedPrecisionPolicy's compute dtype (bf16), None
    for fp32. The fast path's packed scoring is registered as a forward method of the root, so the
    root's weights are gathered around it. FSDP2 averages the ranks' gradients (gloo has no
    pre-multiplied sum to turn that off): the loop scales its backward by the world size. Returns
    the number of sharded layers."""
    from types import MethodType

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from preftune.forward import SCORE_METHOD, score_positions

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise PreftuneError(f"distributed: fsdp needs a decoder with .layers; {type(model).__name__} has none "
                            "(use distributed: ddp)")  # fmt: skip
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)

    def score_sharded(self, inputs, pred_index, target_ids, chunk_size):
        # the tied-head projection hooks a gradient on the gathered weight: plain autograd here
        return score_positions(self, inputs, pred_index, target_ids, chunk_size, tied_projection=False)

    setattr(model, SCORE_METHOD, MethodType(score_sharded, model))
    register_fsdp_forward_method(model, SCORE_METHOD)
    model._is_fsdp_managed_module = True  # transformers' generate then keeps the ranks in step (synced_gpus)
    return len(layers)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the CPU of rank 0 (None on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    names = {name for name, _ in model.named_parameters()}  # a tied head once, as one process saves it
    return {k: v for k, v in state.items() if k in names}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every rank passes the whole state; each keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: a tied head is saved once (under the embedding's name), as named_parameters has it
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """AdamW's state keyed by parameter name, whole, on the CPU of rank 0 (None on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return state if dist.get_rank() == 0 else None


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
