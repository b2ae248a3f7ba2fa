"""Loss functions against hand-computed values."""

import math

import pytest
import torch

from tunelab.losses import masked_mean, sft_loss


def test_sft_loss_sums_only_masked_positions():
    logprobs = torch.tensor([[0.0, math.log(0.5), math.log(0.25), -7.0],
                             [0.0, math.log(0.1), -3.0, -5.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    total, count = sft_loss(logprobs, mask)
    # -(log .5 + log .25 + log .1); the -7, -3 and -5 positions are masked out
    assert math.isclose(total.item(), -(math.log(0.5) + math.log(0.25) + math.log(0.1)), rel_tol=1e-6)
    assert count.item() == 3


def test_sft_loss_of_a_perfect_model_is_zero_and_of_uniform_is_log_vocab():
    mask = torch.tensor([[0, 1, 1, 1]])
    assert sft_loss(torch.zeros(1, 4), mask)[0].item() == 0.0
    vocab = 1000
    uniform = torch.full((1, 4), -math.log(vocab))
    total, count = sft_loss(uniform, mask)
    assert math.isclose((total / count).item(), math.log(vocab), rel_tol=1e-6)


def test_masked_mean_ignores_masked_values_and_handles_empty_mask():
    values = torch.tensor([1.0, 2.0, 100.0])
    assert masked_mean(values, torch.tensor([1, 1, 0])).item() == 1.5
    assert masked_mean(values, torch.tensor([0, 0, 0])).item() == 0.0


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_loss_hand_computed():
    from tunelab.losses import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])
    total, metrics = bradley_terry_loss(chosen, rejected)
    expected = -(math.log(_sig(1.0)) + math.log(_sig(-1.0)) + math.log(_sig(0.0)))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["margin"].item() == pytest.approx(0.0)
    rewards = [2.0, 0.5, -1.0, 1.0, 1.5, -1.0]
    mean = sum(rewards) / 6
    assert metrics["reward_mean"].item() == pytest.approx(mean)
    assert metrics["reward_std"].item() == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 6))


def test_bradley_terry_equal_rewards_give_log2_and_margin_shifts_the_sigmoid():
    from tunelab.losses import bradley_terry_loss

    same = torch.tensor([0.3, -0.7])
    assert bradley_terry_loss(same, same)[0].item() == pytest.approx(2 * math.log(2), rel=1e-6)
    chosen, rejected, margin = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0])
    # winning by exactly the margin counts as a tie: log 2
    assert bradley_terry_loss(chosen, rejected, margin)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert bradley_terry_loss(chosen, rejected, torch.tensor([0.5]))[0].item() == pytest.approx(
        -math.log(_sig(1.5)), rel=1e-6)
    # a large gap drives the loss to 0
    assert bradley_terry_loss(torch.tensor([30.0]), torch.tensor([0.0]))[0].item() < 1e-12


def test_reward_centering_adds_coef_times_squared_sum():
    from tunelab.losses import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -3.0])
    plain = bradley_terry_loss(chosen, rejected)[0].item()
    centered = bradley_terry_loss(chosen, rejected, center_coef=0.01)[0].item()
    assert centered - plain == pytest.approx(0.01 * ((2 + 1) ** 2 + (1 - 3) ** 2), rel=1e-5)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    from tunelab.losses import bradley_terry_loss

    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def _dpo(z_chosen, z_rejected, **kwargs):
    from tunelab.losses import dpo_loss

    zero = torch.zeros(len(z_chosen))
    return dpo_loss(torch.tensor(z_chosen), torch.tensor(z_rejected), zero, zero, **kwargs)


def test_dpo_sigmoid_is_log2_when_policy_equals_reference():
    from tunelab.losses import dpo_loss

    logps = torch.tensor([-12.5, -3.0, -40.0])
    total, metrics = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.3)
    assert total.item() / 3 == pytest.approx(math.log(2), rel=1e-7)
    assert metrics["reward_margin"].item() == 0.0 and metrics["reward_accuracy"].item() == 0.0


