"""Tests for preftune.losses: hand-worked values, parity with TRL 1.16, registry behaviour.

Hand-worked cases mostly use one pair with
    pc = -3, pr = -5, rc = -4, rr = -4, beta = 0.1
so cl = pc - rc = 1, rl = pr - rr = -1, delta = cl - rl = 2, beta*delta = 0.2,
beta*cl = 0.1, beta*rl = -0.1.
Useful constants: e^-0.1 = 0.904837418, e^0.1 = 1.105170918, e^-0.2 = 0.818730753,
softplus(z) = log(1 + e^z), -log sigmoid(z) = softplus(-z), softplus(z) = z + softplus(-z).
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.losses import (
    LOSSES,
    REFERENCE_FREE,
    LossParams,
    PairLogps,
    check_params,
    combined_loss,
    get_loss,
    needs_reference,
    rewards,
)

TOL = 1e-6
P = LossParams(beta=0.1)


def pair(pc=-3.0, pr=-5.0, rc=-4.0, rr=-4.0, nc=2, nr=4, **kw) -> PairLogps:
    """A batch of one pair, float64."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(pc), t(pr), t(nc), t(nr), t(rc), t(rr), **kw)


def value(name, lp, params=P) -> float:
    out = get_loss(name)(lp, params)
    assert out.shape == lp.chosen.shape
    return out.item()


# --------------------------------------------------------------------------- hand-worked values


def test_sigmoid_by_hand():
    """delta = 2, beta*delta = 0.2:
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.818730753) = 0.598138869.
    """
    assert value("sigmoid", pair()) == pytest.approx(0.598138869, abs=TOL)


def test_hinge_by_hand():
    """relu(1 - beta*delta): beta = 0.1 -> 1 - 0.2 = 0.8; beta = 1 -> 1 - 2 < 0 -> 0."""
    assert value("hinge", pair()) == pytest.approx(0.8, abs=TOL)
    assert value("hinge", pair(), LossParams(beta=1.0)) == pytest.approx(0.0, abs=TOL)


def test_ipo_by_hand():
    """Token-normalized log-ratios: cl/nc = 1/2 = 0.5, rl/nr = -1/4 = -0.25, difference 0.75.
    Target 1/(2 beta) = 1/0.2 = 5, loss = (0.75 - 5)^2 = (-4.25)^2 = 18.0625.
    """
    assert value("ipo", pair(nc=2, nr=4)) == pytest.approx(18.0625, abs=TOL)


def test_robust_by_hand():
    """eps = 0.1, z = 0.2, L = softplus(-0.2) = 0.598138869, softplus(0.2) = 0.2 + L = 0.798138869.
    loss = ((1-eps) L - eps softplus(0.2)) / (1 - 2 eps)
         = (0.9 * 0.598138869 - 0.1 * 0.798138869) / 0.8
         = (0.538324982 - 0.079813887) / 0.8 = 0.458511095 / 0.8 = 0.573138869
    (equivalently L - eps z / (1 - 2 eps) = 0.598138869 - 0.025).
    """
    assert value("robust", pair(), LossParams(beta=0.1, label_smoothing=0.1)) == pytest.approx(0.573138869, abs=TOL)
    # eps = 0 is plain DPO
    assert value("robust", pair()) == pytest.approx(0.598138869, abs=TOL)


def test_bco_pair_by_hand():
    """beta*cl = 0.1, beta*rl = -0.1:
    loss = -log s(0.1) - log s(0.1) = 2 log(1 + e^-0.1) = 2 log(1.904837418) = 2 * 0.644396660 = 1.288793320.
    """
    assert value("bco_pair", pair()) == pytest.approx(1.288793320, abs=TOL)


def test_sppo_hard_by_hand():
    """1/(2 beta) = 5: (cl - 5)^2 + (rl + 5)^2 = (1 - 5)^2 + (-1 + 5)^2 = 16 + 16 = 32."""
    assert value("sppo_hard", pair()) == pytest.approx(32.0, abs=TOL)


def test_nca_pair_by_hand():
    """c = beta*cl = 0.1, r = beta*rl = -0.1, softplus(-0.1) = 0.644396660, softplus(0.1) = 0.744396660:
    loss = -log s(c) - 0.5 log s(-c) - 0.5 log s(-r)
         = softplus(-0.1) + 0.5 softplus(0.1) + 0.5 softplus(-0.1)
         = 1.5 * 0.644396660 + 0.5 * 0.744396660 = 0.966594990 + 0.372198330 = 1.338793320.
    """
    assert value("nca_pair", pair()) == pytest.approx(1.338793320, abs=TOL)


