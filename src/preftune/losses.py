"""Preference losses as pure functions of per-sequence log-probs.

Every loss takes a :class:`PairLogps` (B pairs) and :class:`LossParams` and returns
per-sequence losses of shape ``(B,)``. The trainer reduces them with
``sum / n_pairs_in_optimizer_step``, so for one batch the mean of the returned
tensor is the batch loss; the definitions match TRL 1.16 (``DPOTrainer._compute_loss``
for the DPO family, ``CPOTrainer.cpo_loss`` for SimPO, ``ORPOTrainer.odds_ratio_loss``
for ORPO's odds-ratio term).

Notation used in the docstrings (all per pair):
    pc, pr   policy log p(chosen|x), log p(rejected|x), summed over completion tokens
    rc, rr   the same under the reference model
    nc, nr   completion token counts
    cl = pc - rc, rl = pr - rr   (log-ratios),  delta = cl - rl
    mc = pc / nc, mr = pr / nr   (mean per-token log-probs)
    s(z) = sigmoid(z), ls(z) = log sigmoid(z), softplus(z) = -ls(-z)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import PreftuneError
from preftune.util import did_you_mean

__all__ = [
    "LOSSES",
    "REFERENCE_FREE",
    "LossFn",
    "LossParams",
    "PairLogps",
    "check_params",
    "combined_loss",
    "get_loss",
    "needs_reference",
    "register",
    "rewards",
]


@dataclass
class PairLogps:
    """Per-sequence log-probs of a batch of B pairs (all tensors shape (B,))."""

    chosen: Tensor  # policy log p(chosen | prompt), summed over completion tokens
    rejected: Tensor
    chosen_tokens: Tensor  # number of completion tokens (float or int tensor)
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None  # reference model, same sums; None for reference-free losses
    ref_rejected: Tensor | None = None
    # Mean chosen-token count over the whole optimizer step (for token-mean losses under
    # grad accumulation); None -> computed from this batch.
    chosen_tokens_mean: float | None = None


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by all losses.

    beta:            temperature / KL strength (tau of IPO). Must be > 0.
    label_smoothing: flip probability for ``robust`` (in [0, 0.5)), epsilon for ``exo_pair``
                     (in (0, 1); the EXO paper suggests 1e-3), conservative smoothing for ``simpo``.
    simpo_gamma:     SimPO target reward margin gamma, in reward units: the loss is
                     ``-ls(beta * (mc - mr) - gamma)``. Same units as TRL's ``CPOConfig.simpo_gamma``
                     (TRL subtracts gamma/beta from the logits and multiplies by beta). The official
                     SimPO repo's ``gamma_beta_ratio`` corresponds to ``simpo_gamma / beta``.
    orpo_alpha:      ORPO's lambda, the weight of the odds-ratio term against the chosen NLL.
                     TRL's ``ORPOConfig.beta`` plays this role (default 0.1, as here); our ``beta``
                     is not used by the ``orpo`` loss itself.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_alpha: float = 0.1

    def __post_init__(self):
        if not self.beta > 0:  # also rejects NaN
            raise PreftuneError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise PreftuneError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


LossFn = Callable[[PairLogps, LossParams], Tensor]  # returns per-sequence losses, shape (B,)
LOSSES: dict[str, LossFn] = {}
REFERENCE_FREE: set[str] = {"simpo", "orpo", "sft"}


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Add a loss to :data:`LOSSES` under ``name``."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = fn
        return fn

    return add


# --------------------------------------------------------------------------- helpers


def _logratios(lp: PairLogps) -> tuple[Tensor, Tensor]:
    """(cl, rl): policy minus reference log-probs of chosen and rejected."""
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs (ref_chosen / ref_rejected)")
    return lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected


def _count(tokens: Tensor, like: Tensor) -> Tensor:
    # An empty completion would divide by zero; count it as one token, as TRL's IPO does.
    return tokens.to(like.dtype).clamp(min=1.0)


def _means(lp: PairLogps) -> tuple[Tensor, Tensor]:
    """(mc, mr): mean per-token log-probs of chosen and rejected."""
    return lp.chosen / _count(lp.chosen_tokens, lp.chosen), lp.rejected / _count(lp.rejected_tokens, lp.rejected)


def _chosen_nll(lp: PairLogps) -> Tensor:
    """Per-sequence share of the token-mean chosen NLL: -pc_i / mean(nc).

    Averaged over the pairs of a step this is -sum(pc) / sum(nc), the NLL per chosen token.
    """
    mean = lp.chosen_tokens_mean
    if mean is None:
        mean = lp.chosen_tokens.to(lp.chosen.dtype).mean()
    else:
        mean = torch.as_tensor(mean, dtype=lp.chosen.dtype, device=lp.chosen.device)
    # Guard only the all-empty case (then every pc is 0 too); any real mean is used as is.
    return -lp.chosen / mean.clamp(min=torch.finfo(mean.dtype).tiny)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012).

    Near 0, 1 - exp(x) loses digits, so use -expm1(x); far below, exp(x) is tiny and log1p is exact.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) ls(z) - eps ls(-z): logistic loss on a label that is flipped with prob. eps."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# --------------------------------------------------------------------------- DPO family


@register("sigmoid")
def sigmoid_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """DPO: -ls(beta * delta), delta = (pc - rc) - (pr - rr)."""
    cl, rl = _logratios(lp)
    return -F.logsigmoid(p.beta * (cl - rl))


@register("hinge")
def hinge_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """SLiC hinge: relu(1 - beta * delta)."""
    cl, rl = _logratios(lp)
    return torch.relu(1.0 - p.beta * (cl - rl))


@register("ipo")
def ipo_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """IPO: (cl/nc - rl/nr - 1/(2 beta))^2.

    Log-ratios are divided by the completion token count (as TRL 1.16 does) so the squared
    loss does not grow with length; beta is IPO's tau.
    """
    cl, rl = _logratios(lp)
    delta = cl / _count(lp.chosen_tokens, cl) - rl / _count(lp.rejected_tokens, rl)
    return (delta - 1.0 / (2.0 * p.beta)) ** 2


@register("robust")
def robust_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """Robust DPO with flip probability eps = label_smoothing < 0.5:

    ((1 - eps) * -ls(beta delta) - eps * -ls(-beta delta)) / (1 - 2 eps),
    an unbiased estimate of the clean DPO loss under label noise.
    """
    eps = p.label_smoothing
    if eps >= 0.5:
        raise PreftuneError(f"robust loss needs label_smoothing < 0.5, got {eps}")
    cl, rl = _logratios(lp)
    z = p.beta * (cl - rl)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register("bco_pair")
def bco_pair_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """BCO on pairs: -ls(beta cl) - ls(-beta rl) (chosen classified good, rejected bad)."""
    cl, rl = _logratios(lp)
    return -F.logsigmoid(p.beta * cl) - F.logsigmoid(-p.beta * rl)


@register("sppo_hard")
def sppo_hard_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected):

    (cl - 1/(2 beta))^2 + (rl + 1/(2 beta))^2.
    """
    cl, rl = _logratios(lp)
    return (cl - 0.5 / p.beta) ** 2 + (rl + 0.5 / p.beta) ** 2