def test_dpo_losses_hand_computed():
    beta = 0.5
    # z = (chosen logratio) - (rejected logratio) = 2 - (-2) = 4 for the single pair below
    z = 4.0
    assert _dpo([2.0], [-2.0], beta=beta)[0].item() == pytest.approx(-math.log(_sig(beta * z)), rel=1e-6)
    eps = 0.1
    cdpo = -(1 - eps) * math.log(_sig(beta * z)) - eps * math.log(_sig(-beta * z))
    assert _dpo([2.0], [-2.0], beta=beta, label_smoothing=eps)[0].item() == pytest.approx(cdpo, rel=1e-6)
    robust = (-(1 - eps) * math.log(_sig(beta * z)) + eps * math.log(_sig(-beta * z))) / (1 - 2 * eps)
    assert _dpo([2.0], [-2.0], beta=beta, loss_type="robust", label_smoothing=eps)[0].item() == pytest.approx(
        robust, rel=1e-6)
    assert _dpo([2.0], [-2.0], beta=beta, loss_type="ipo")[0].item() == pytest.approx((z - 1 / (2 * beta)) ** 2)
    assert _dpo([2.0], [-2.0], beta=beta, loss_type="hinge")[0].item() == pytest.approx(0.0)  # 1 - 0.5*4 < 0
    assert _dpo([0.5], [0.0], beta=beta, loss_type="hinge")[0].item() == pytest.approx(1 - 0.25)


def test_dpo_limits_and_metrics():
    from tunelab.losses import dpo_loss

    # a large margin in the right direction drives the sigmoid loss to 0, the wrong one grows linearly
    assert _dpo([50.0], [-50.0], beta=1.0)[0].item() < 1e-30
    assert _dpo([-50.0], [50.0], beta=1.0)[0].item() == pytest.approx(100.0, rel=1e-6)
    # robust with eps = 0 is plain DPO
    assert _dpo([1.0], [0.0], loss_type="robust")[0].item() == pytest.approx(_dpo([1.0], [0.0])[0].item())
    # ipo is minimised exactly at z = 1 / (2 beta)
    assert _dpo([5.0], [0.0], beta=0.1, loss_type="ipo")[0].item() == pytest.approx(0.0)
    total, metrics = dpo_loss(torch.tensor([-10.0, -20.0]), torch.tensor([-15.0, -18.0]),
                              torch.tensor([-11.0, -20.0]), torch.tensor([-14.0, -19.0]), beta=0.1)
    assert metrics["reward_chosen"].item() == pytest.approx(0.1 * (1.0 + 0.0) / 2)
    assert metrics["reward_rejected"].item() == pytest.approx(0.1 * (-1.0 + 1.0) / 2)
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)
    assert metrics["logp_chosen"].item() == pytest.approx(-15.0)
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        _dpo([1.0], [0.0], loss_type="kto")


# ---------------------------------------------------------------------------------------------
# Reference-free preference losses (SimPO, ORPO) and KTO


def test_simpo_hand_computed_and_log2_limit():
    from tunelab.losses import simpo_loss

    # two pairs: summed log-probs and completion lengths
    chosen, rejected = torch.tensor([-6.0, -10.0]), torch.tensor([-12.0, -1.0])
    n_chosen, n_rejected = torch.tensor([3, 5]), torch.tensor([4, 1])
    beta, gamma = 2.0, 0.5
    total, metrics = simpo_loss(chosen, rejected, n_chosen, n_rejected, beta=beta, gamma=gamma)
    z1 = beta * (-6.0 / 3) - beta * (-12.0 / 4) - gamma  # 2 * -2 - 2 * -3 - 0.5 = 1.5
    z2 = beta * (-10.0 / 5) - beta * (-1.0 / 1) - gamma  # 2 * -2 - 2 * -1 - 0.5 = -2.5
    assert total.item() == pytest.approx(-math.log(_sig(z1)) - math.log(_sig(z2)), rel=1e-6)
    assert metrics["reward_chosen"].item() == pytest.approx((beta * -6.0 / 3 + beta * -10.0 / 5) / 2)
    assert metrics["reward_rejected"].item() == pytest.approx((beta * -12.0 / 4 + beta * -1.0 / 1) / 2)
    assert metrics["reward_accuracy"].item() == 0.5  # the second pair's rejected side has the higher mean
    # equal mean log-probs (different lengths and sums) with gamma 0: log 2 per pair
    same, metrics = simpo_loss(torch.tensor([-4.0, -9.0]), torch.tensor([-8.0, -3.0]), torch.tensor([2, 3]),
                               torch.tensor([4, 1]), beta=2.5, gamma=0.0)
    assert same.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(0.0) and metrics["reward_accuracy"].item() == 0.0
    # gamma shifts the target: winning by exactly gamma is log 2 again
    chosen_mean, rejected_mean = -1.0, -1.25  # beta * gap = 2 * 0.25 = 0.5
    at_margin, _ = simpo_loss(torch.tensor([chosen_mean * 4]), torch.tensor([rejected_mean * 4]), torch.tensor([4]),
                              torch.tensor([4]), beta=2.0, gamma=0.5)
    assert at_margin.item() == pytest.approx(math.log(2), rel=1e-6)