def test_apo_zero_by_hand():
    """(1 - s(0.1)) + s(-0.1) = 2 s(-0.1) = 2 / (1 + e^0.1) = 2 / 2.105170918 = 0.950041625."""
    assert value("apo_zero", pair()) == pytest.approx(0.950041625, abs=TOL)


def test_apo_down_by_hand():
    """s(beta cl) + 1 - s(beta delta) = s(0.1) + 1 - s(0.2)
    s(0.1) = 1/1.904837418 = 0.524979187, s(0.2) = 1/1.818730753 = 0.549833997
    loss = 0.524979187 + 1 - 0.549833997 = 0.975145190.
    """
    assert value("apo_down", pair()) == pytest.approx(0.975145190, abs=TOL)


def test_exo_pair_by_hand():
    """eps = 0.1, z = 0.2: q = (s(0.2), s(-0.2)) = (0.549833997, 0.450166003),
    log q = (-0.598138869, -0.798138869), log p = (log 0.9, log 0.1) = (-0.105360516, -2.302585093).
    KL = 0.549833997 * (-0.598138869 + 0.105360516) + 0.450166003 * (-0.798138869 + 2.302585093)
       = 0.549833997 * -0.492778353 + 0.450166003 * 1.504446224
       = -0.270946310 + 0.677250553 = 0.406304243.
    """
    params = LossParams(beta=0.1, label_smoothing=0.1)
    assert value("exo_pair", pair(), params) == pytest.approx(0.406304243, abs=TOL)


def test_exo_pair_needs_epsilon():
    """At eps = 0 the EXO target has log 0 in it (loss +inf in TRL); we refuse instead."""
    with pytest.raises(PreftuneError, match="label_smoothing"):
        get_loss("exo_pair")(pair(), P)
    with pytest.raises(PreftuneError, match="exo_pair"):
        check_params(["exo_pair"], None, P)


