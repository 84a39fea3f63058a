"""Reference log-probs computed once and cached on disk.

The reference model is frozen, so its log-probs of every pair are fixed for a run. Computing
them up front removes the reference forward from every step (and, for full fine-tuning, the
reference weights from memory). They are stored under ``$PREFTUNE_HOME/ref_logps/`` keyed by
the reference weights, the token ids of the pairs (which carry the data and the tokenization
settings) and the precision, so a sweep over beta or learning rate pays for them once.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from preftune.distributed import Ranks
from preftune.packing import segment_length
from preftune.types import TokenizedPair
from preftune.util import atomic_write

CACHE_VERSION = 3  # bump when the log-prob computation changes (3: batches in order of length)


@dataclass
class RefLogps:
    chosen: Tensor  # (B,) summed reference log-probs of the chosen completions
    rejected: Tensor

    def select(self, indices: list[int]) -> "RefLogps":
        idx = torch.tensor(indices, dtype=torch.long)
        return RefLogps(self.chosen[idx], self.rejected[idx])

    def to(self, device) -> "RefLogps":
        return RefLogps(self.chosen.to(device), self.rejected.to(device))


def _tensor_digest(tensor: Tensor) -> bytes:
    flat = tensor.detach().contiguous().view(-1).cpu()
    # sha256 has CPU instructions almost everywhere; memoryview avoids a copy of the bytes
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).digest()


def fingerprint_reference(model: nn.Module) -> str:
    """Hash of the reference weights: names (LoRA wrappers stripped), dtypes, shapes and bytes.

    For a PEFT model the reference is the adapter-disabled base, so LoRA tensors are skipped.
    Tensors are hashed on a thread pool (hashlib releases the GIL), then combined in order.
    """
    named = [(name, p) for name, p in model.named_parameters() if "lora_" not in name]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: _tensor_digest(item[1]), named))
    h = hashlib.blake2b(digest_size=16)
    for (name, param), digest in zip(named, digests):
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        h.update(f"{name}|{param.dtype}|{tuple(param.shape)}".encode())
        h.update(digest)
    return h.hexdigest()


def fingerprint_pairs(pairs: list[TokenizedPair]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


def compute_reference_logps(reference, pairs, forward, batch_size, autocast, ranks: Ranks = Ranks()) -> RefLogps:
    """``forward(model, pairs) -> PairForward`` is the trainer's forward (fast or padded path).

    Batches take the pairs in order of length, so the rows of a batch are about as long as
    each other and little of the work is padding; the result is in the order of ``pairs``.
    Under torchrun each rank computes every W-th batch (the same batches as one process) and the
    results are summed over the ranks (each pair's entry is non-zero on one rank only).
    """
    order = sorted(range(len(pairs)), key=lambda i: segment_length(pairs[i]))
    chosen = torch.zeros(len(pairs), dtype=torch.float32)
    rejected = torch.zeros(len(pairs), dtype=torch.float32)
    model = reference.model
    was_training = model.training
    model.eval()
    for i in range(0, len(pairs), batch_size):
        if not ranks.mine(i // batch_size):
            continue
        batch = order[i : i + batch_size]
        with torch.inference_mode(), reference.context(), autocast():
            out = forward(model, [pairs[j] for j in batch])
            logps = out.chosen.logps.float().cpu(), out.rejected.logps.float().cpu()
        chosen[batch], rejected[batch] = logps  # outside inference mode: normal tensors, usable next to autograd
    model.train(was_training)
    ranks.sum_tensor_(chosen)
    ranks.sum_tensor_(rejected)
    return RefLogps(chosen, rejected)


def load_or_compute(
    reference, pairs, *, forward, batch_size, autocast, precision: str, cache_dir: Path,
    reference_fingerprint: str, ranks: Ranks = Ranks(),
) -> tuple[RefLogps, bool]:  # fmt: skip
    """Cached reference log-probs of ``pairs``; returns (logps, cache_hit). Under torchrun the ranks
    compute them together unless every rank finds the cache (nodes need not share a disk), and
    rank 0 alone writes it."""
    key = hashlib.blake2b(
        f"v{CACHE_VERSION}|{reference_fingerprint}|{fingerprint_pairs(pairs)}|{precision}".encode(), digest_size=16
    ).hexdigest()
    path = cache_dir / f"{key}.safetensors"
    cached = _read_cache(path, len(pairs))
    (missing,) = ranks.max([float(cached is None)])
    if not missing:
        return cached, True
    logps = compute_reference_logps(reference, pairs, forward, batch_size, autocast, ranks)
    if ranks.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"chosen": logps.chosen, "rejected": logps.rejected}, tmp))
    return logps, False


def _read_cache(path: Path, num_pairs: int) -> RefLogps | None:
    if not path.is_file():
        return None
    blob = load_file(path)
    if blob["chosen"].numel() != num_pairs:
        return None
    return RefLogps(blob["chosen"], blob["rejected"])