def test_simpo_is_length_normalised_and_needs_no_reference():
    from tunelab.losses import simpo_loss

    # the same per-token log-prob on a long rejected answer: a sum would prefer the short chosen, a mean does not
    total, metrics = simpo_loss(torch.tensor([-2.0]), torch.tensor([-20.0]), torch.tensor([2]), torch.tensor([20]),
                                beta=2.0, gamma=0.0)
    assert total.item() == pytest.approx(math.log(2), rel=1e-6)
    chosen = torch.tensor([-6.0], requires_grad=True)
    rejected = torch.tensor([-6.0], requires_grad=True)
    simpo_loss(chosen, rejected, torch.tensor([3]), torch.tensor([2]), beta=2.0, gamma=0.0)[0].backward()
    # d/d logp_w of -log sigmoid(z) = -(1 - sigmoid(z)) * beta / |y_w|, z = 2 * (-2) - 2 * (-3) = 2
    assert chosen.grad.item() == pytest.approx(-(1 - _sig(2.0)) * 2.0 / 3, rel=1e-6)
    assert rejected.grad.item() == pytest.approx((1 - _sig(2.0)) * 2.0 / 2, rel=1e-6)


def test_log1mexp_matches_the_direct_formula_and_stays_accurate_at_the_ends():
    from tunelab.losses import log1mexp

    x = torch.tensor([-1e-10, -1e-4, -0.5, -0.6931, -0.7, -3.0, -50.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expected, rel=1e-12)
    # float32 near 0, where log(1 - exp(x)) computed naively loses every digit (exp(-1e-8) rounds to 1)
    small = torch.tensor([-1e-8], dtype=torch.float32)
    assert log1mexp(small).item() == pytest.approx(math.log(1e-8), rel=1e-5)
    assert torch.log(1 - torch.exp(small)).item() == -math.inf


def test_orpo_hand_computed():
    from tunelab.losses import orpo_loss

    chosen, rejected = torch.tensor([-3.0, -1.0]), torch.tensor([-8.0, -2.0])
    n_chosen, n_rejected = torch.tensor([6, 4]), torch.tensor([4, 2])
    lam = 0.25
    total, metrics = orpo_loss(chosen, rejected, n_chosen, n_rejected, lam=lam)

    def log_odds(mean_logp):
        p = math.exp(mean_logp)
        return math.log(p / (1 - p))

    expected, ratios = 0.0, []
    for c, r, nc, nr in ((-3.0, -8.0, 6, 4), (-1.0, -2.0, 4, 2)):
        ratio = log_odds(c / nc) - log_odds(r / nr)
        ratios.append(ratio)
        expected += -(c / nc) + lam * -math.log(_sig(ratio))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["nll"].item() == pytest.approx((3.0 / 6 + 1.0 / 4) / 2, rel=1e-6)
    assert metrics["log_odds_ratio"].item() == pytest.approx(sum(ratios) / 2, rel=1e-5)
    assert metrics["reward_chosen"].item() == pytest.approx(lam * (-0.5 - 0.25) / 2, rel=1e-6)
    # chosen -0.5 vs rejected -2.0 and chosen -0.25 vs rejected -1.0 per token: chosen wins both
    assert metrics["reward_accuracy"].item() == 1.0


def test_orpo_odds_ratio_term_is_log2_for_equal_mean_logprobs_and_grows_when_rejected_wins():
    from tunelab.losses import orpo_loss

    chosen, rejected = torch.tensor([-2.0, -30.0]), torch.tensor([-4.0, -10.0])
    n_chosen, n_rejected = torch.tensor([2, 10]), torch.tensor([4, 10])  # means -1 vs -1, then -3 vs -1
    total, metrics = orpo_loss(chosen[:1], rejected[:1], n_chosen[:1], n_rejected[:1], lam=1.0)
    assert metrics["odds_ratio_loss"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert total.item() == pytest.approx(1.0 + math.log(2), rel=1e-6)  # NLL of a mean log-prob of -1, plus log 2
    _, worse = orpo_loss(chosen[1:], rejected[1:], n_chosen[1:], n_rejected[1:], lam=1.0)
    assert worse["odds_ratio_loss"].item() > math.log(2) + 1
    # a mean log-prob of 0 (p = 1) would make the odds infinite: held at -1e-6, the loss stays finite
    total, _ = orpo_loss(torch.tensor([0.0]), torch.tensor([-5.0]), torch.tensor([3]), torch.tensor([5]))
    assert math.isfinite(total.item())


def test_orpo_gradient_raises_chosen_and_lowers_rejected():
    from tunelab.losses import orpo_loss

    chosen = torch.tensor([-4.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    orpo_loss(chosen, rejected, torch.tensor([4]), torch.tensor([4]), lam=0.5)[0].backward()
    # m = -1 on both sides; d log odds / dm = 1 / (1 - e^m); the odds term's slope at 0 is -1/2
    slope = 1 / (1 - math.exp(-1.0))
    assert chosen.grad.item() == pytest.approx((-1 + 0.5 * -0.5 * slope) / 4, rel=1e-6)
    assert rejected.grad.item() == pytest.approx(0.5 * 0.5 * slope / 4, rel=1e-6)


def test_kto_hand_computed():
    from tunelab.losses import kto_loss

    policy = torch.tensor([-10.0, -12.0, -7.0])
    ref = torch.tensor([-11.0, -11.0, -9.0])  # log-ratios 1, -1, 2
    desirable = torch.tensor([True, False, False])
    beta, z0, w_d, w_u = 0.5, 0.3, 1.0, 1.5
    total, metrics = kto_loss(policy, ref, desirable, z0, beta, w_d, w_u)
    expected = (w_d * (1 - _sig(beta * (1 - z0))) + w_u * (1 - _sig(beta * (z0 - -1)))
                + w_u * (1 - _sig(beta * (z0 - 2))))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # rewards beta * logratio as (sum, count) over each subset of rows
    assert [float(v) for v in metrics["reward_desirable"]] == pytest.approx([beta * 1, 1])
    assert [float(v) for v in metrics["reward_undesirable"]] == pytest.approx([beta * (-1 + 2), 2])


def test_kto_at_the_reference_point_costs_half_the_weight_per_row():
    from tunelab.losses import kto_loss

    ref = torch.tensor([-5.0, -8.0, -2.0, -9.0])
    z0 = 0.7
    policy = ref + z0
    desirable = torch.tensor([True, True, False, False])
    total, _ = kto_loss(policy, ref, desirable, z0, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    assert total.item() == pytest.approx(0.5 * 2.0 * 2 + 0.5 * 0.5 * 2, rel=1e-6)


def test_kto_reference_point_is_a_clamped_detached_mean_over_processes():
    from tunelab.losses import kto_reference_point

    logratios = torch.tensor([0.5, -0.1, 0.8], requires_grad=True)
    z0 = kto_reference_point(logratios)
    assert z0.item() == pytest.approx((0.5 - 0.1 + 0.8) / 3, rel=1e-6) and not z0.requires_grad
    # a negative mean clamps at 0
    assert kto_reference_point(torch.tensor([-0.5, 0.2])).item() == 0.0
    assert kto_reference_point(torch.zeros(0)).item() == 0.0  # no mismatched rows anywhere
    # all_sum: the mean over every process's rows, not the mean of per-process means
    def all_sum(totals):  # what another process adds: (sum, count) of its 2 rows summing to 4
        return totals + torch.tensor([4.0, 2.0], dtype=totals.dtype)
    # (1.2 + 4) / 5 rows; the mean of the two processes' means would be (0.4 + 2) / 2
    assert kto_reference_point(logratios, all_sum=all_sum).item() == pytest.approx((1.2 + 4.0) / 5, rel=1e-6)


def test_kto_gradient_flows_to_the_policy_only_not_through_the_reference_point():
    from tunelab.losses import kto_loss, kto_reference_point

    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    ref = torch.tensor([-3.5, -3.0])
    kl_policy = torch.tensor([-6.0, -2.0], requires_grad=True)  # mismatched rows under the policy
    kl_ref = torch.tensor([-6.5, -2.5])
    z0 = kto_reference_point(kl_policy - kl_ref)  # 0.5
    beta = 1.0
    total, _ = kto_loss(policy, ref, torch.tensor([True, False]), z0, beta=beta)
    total.backward()
    assert kl_policy.grad is None  # z0 carries no gradient
    # desirable: d/dr (1 - sig(beta (r - z0))) = -beta s (1 - s), s = sig(0.5 - 0.5) = sig(0)
    assert policy.grad[0].item() == pytest.approx(-beta * _sig(0.0) * (1 - _sig(0.0)), rel=1e-6)
    # undesirable, r = -1: d/dr (1 - sig(beta (z0 - r))) = +beta s (1 - s), s = sig(0.5 + 1)
    assert policy.grad[1].item() == pytest.approx(beta * _sig(1.5) * (1 - _sig(1.5)), rel=1e-6)
    # and kto_loss itself treats a reference point that carries a graph as a constant
    point = torch.tensor(0.5, requires_grad=True)
    kto_loss(policy.detach().requires_grad_(), ref, torch.tensor([True, False]), point, beta=beta)[0].backward()
    assert point.grad is None