def test_simpo_by_hand():
    """mc = -4/4 = -1, mr = -8/4 = -2, beta = 2, gamma = 0.5: z = 2 * (-1 - -2) - 0.5 = 1.5.
    loss = -log s(1.5) = log(1 + e^-1.5) = log(1.223130160) = 0.201413278.
    With label smoothing 0.1: 0.9 softplus(-1.5) + 0.1 softplus(1.5) = softplus(-1.5) + 0.1 * 1.5
    = 0.201413278 + 0.15 = 0.351413278.
    The reference log-probs are ignored (None here).
    """
    lp = pair(pc=-4.0, pr=-8.0, nc=4, nr=4)
    lp.ref_chosen = lp.ref_rejected = None
    assert value("simpo", lp, LossParams(beta=2.0, simpo_gamma=0.5)) == pytest.approx(0.201413278, abs=TOL)
    smooth = LossParams(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    assert value("simpo", lp, smooth) == pytest.approx(0.351413278, abs=TOL)


def test_orpo_by_hand():
    """Chosen: 3 tokens, pc = 3 log 0.5 -> mc = log 0.5; rejected: 2 tokens, pr = 2 log 0.2 -> mr = log 0.2.
    odds(chosen) = 0.5 / 0.5 = 1, odds(rejected) = 0.2 / 0.8 = 0.25, log odds ratio = log 4.
    -log s(log 4) = log(1 + 1/4) = log 1.25 = 0.223143551.
    NLL (one pair, mean chosen tokens 3) = -pc / 3 = -log 0.5 = 0.693147181.
    loss = 0.693147181 + 0.1 * 0.223143551 = 0.715461536.
    """
    lp = pair(pc=3 * math.log(0.5), pr=2 * math.log(0.2), nc=3, nr=2)
    assert value("orpo", lp, LossParams(orpo_alpha=0.1)) == pytest.approx(0.715461536, abs=TOL)


def test_orpo_is_finite_near_probability_one():
    """A mean per-token prob that rounds to 1 would make log(1 - p) = -inf; the loss must stay finite."""
    lp = PairLogps(
        chosen=torch.tensor([0.0, -1e-9], requires_grad=True),
        rejected=torch.tensor([0.0, -30.0], requires_grad=True),
        chosen_tokens=torch.tensor([5, 5]),
        rejected_tokens=torch.tensor([5, 5]),
    )
    out = get_loss("orpo")(lp, P)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(lp.chosen.grad).all() and torch.isfinite(lp.rejected.grad).all()


def test_sft_by_hand():
    """Two pairs, chosen sums (-6, -2) over (3, 1) tokens: TRL's token-mean NLL = 8 / 4 = 2.
    Per sequence with mean chosen tokens 2: (6/2, 2/2) = (3, 1), whose mean is 2.
    """
    lp = PairLogps(
        chosen=torch.tensor([-6.0, -2.0]),
        rejected=torch.tensor([-1.0, -1.0]),
        chosen_tokens=torch.tensor([3, 1]),
        rejected_tokens=torch.tensor([1, 1]),
    )
    out = get_loss("sft")(lp, P)
    assert out.tolist() == pytest.approx([3.0, 1.0], abs=TOL)
    assert out.mean().item() == pytest.approx(2.0, abs=TOL)


# --------------------------------------------------------------------------- parity with TRL


def _fake_batch(B=6, L=12, seed=0):
    """Random per-token log-probs and masks shaped the way TRL's DPOTrainer sees them.

    Rows 0..B-1 are chosen, B..2B-1 rejected; position 0..2 is prompt, then a completion
    of random length, then padding. Per-token log-probs are zero outside the completion
    (the fused LM head gives 0 where labels are -100).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L - 3, (2 * B,), generator=g)
    completion_mask = torch.zeros(2 * B, L, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 3 : 3 + n] = 1
    attention_mask = completion_mask.clone()
    attention_mask[:, :3] = 1
    shift = completion_mask[:, 1:].double()
    per_token = -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * 3 * shift
    ref_per_token = -torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * 3 * shift
    logps = per_token.sum(1)
    ref = ref_per_token.sum(1)
    tokens = shift.sum(1)
    ours = PairLogps(
        chosen=logps[:B],
        rejected=logps[B:],
        chosen_tokens=tokens[:B].long(),
        rejected_tokens=tokens[B:].long(),
        ref_chosen=ref[:B],
        ref_rejected=ref[B:],
    )
    inputs = {
        "input_ids": torch.randint(0, 50, (2 * B, L), generator=g),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    return ours, inputs, per_token


def _identity(x):
    return x


_ACCEL = types.SimpleNamespace(device=torch.device("cpu"), gather=_identity, gather_for_metrics=_identity)


def _trl_dpo(loss_types, loss_weights, params: LossParams, seed=0):
    """Run TRL's own DPOTrainer._compute_loss with a stub self and a stub model.

    The stub model returns the given per-token log-probs (plus the metric tensors TRL reads);
    reference log-probs come in precomputed, so no reference model is needed.
    Returns (our PairLogps, TRL loss, TRL metrics).
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    ours, inputs, per_token = _fake_batch(seed=seed)

    def model(**kwargs):
        z = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_ACCEL,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types),
        beta=params.beta,
        label_smoothing=params.label_smoothing,
        use_weighting=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return ours, loss, stub._metrics["train"]


TRL_DPO_LOSSES = [
    ("sigmoid", 0.0),
    ("hinge", 0.0),
    ("ipo", 0.0),
    ("robust", 0.2),
    ("bco_pair", 0.0),
    ("sppo_hard", 0.0),
    ("nca_pair", 0.0),
    ("apo_zero", 0.0),
    ("apo_down", 0.0),
    ("exo_pair", 1e-3),
    ("exo_pair", 0.3),
    ("sft", 0.0),
]


@pytest.mark.parametrize("name,smoothing", TRL_DPO_LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_parity_with_trl_dpo(name, smoothing, beta):
    params = LossParams(beta=beta, label_smoothing=smoothing)
    ours, trl_loss, metrics = _trl_dpo([name], None, params)
    mine = combined_loss(ours, [name], None, params)
    assert mine.mean().item() == pytest.approx(trl_loss.item(), abs=TOL)
    if name != "sft":  # sft alone is reference-free: we log per-token rewards there
        chosen, rejected = rewards(ours, [name], params)
        assert chosen.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=TOL)
        assert rejected.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=TOL)