@register("nca_pair")
def nca_pair_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """NCA on pairs: -ls(beta cl) - 0.5 ls(-beta cl) - 0.5 ls(-beta rl)."""
    cl, rl = _logratios(lp)
    c, r = p.beta * cl, p.beta * rl
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


@register("apo_zero")
def apo_zero_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """APO-zero (APO paper eq. 7): (1 - s(beta cl)) + s(beta rl).

    For chosen answers better than the model's own: push chosen up and rejected down.
    """
    cl, rl = _logratios(lp)
    return (1.0 - torch.sigmoid(p.beta * cl)) + torch.sigmoid(p.beta * rl)


@register("apo_down")
def apo_down_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """APO-down (APO paper eq. 8): s(beta cl) + (1 - s(beta delta)).

    For chosen answers worse than the model's own: push both down, rejected more.
    """
    cl, rl = _logratios(lp)
    return torch.sigmoid(p.beta * cl) + (1.0 - torch.sigmoid(p.beta * (cl - rl)))


@register("exo_pair")
def exo_pair_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """EXO-pref (EXO paper eq. 16), K = 2, eps = label_smoothing:

    KL(q || p_eps) with q = (s(z), s(-z)), z = beta delta, p_eps = (1 - eps, eps):
    s(z) (ls(z) - log(1 - eps)) + s(-z) (ls(-z) - log eps).
    At eps = 0 the target puts zero mass on "rejected wins" and the loss is +inf, so we
    refuse it rather than silently pick an epsilon (the paper suggests 1e-3).
    """
    eps = p.label_smoothing
    if not 0.0 < eps < 1.0:
        raise PreftuneError(
            f"exo_pair needs 0 < label_smoothing < 1 (its epsilon; the EXO paper suggests 1e-3), got {eps}"
        )
    cl, rl = _logratios(lp)
    z = p.beta * (cl - rl)
    win = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    lose = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return win + lose


# --------------------------------------------------------------------------- reference-free


