"""Collapse guard: notice when DPO is wrecking the model, and stop before it is wrecked.

Seed 003 trained with lr 5e-5 and ended with "Deep deep Deep Deep...". Three signs show up
before that: the policy's log-prob of the *chosen* answers falls far below the reference's
(DPO can raise the margin by pushing both answers down); free generations start to repeat
themselves; and the model stops giving its original answers to prompts training should not
touch (``retain_prompts``: "What is the capital of France?" -> "Bonjour, I'm Amma..."), measured
as the nats per token the policy lost on the original model's own answers to them. The guard
checks these every ``eval_steps`` (or ``logging_steps``) and keeps a copy of the last healthy
weights (with ``keep_healthy``) so a stopped run still ends with a usable model.
"""

from __future__ import annotations

import contextlib
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
    retain_logp_drop: float | None = None  # nats per token lost on the original answers to retain prompts

    @property
    def healthy(self) -> bool:
        return not self.reasons

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "guard/degenerate": self.degenerate}
        if self.chosen_logp_drop is not None:
            row["guard/chosen_logp_drop"] = self.chosen_logp_drop
        if self.retain_logp_drop is not None:
            row["guard/retain_logp_drop"] = self.retain_logp_drop
        return row


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: on CPU trainable_state's tensors share storage with the live parameters
    return {name: t.clone() for name, t in trainable_state(model).items()}


class CollapseGuard:
    def __init__(self, model: nn.Module, tokenizer, prompts: list, *, max_logp_drop: float, system_prompt=None,
                 max_new_tokens: int = 48, keep_healthy: bool = True, retain_prompts: list | None = None,
                 max_retain_drop: float = 0.05, autocast=contextlib.nullcontext) -> None:  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.autocast = autocast  # the training precision: the model may hold weights only valid under it
        # degeneration is watched on the guard prompts and the retain prompts alike
        self.prompts = list(prompts) + [p for p in (retain_prompts or []) if p not in prompts]
        self.max_logp_drop = max_logp_drop
        self.max_retain_drop = max_retain_drop
        self.system_prompt = system_prompt
        self.gen_kwargs = dict(system_prompt=system_prompt, max_new_tokens=max_new_tokens, batch_size=8)
        self.drop_sum = 0.0  # sum over pairs of per-token chosen drop since the last check
        self.drop_pairs = 0
        # one generation by the starting model: which answers are already degenerate (those do not
        # count), and its own answers to the retain prompts with their log-probs under it
        start = self._answers() if self.prompts else []  # prompts may be message lists: matched by index
        self.baseline_flags = [degeneration(a)["degenerate"] for a in start]
        self.baseline = sum(self.baseline_flags)
        retain = [(p, start[self.prompts.index(p)]) for p in (retain_prompts or [])]
        kept = [(p, a) for p, a in retain if a.strip()]
        self.retain_prompts, self.retain_answers = [p for p, _ in kept], [a for _, a in kept]
        if kept:
            self.retain_base = self._retain_logps()
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
        with torch.no_grad(), self.autocast():
            rows = generate(self.model, self.tokenizer, self.prompts, **self.gen_kwargs)
        self.model.train(was_training)
        return [row[0] for row in rows]

    def _retain_logps(self) -> tuple[list[float], list[float]]:
        from preftune.evaluation import answer_logps

        with self.autocast():
            return answer_logps(self.model, self.tokenizer, self.retain_prompts, self.retain_answers,
                                system_prompt=self.system_prompt)  # fmt: skip

    def _retain_drop(self) -> float | None:
        if not self.retain_answers:
            return None
        base, tokens = self.retain_base
        now, _ = self._retain_logps()
        return sum((b - n) / t for b, n, t in zip(base, now, tokens)) / len(tokens)

    def check(self, step: int) -> GuardVerdict:
        drop = self.drop_sum / self.drop_pairs if self.drop_pairs else None
        self.drop_sum, self.drop_pairs = 0.0, 0
        answers = self._answers() if self.prompts else []
        flags = [degeneration(a)["degenerate"] for a in answers]
        verdict = GuardVerdict(step, drop, sum(flags), self.baseline, answers,
                               retain_logp_drop=self._retain_drop())  # fmt: skip
        if drop is not None and drop > self.max_logp_drop:
            verdict.reasons.append(
                f"chosen log-probs fell {drop:.2f} nats/token below the reference's (limit {self.max_logp_drop})"
            )
        retain = verdict.retain_logp_drop
        if retain is not None and retain > self.max_retain_drop:
            verdict.reasons.append(
                f"the original answers to {len(self.retain_answers)} retain prompts lost {retain:.2f} nats/token "
                f"(limit {self.max_retain_drop}): the model changed where training should not reach"
            )
        # per prompt: an answer that was fine at the start and is degenerate now
        newly = [a for a, was, now in zip(answers, self.baseline_flags, flags) if now and not was]
        if newly:
            verdict.reasons.append(
                f"{len(newly)} of {len(answers)} held-out answers degenerate where the starting model's were not "
                f"({verdict.degenerate} degenerate now, {self.baseline} at the start), e.g. {newly[0][:60]!r}"
            )
        if verdict.healthy:
            self.healthy_step = step
            if self.keep_healthy:
                self.healthy_state = snapshot(self.model)
        return verdict

    def resume_at(self, step: int, window: tuple[float, int] | None) -> None:
        """Continue from a checkpoint of ``step``: its partly filled drop window, and its weights as
        the healthy ones to fall back to (the baseline stays the starting model's: build the guard
        before loading the checkpoint)."""
        if window is not None:
            self.drop_sum, self.drop_pairs = float(window[0]), int(window[1])
        self.healthy_step = step
        if self.keep_healthy:
            self.healthy_state = snapshot(self.model)

    def restore_healthy(self) -> int:
        if self.healthy_state is None:
            raise RuntimeError("CollapseGuard(keep_healthy=False) has no healthy weights to restore")
        load_trainable_state(self.model, self.healthy_state)
        return self.healthy_step
