"""What a run measures: the per-pair loss inputs, the metrics logged under TRL's names, evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from preftune import losses
from preftune.config import TrainConfig
from preftune.distributed import Ranks
from preftune.forward import PairForward
from preftune.refcache import RefLogps
from preftune.types import TokenizedPair

METRIC_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)  # fmt: skip


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


TOKENS_COUNTED = "P + C + R per pair: the prompt once, as the packed fast path feeds it"


def sequence_tokens(pairs: list[TokenizedPair]) -> int:
    """Tokens of the pairs as ``TOKENS_COUNTED`` says (the padded path feeds the prompt twice, which is
    not counted twice: the same pairs give the same rate whichever path computes them)."""
    return sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


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

    def sum_over_ranks(self, ranks: Ranks) -> None:
        """The sums and counts of every rank's pairs (the step's loss and norm are global already)."""
        keys = list(self.sums)
        values = [self.sums[k] for k in keys] + [self.pairs, self.chosen_tokens, self.rejected_tokens, self.tokens]
        summed = ranks.sum(values)
        self.sums = dict(zip(keys, summed[: len(keys)]))
        pairs, self.chosen_tokens, self.rejected_tokens, tokens = summed[len(keys) :]
        self.pairs, self.tokens = int(pairs), int(tokens)

    def state(self, ranks: Ranks) -> dict[str, Any]:
        """What a checkpoint keeps of a partly filled window: the sums over all ranks (every rank
        must call this: it is a collective)."""
        total = StepMetrics(dict(self.sums), self.pairs, self.chosen_tokens, self.rejected_tokens, self.loss,
                            self.grad_norm, self.steps, self.tokens, self.seconds)  # fmt: skip
        total.sum_over_ranks(ranks)
        return asdict(total)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, ranks: Ranks) -> StepMetrics:
        """The window a checkpoint kept; its per-pair sums on rank 0 only (they are summed over the
        ranks again at the next log), the step-level values (global already) on every rank."""
        if not state:
            return cls()
        window = cls(**state)
        if not ranks.is_main:
            window.sums = {k: 0.0 for k in METRIC_KEYS}
            window.pairs, window.chosen_tokens, window.rejected_tokens, window.tokens = 0, 0.0, 0.0, 0
        return window

    def add_step(self, loss: float, grad_norm: float, seconds: float) -> None:
        self.loss += loss
        self.grad_norm += grad_norm
        self.steps += 1
        self.seconds += seconds

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

    def log_row(self, learning_rate: float, step: int, steps_per_epoch: int) -> dict[str, Any]:
        """The log_history row of the steps since the last log."""
        return {
            "loss": self.loss / self.steps,
            "grad_norm": self.grad_norm / self.steps,
            "learning_rate": learning_rate,
            **self.means(),
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
            "epoch": round(step / steps_per_epoch, 4),
            "step": step,
        }


@torch.no_grad()
def evaluate(model, forward, ref_for, pairs, cfg, autocast, ranks: Ranks = Ranks()) -> dict[str, float]:
    """Loss and metrics over the held-out ``pairs`` (``forward`` and ``ref_for`` as in training);
    under torchrun each rank scores every W-th batch and the sums are added up."""
    was_training = model.training
    model.eval()
    metrics = StepMetrics()
    tokens_mean = sum(len(p.chosen_ids) for p in pairs) / len(pairs)
    bs = cfg.training.per_device_eval_batch_size
    total_loss = 0.0
    batches = [list(range(i, min(i + bs, len(pairs)))) for i in range(0, len(pairs), bs)]
    for first in range(0, len(batches), ranks.world_size):
        # round robin; past the end, under FSDP (lockstep) a rank scores batch 0 and drops it
        mine = first + ranks.rank < len(batches)
        if not mine and not ranks.lockstep:
            break
        indices = batches[first + ranks.rank] if mine else batches[0]
        chunk = [pairs[i] for i in indices]
        with autocast():
            pol = forward(model, chunk)
        if not mine:
            continue
        lp = pair_logps(pol, ref_for(indices, chunk), tokens_mean)
        total_loss += losses.combined_loss(lp, cfg.loss_types, cfg.loss.loss_weights, loss_params(cfg)).sum().item()
        metrics.add_pairs(pol, lp, cfg)
    model.train(was_training)
    metrics.sum_over_ranks(ranks)
    (total_loss,) = ranks.sum([total_loss])
    return {"eval_loss": total_loss / len(pairs), **metrics.means(prefix="eval_")}
