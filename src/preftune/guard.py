"""Collapse guard: notice when DPO is wrecking the model, and stop before it is wrecked.

Seed 003 trained with lr 5e-5 and ended with "Deep deep Deep Deep...". Two signs show up
before that: the policy's log-prob of the *chosen* answers falls far below the reference's
(DPO can raise the margin by pushing both answers down), and free generations start to
repeat themselves. The guard checks both every ``eval_steps`` (or ``logging_steps``) and
keeps a copy of the last healthy weights so a stopped run still ends with a usable model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from preftune.generation import degeneration, generate
from preftune.modeling import load_trainable_state, trainable_state


@dataclass
class GuardVerdict:
    step: int
    chosen_logp_drop: float | None  # nats per chosen token the policy lost against the reference
    degenerate: int  # degenerate answers among the guard prompts
    baseline_degenerate: int  # ... for the starting model
    answers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.reasons

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "guard/degenerate": self.degenerate}
        if self.chosen_logp_drop is not None:
            row["guard/chosen_logp_drop"] = self.chosen_logp_drop
        return row


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: on CPU trainable_state's tensors share storage with the live parameters
    return {name: t.clone() for name, t in trainable_state(model).items()}


class CollapseGuard:
    def __init__(self, model: nn.Module, tokenizer, prompts: list, *, max_logp_drop: float, system_prompt=None,
                 max_new_tokens: int = 48, keep_healthy: bool = True) -> None:  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.max_logp_drop = max_logp_drop
        self.gen_kwargs = dict(system_prompt=system_prompt, max_new_tokens=max_new_tokens, batch_size=8)
        self.drop_sum = 0.0  # sum over pairs of per-token chosen drop since the last check
        self.drop_pairs = 0
        self.baseline = self._count_degenerate(self._answers()) if prompts else 0
        self.healthy_step = 0
        # a full fine-tuning snapshot is a second copy of the weights: only kept when it may be restored
        self.keep_healthy = keep_healthy
        self.healthy_state = snapshot(model) if keep_healthy else None

    def observe(self, chosen_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None, tokens: torch.Tensor) -> None:
        if ref_chosen_logps is None:
            return
        drop = (ref_chosen_logps - chosen_logps.detach()) / tokens.clamp(min=1)
        self.drop_sum += drop.sum().item()
        self.drop_pairs += drop.numel()

    def _answers(self) -> list[str]:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            answers = [row[0] for row in generate(self.model, self.tokenizer, self.prompts, **self.gen_kwargs)]
        self.model.train(was_training)
        return answers

    @staticmethod
    def _count_degenerate(answers: list[str]) -> int:
        return sum(degeneration(a)["degenerate"] for a in answers)

    def check(self, step: int) -> GuardVerdict:
        drop = self.drop_sum / self.drop_pairs if self.drop_pairs else None
        self.drop_sum, self.drop_pairs = 0.0, 0
        answers = self._answers() if self.prompts else []
        verdict = GuardVerdict(step, drop, self._count_degenerate(answers), self.baseline, answers)
        if drop is not None and drop > self.max_logp_drop:
            verdict.reasons.append(
                f"chosen log-probs fell {drop:.2f} nats/token below the reference's (limit {self.max_logp_drop})"
            )
        if verdict.degenerate > self.baseline:
            example = next(a for a in answers if degeneration(a)["degenerate"])
            verdict.reasons.append(
                f"{verdict.degenerate}/{len(answers)} held-out answers degenerate (the starting model: "
                f"{self.baseline}), e.g. {example[:60]!r}"
            )
        if verdict.healthy:
            self.healthy_step = step
            if self.keep_healthy:
                self.healthy_state = snapshot(self.model)
        return verdict

    def restore_healthy(self) -> int:
        if self.healthy_state is None:
            raise RuntimeError("CollapseGuard(keep_healthy=False) has no healthy weights to restore")
        load_trainable_state(self.model, self.healthy_state)
        return self.healthy_step