def test_parity_with_trl_rpo_weighted_mix():
    """RPO = sigmoid + weighted sft; TRL sums weighted batch means."""
    params = LossParams(beta=0.1)
    ours, trl_loss, _ = _trl_dpo(["sigmoid", "sft", "ipo"], [1.0, 0.3, 0.05], params, seed=3)
    mine = combined_loss(ours, ["sigmoid", "sft", "ipo"], [1.0, 0.3, 0.05], params)
    assert mine.mean().item() == pytest.approx(trl_loss.item(), abs=TOL)


def _random_means(B=8, seed=1):
    """Random reference-free batch: summed log-probs and counts, plus their per-token means."""
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 20, (B,), generator=g)
    nr = torch.randint(1, 20, (B,), generator=g)
    mc = -torch.rand(B, generator=g, dtype=torch.float64) * 3 - 1e-3
    mr = -torch.rand(B, generator=g, dtype=torch.float64) * 3 - 1e-3
    return PairLogps(mc * nc, mr * nr, nc, nr), mc, mr


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_parity_with_trl_cpo_simpo(smoothing):
    """SimPO via TRL's CPOTrainer.cpo_loss (a pure function of per-token mean log-probs).

    TRL adds cpo_alpha * NLL outside cpo_loss; with SimPO that is cpo_alpha = 0 (AlphaPO/SimPO
    default), or our "sft" term with weight cpo_alpha.
    """
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    params = LossParams(beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    lp, mc, mr = _random_means()
    stub = types.SimpleNamespace(
        alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=smoothing, accelerator=_ACCEL
    )
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(stub, mc, mr)
    assert get_loss("simpo")(lp, params).tolist() == pytest.approx(trl_losses.tolist(), abs=TOL)
    chosen, rejected = rewards(lp, ["simpo"], params)
    assert chosen.tolist() == pytest.approx(trl_chosen.tolist(), abs=TOL)
    assert rejected.tolist() == pytest.approx(trl_rejected.tolist(), abs=TOL)


def test_parity_with_trl_orpo_odds_ratio():
    """ORPO's odds-ratio term via TRL's ORPOTrainer.odds_ratio_loss (TRL's beta = our orpo_alpha).

    TRL's NLL term comes from a model forward over prompt + completion, so it is not compared;
    our NLL is the sft term, so orpo - sft must equal TRL's -losses.
    """
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    lam = 0.25
    params = LossParams(beta=lam, orpo_alpha=lam)
    lp, mc, mr = _random_means(seed=2)
    stub = types.SimpleNamespace(beta=lam, accelerator=_ACCEL)
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(stub, mc, mr)
    odds_term = get_loss("orpo")(lp, params) - get_loss("sft")(lp, params)
    assert odds_term.tolist() == pytest.approx((-trl_losses).tolist(), abs=TOL)
    chosen, rejected = rewards(lp, ["orpo"], params)
    assert chosen.tolist() == pytest.approx(trl_chosen.tolist(), abs=TOL)
    assert rejected.tolist() == pytest.approx(trl_rejected.tolist(), abs=TOL)


# --------------------------------------------------------------------------- registry


def test_registry_contents():
    expected = {
        "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair",
        "apo_zero", "apo_down", "exo_pair", "simpo", "orpo", "sft",
    }  # fmt: skip
    assert set(LOSSES) == expected
    assert REFERENCE_FREE == {"simpo", "orpo", "sft"}


def test_unknown_loss_suggests_closest():
    with pytest.raises(PreftuneError, match=r"unknown loss_type 'sigmod'; did you mean 'sigmoid'\? known: ") as e:
        get_loss("sigmod")
    assert "apo_zero" in str(e.value)
    with pytest.raises(PreftuneError) as e:
        get_loss("zzzzzz")
    assert "did you mean" not in str(e.value)
    with pytest.raises(PreftuneError, match="did you mean 'bco_pair'"):
        needs_reference(["bco-pair"])


def test_needs_reference():
    assert needs_reference(["sigmoid"])
    assert needs_reference(["simpo", "ipo"])
    assert needs_reference(["sigmoid", "sft"])
    assert not needs_reference(["simpo"])
    assert not needs_reference(["orpo", "sft"])


def test_reference_free_losses_ignore_reference():
    lp, _, _ = _random_means()
    with_ref = PairLogps(lp.chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens, lp.chosen * 2, lp.rejected)
    for name in REFERENCE_FREE:
        assert torch.equal(get_loss(name)(lp, P), get_loss(name)(with_ref, P))


def test_reference_losses_require_reference():
    lp, _, _ = _random_means()
    with pytest.raises(ValueError, match="reference"):
        get_loss("sigmoid")(lp, P)


def test_combined_loss_is_weighted_sum():
    ours, _, _ = _fake_batch(seed=5)
    params = LossParams(beta=0.2, label_smoothing=0.1)
    names, weights = ["sigmoid", "sft", "robust"], [1.0, 0.5, 2.0]
    expected = sum(w * get_loss(n)(ours, params) for n, w in zip(names, weights))
    assert torch.allclose(combined_loss(ours, names, weights, params), expected, atol=1e-12)
    default = combined_loss(ours, names, None, params)
    assert torch.allclose(default, sum(get_loss(n)(ours, params) for n in names), atol=1e-12)
    with pytest.raises(PreftuneError, match="loss_weights"):
        combined_loss(ours, names, [1.0], params)
    with pytest.raises(PreftuneError, match="at least one"):
        combined_loss(ours, [], None, params)


def test_params_validation():
    with pytest.raises(PreftuneError, match="beta"):
        LossParams(beta=0.0)
    with pytest.raises(PreftuneError, match="label_smoothing"):
        LossParams(label_smoothing=1.0)
    with pytest.raises(PreftuneError, match="robust"):
        check_params(["robust"], None, LossParams(label_smoothing=0.5))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow(name):
    ours, _, _ = _fake_batch(seed=7)
    leaves = [ours.chosen.clone().requires_grad_(), ours.rejected.clone().requires_grad_()]
    lp = PairLogps(leaves[0], leaves[1], ours.chosen_tokens, ours.rejected_tokens, ours.ref_chosen, ours.ref_rejected)
    params = LossParams(beta=0.1, label_smoothing=0.1)
    loss = combined_loss(lp, [name], None, params).mean()
    loss.backward()
    chosen_grad, rejected_grad = (x.grad for x in leaves)
    assert torch.isfinite(chosen_grad).all() and chosen_grad.abs().sum() > 0
    if name == "sft":  # NLL on chosen only: rejected is not in the graph
        assert rejected_grad is None
    else:
        assert torch.isfinite(rejected_grad).all() and rejected_grad.abs().sum() > 0


def test_rewards_are_detached_and_reference_based():
    ours, _, _ = _fake_batch(seed=4)
    lp = PairLogps(ours.chosen.clone().requires_grad_(), ours.rejected, ours.chosen_tokens,
                   ours.rejected_tokens, ours.ref_chosen, ours.ref_rejected)  # fmt: skip
    chosen, rejected = rewards(lp, ["sigmoid", "sft"], LossParams(beta=0.3))
    assert not chosen.requires_grad
    assert torch.allclose(chosen, 0.3 * (ours.chosen - ours.ref_chosen))
    assert torch.allclose(rejected, 0.3 * (ours.rejected - ours.ref_rejected))
    chosen, _ = rewards(lp, ["simpo"], LossParams(beta=0.3))
    assert torch.allclose(chosen, 0.3 * ours.chosen / ours.chosen_tokens)


@pytest.mark.parametrize("name", ["sft", "orpo"])
def test_token_mean_accumulation_is_exact(name):
    """Two micro-batches, each reduced by sum / n_pairs_in_step with the step's mean chosen-token
    count, add up to the full-batch mean (TRL's single-batch value)."""
    ours, _, _ = _fake_batch(seed=9)
    full = get_loss(name)(ours, P).mean()
    n = ours.chosen.shape[0]
    step_mean = ours.chosen_tokens.double().mean().item()
    parts = (slice(0, 2), slice(2, n))

    def micro(part, step_mean):
        lp = PairLogps(ours.chosen[part], ours.rejected[part], ours.chosen_tokens[part], ours.rejected_tokens[part])
        lp.chosen_tokens_mean = step_mean
        return get_loss(name)(lp, P).sum() / n

    total = sum(micro(part, step_mean) for part in parts)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    # without the step mean, each micro-batch would use its own mean and the sum would differ
    naive = sum(micro(part, None) for part in parts)
    assert abs(naive.item() - full.item()) > 1e-6