@register("simpo")
def simpo_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """SimPO: -(1 - eps) ls(z) - eps ls(-z), z = beta (mc - mr) - gamma, eps = label_smoothing.

    Length-normalized and reference-free; gamma = simpo_gamma is the target reward margin
    (TRL CPOTrainer: logits = (mc - mr) - gamma/beta, then beta * logits = z).
    """
    mc, mr = _means(lp)
    return _smoothed_logistic(p.beta * (mc - mr) - p.simpo_gamma, p.label_smoothing)


@register("orpo")
def orpo_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """ORPO: chosen NLL + lambda * -ls(log_odds), lambda = orpo_alpha.

    log_odds = log(odds(mc) / odds(mr)) with odds(m) = e^m / (1 - e^m), i.e.
    (mc - mr) - (log(1 - e^mc) - log(1 - e^mr)). The NLL term is the token-mean NLL of
    the chosen completion (as ``sft``); TRL's experimental ORPOTrainer also counts prompt
    tokens there, we count completion tokens only.
    """
    # log(1 - e^m) needs care: compute in at least float32 and keep m strictly below 0,
    # otherwise a mean per-token prob that rounds to 1 gives log(0).
    dtype = torch.promote_types(lp.chosen.dtype, torch.float32)
    mc, mr = (m.to(dtype).clamp(max=-1e-6) for m in _means(lp))
    log_odds = (mc - mr) - (_log1mexp(mc) - _log1mexp(mr))
    odds_ratio = -F.logsigmoid(log_odds)
    return (_chosen_nll(lp).to(dtype) + p.orpo_alpha * odds_ratio).to(lp.chosen.dtype)


@register("sft")
def sft_loss(lp: PairLogps, p: LossParams) -> Tensor:
    """NLL of the chosen completion, per token: -pc_i / mean(nc).

    The mean over the pairs of an optimizer step is -sum(pc) / sum(nc), TRL's token-mean SFT
    loss; with ``chosen_tokens_mean`` set to the step's mean this stays exact when the step is
    split into micro-batches. Combined with ``sigmoid`` it gives RPO.
    """
    return _chosen_nll(lp)


# --------------------------------------------------------------------------- registry API


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``; a PreftuneError with the closest name otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        pass
    hint = did_you_mean(str(name), LOSSES, cutoff=0.6)
    raise PreftuneError(f"unknown loss_type '{name}'{hint} known: {', '.join(sorted(LOSSES))}")


def needs_reference(loss_types: list[str]) -> bool:
    """True if any of the losses uses reference-model log-probs."""
    for name in loss_types:
        get_loss(name)  # unknown names fail here, before anyone loads a reference model
    return any(name not in REFERENCE_FREE for name in loss_types)


def check_params(loss_types: list[str], loss_weights: list[float] | None, params: LossParams) -> None:
    """Fail early (PreftuneError) on a config the losses would reject mid-training."""
    if not loss_types:
        raise PreftuneError("loss_type must name at least one loss")
    for name in loss_types:
        get_loss(name)
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise PreftuneError(
            f"loss_weights has {len(loss_weights)} entries but loss_type has {len(loss_types)}"
        )
    if "robust" in loss_types and params.label_smoothing >= 0.5:
        raise PreftuneError(f"robust loss needs label_smoothing < 0.5, got {params.label_smoothing}")
    if "exo_pair" in loss_types and params.label_smoothing <= 0.0:
        raise PreftuneError(
            "exo_pair needs label_smoothing > 0 (its epsilon; the EXO paper suggests 1e-3)"
        )


def combined_loss(
    logps: PairLogps, loss_types: list[str], loss_weights: list[float] | None, params: LossParams
) -> Tensor:
    """Per-sequence sum_i w_i * loss_i, shape (B,); weights default to 1.0 each."""
    check_params(loss_types, loss_weights, params)
    weights = [1.0] * len(loss_types) if loss_weights is None else loss_weights
    total = None
    for name, w in zip(loss_types, weights, strict=True):
        term = w * get_loss(name)(logps, params)
        total = term if total is None else total + term
    return total


@torch.no_grad()
def rewards(logps: PairLogps, loss_types: list[str], params: LossParams) -> tuple[Tensor, Tensor]:
    """(chosen_rewards, rejected_rewards), shape (B,), detached, for logging.

    With a reference: beta * (policy - ref) of the summed log-probs (TRL's rewards/chosen).
    Reference-free runs: beta * mean per-token log-prob, as TRL's CPO/ORPO trainers log them.
    """
    if needs_reference(loss_types):
        cl, rl = _logratios(logps)
        return params.beta * cl.detach(), params.beta * rl.detach()
    mc, mr = _means(logps)
    return params.beta * mc.detach(), params.beta * mr.detach()
