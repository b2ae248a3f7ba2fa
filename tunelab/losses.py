"""Losses as pure tensor functions: no models, no data loading.

Each returns what the training loop needs (a sum and the count it is averaged over, so gradient
accumulation can average over the whole accumulated batch exactly) plus anything worth logging.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` where `mask` is nonzero. `values`, `mask`: same shape."""
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is nonzero (0 when the mask is empty)."""
    count = mask.sum()
    return masked_sum(values, mask) / count.clamp(min=1).to(values.dtype)


def sft_loss(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked next-token cross-entropy, returned as (sum, token count).

    loss = -sum_{t: mask_t = 1} log p(x_t | x_<t), to be divided by the number of trained tokens of the
    whole (accumulated) batch, which gives the token-level mean used by instruction tuning with the
    loss on the response only.

    `token_logprobs`, `loss_mask`: `[B, T]`.
    """
    return -masked_sum(token_logprobs, loss_mask), loss_mask.sum()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss (Bradley & Terry, 1952; as in Ouyang et al., 2022), summed over pairs.

    loss_i = -log sigmoid(r_chosen_i - r_rejected_i - margin_i) + center_coef * (r_chosen_i + r_rejected_i)^2

    The margin (Touvron et al., 2023) asks chosen to win by at least that much; the centering term
    (Eisenstein et al., 2023) keeps rewards near zero so their scale means something. Divided by the
    number of pairs it gives the mean loss.

    Args: `chosen_rewards`, `rejected_rewards`, `margin`: `[N]`.
    Returns (loss sum, metrics): accuracy (share of pairs with r_chosen > r_rejected), mean margin
    r_chosen - r_rejected, and the mean and std of all rewards; metrics are detached.
    """
    diff = chosen_rewards - rejected_rewards
    target = diff - margin if margin is not None else diff
    losses = -torch.nn.functional.logsigmoid(target)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    rewards = torch.cat([chosen_rewards, rejected_rewards]).detach()
    metrics = {
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.mean().detach(),
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(unbiased=False),
    }
    return losses.sum(), metrics


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization losses (Rafailov et al., 2023) and variants, summed over pairs.

    With the log-ratio difference  z = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):

    - `sigmoid` (DPO):   -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z); eps = label_smoothing > 0 is
                         conservative DPO (cDPO, Mitchell 2023), for labels flipped with probability eps.
    - `robust`:          [-(1 - eps) log sigmoid(beta z) + eps log sigmoid(-beta z)] / (1 - 2 eps), the unbiased
                         loss under label noise eps (Chowdhury et al., 2024); needs 0 <= eps < 0.5.
    - `ipo`:             (z - 1 / (2 beta))^2 (Azar et al., 2023), regresses the gap to a fixed target.
    - `hinge`:           max(0, 1 - beta z) (SLiC, Zhao et al., 2023).

    At the start, when the policy equals the reference, z = 0 and the sigmoid loss is log 2 per pair.

    Args: sequence log-probs `[N]` (summed over completion tokens) of the policy and the reference.
    Returns (loss sum, metrics): implicit rewards beta * (logp - ref_logp) of chosen and rejected,
    reward accuracy and margin, and the policy log-probs; metrics are detached means.
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    z = chosen_logratio - rejected_logratio
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * logsig(beta * z) - label_smoothing * logsig(-beta * z)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * logsig(beta * z) + label_smoothing * logsig(-beta * z)) / (
            1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"unknown DPO loss '{loss_type}'; expected one of {', '.join(DPO_LOSSES)}")
    return losses.sum(), _pair_metrics(beta * chosen_logratio, beta * rejected_logratio, policy_chosen,
                                       policy_rejected)


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                  policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "logp_chosen": policy_chosen.detach().mean(),
        "logp_rejected": policy_rejected.detach().mean(),
    }


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float = 2.0, gamma: float = 0.5
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al., 2024), summed over pairs: reference-free, on length-normalised log-probs.

    loss_i = -log sigmoid(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma)

    The implicit reward of a response is its mean per-token log-prob times beta; gamma is the target
    margin by which the chosen reward should beat the rejected one (in the same units: beta-scaled). With
    equal mean log-probs and gamma = 0 the loss is log 2 per pair.

    Args: sequence log-probs `[N]` summed over completion tokens, and the completion token counts `[N]`
    (|y_w|, |y_l|; clamped at 1). Returns (loss sum, metrics): implicit rewards of chosen and rejected,
    reward accuracy and margin, and the summed policy log-probs; metrics are detached means.
    """
    chosen_rewards = beta * policy_chosen / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * policy_rejected / rejected_tokens.clamp(min=1)
    losses = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses.sum(), _pair_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) below -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


ORPO_MAX_MEAN_LOGP = -1e-6  # a mean per-token log-prob above this (p > 0.999999) is held here: finite log-odds


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, lam: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al., 2024), summed over pairs: the chosen NLL plus a weighted odds-ratio term, no reference.

    With the length-normalised log-prob  m(y) = log pi(y|x) / |y|  (the log of the per-token geometric mean
    probability p) and  log odds(y) = log(p / (1 - p)) = m(y) - log(1 - exp(m(y))):

        loss_i = -m(y_w) + lam * -log sigmoid(log odds(y_w) - log odds(y_l))

    log(1 - exp(m)) is computed with `log1mexp`; m is held at most -1e-6 so the odds stay finite. When both
    sides have the same mean log-prob the odds-ratio term is log 2.

    Args: sequence log-probs `[N]` summed over completion tokens, completion token counts `[N]` (clamped at
    1), and lam (TRL's ORPO `beta`). Returns (loss sum, metrics): rewards lam * m(y) of chosen and rejected
    (as TRL logs them), their accuracy and margin, the chosen NLL, the odds-ratio term, the mean log odds
    ratio and the summed policy log-probs; metrics are detached means.
    """
    chosen_mean = (policy_chosen / chosen_tokens.clamp(min=1)).clamp(max=ORPO_MAX_MEAN_LOGP)
    rejected_mean = (policy_rejected / rejected_tokens.clamp(min=1)).clamp(max=ORPO_MAX_MEAN_LOGP)
    log_odds_ratio = (chosen_mean - log1mexp(chosen_mean)) - (rejected_mean - log1mexp(rejected_mean))
    odds_ratio_term = -torch.nn.functional.logsigmoid(log_odds_ratio)
    nll = -chosen_mean
    losses = nll + lam * odds_ratio_term
    metrics = _pair_metrics(lam * chosen_mean, lam * rejected_mean, policy_chosen, policy_rejected)
    metrics.update(nll=nll.detach().mean(), odds_ratio_loss=odds_ratio_term.detach().mean(),
                   log_odds_ratio=log_odds_ratio.detach().mean())
    return losses.sum(), metrics


def kto_reference_point(kl_logratios: torch.Tensor, all_sum=None) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al., 2024): an estimate of KL(pi || ref), detached.

    z0 = max(0, mean_j (log pi(y'_j|x_j) - log ref(y'_j|x_j))) over mismatched pairs (prompt x_j with another
    row's completion y'_j), summed over completion tokens. `all_sum`, when given, sums over processes, so
    every process gets the mean over the whole batch. No rows (anywhere): 0. Returns a 0-dim tensor.
    """
    logratios = kl_logratios.detach().double()
    totals = torch.stack([logratios.sum(), torch.tensor(float(logratios.numel()), dtype=torch.float64,
                                                        device=logratios.device)])
    if all_sum is not None:
        totals = all_sum(totals)
    mean = totals[0] / totals[1] if totals[1] > 0 else torch.zeros((), dtype=torch.float64, device=totals.device)
    return mean.clamp(min=0).to(kl_logratios.dtype)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """KTO (Ethayarajh et al., 2024) on unpaired rows, summed over rows.

    With r = log pi(y|x) - log ref(y|x) (summed over completion tokens) and the reference point z0
    (`kto_reference_point`, no gradient flows into it):

        desirable row:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
        undesirable row:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

    At r = z0 each row costs half its weight. Args: `policy_logps`, `ref_logps`: `[N]`; `desirable`: `[N]`
    bool. Returns (loss sum, metrics): the implicit rewards beta * r of desirable and of undesirable rows,
    each as (sum, row count) so that means over a subset of rows add up exactly across batches; detached.
    """
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    logratios = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    rewards = (beta * logratios).detach()
    metrics = {"reward_desirable": (rewards[desirable].sum(), desirable.sum()),
               "reward_undesirable": (rewards[~desirable].sum(), (~desirable).sum())}
    return losses.sum(), metrics


# ---------------------------------------------------------------------------------------------
# RLHF with PPO (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022)


def masked_moments(values: torch.Tensor, mask: torch.Tensor, all_sum=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of `values` over the positions where `mask` is set.

    `all_sum`, when given, sums a tensor over processes, so each process gets the moments of the whole
    batch spread across them (two reductions: the mean first, then the squared deviations from it).
    """
    def total(x: torch.Tensor) -> torch.Tensor:
        return all_sum(x) if all_sum is not None else x

    count_and_sum = total(torch.stack([mask.to(values.dtype).sum(), masked_sum(values, mask)]))
    count = count_and_sum[0].clamp(min=1)
    mean = count_and_sum[1] / count
    return mean, total(masked_sum((values - mean) ** 2, mask)) / count


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """(x - mean) / std over the positions where `mask` is set; with shift_mean=False the mean is kept.

    `values`, `mask`: `[B, T]`. Masked positions come back as 0. `all_sum`: see `masked_moments`.
    """
    mean, var = masked_moments(values, mask, all_sum)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens (Schulman, 2020).

    k1 = log p - log q (unbiased, can be negative);  k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0).
    `logprobs`, `ref_logprobs`: `[B, T]` under the policy p and the reference q.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}'; expected k1 or k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every response token, plus the score on the last one.

    `scores`: `[B]`; `kl`, `mask`: `[B, T]` (mask = response tokens, right-padded). Returns `[B, T]`.
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = (torch.arange(mask.shape[1], device=mask.device) * mask.long()).argmax(dim=1)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016) over masked token sequences.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    where V_{t+1} and A_{t+1} are 0 past the last unmasked token. Returns (advantages, returns = A + V),
    both `[B, T]` and 0 on masked positions. `rewards`, `values`, `mask`: `[B, T]`.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    carry = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(carry)
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(carry)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        carry = delta + gamma * lam * next_mask * carry
        advantages[:, t] = carry
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, token-level masked mean (Schulman et al., 2017).

    ratio = exp(logp - logp_old);  loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).
    Returns (loss, metrics: clip fraction, approximate KL 0.5 * mean((logp - logp_old)^2)). All `[B, T]`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask).detach(),
               "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).detach()}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)).

    Returns (loss, metrics: value clip fraction). All inputs `[B, T]`.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"value_clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask).detach()}


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, all_sum=None) -> float:
    """1 - Var(target - predicted) / Var(target) over masked positions (1 = perfect, 0 = no better than the mean).

    `all_sum`: see `masked_moments`."""
    _, target_var = masked_moments(target, mask, all_sum)
    _, residual_var = masked_moments(target - predicted, mask, all_sum)
    return float(1 - residual_var / target_var.clamp(min=1e-8))


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. (2019): nudges kl_coef toward a target KL.

    error = clip(KL / target - 1, -0.2, 0.2);  kl_coef *= 1 + error * n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ---------------------------------------------------------------------------------------------
# Critic-free RL with group baselines: GRPO (Shao et al., 2024), Dr. GRPO (Liu et al., 2025) and RLOO
# (Kool et al., 2019; Ahmadian et al., 2024)


def group_advantages(scores: torch.Tensor, num_generations: int, estimator: str = "grpo", scale: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """One advantage per response from the rewards of its group (the K responses to the same prompt).

    `scores`: `[G * K]`, each group's K rewards consecutive. With group mean m and sample std s (n - 1):

    - `grpo`:  A_i = (r_i - m) / (s + eps), or r_i - m with scale=False (Dr. GRPO);
    - `rloo`:  A_i = r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - m), the leave-one-out baseline.

    A group whose rewards are all equal carries no signal: its advantages are exactly 0.
    Returns (advantages `[G * K]`, zero_spread `[G]`: True where a group's rewards are all equal).
    """
    if num_generations < 2:
        raise ValueError(f"a group baseline needs at least 2 responses per prompt, got {num_generations}")
    if scores.numel() % num_generations:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {num_generations}")
    groups = scores.float().view(-1, num_generations)
    centred = groups - groups.mean(dim=1, keepdim=True)
    zero_spread = (groups.max(dim=1).values - groups.min(dim=1).values) == 0
    if estimator == "grpo":
        advantages = centred / (groups.std(dim=1, keepdim=True) + eps) if scale else centred
    elif estimator == "rloo":
        advantages = centred * num_generations / (num_generations - 1)
    else:
        raise ValueError(f"unknown advantage estimator '{estimator}'; expected grpo or rloo")
    advantages = torch.where(zero_spread[:, None], torch.zeros_like(advantages), advantages)
    return advantages.flatten(), zero_spread


def group_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_range: float = 0.2, ref_logprobs: torch.Tensor | None = None,
                      kl_coef: float = 0.0, loss_norm: str = "sequence"
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy objective with one advantage per response, and GRPO's optional k3 KL term.

    Per response token t of response i, with ratio_t = exp(logp_t - logp_old_t):

        l_t = max(-A_i ratio_t, -A_i clip(ratio_t, 1 - eps, 1 + eps)) + kl_coef * k3_t,
        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (only when `ref_logprobs` is given)

    `loss_norm="sequence"` (GRPO): the sum of each response's token mean, to be divided by the number
    of responses; `"token"` (Dr. GRPO): the sum over every response token, to be divided by the number
    of tokens. Returning the sum and its count lets micro-batches and processes add up to the exact
    minibatch mean. At ratio 1 (one on-policy pass) and no KL, the gradient is -A_i grad logp_t.

    `logprobs`, `old_logprobs`, `mask`, `ref_logprobs`: `[B, T]`; `advantages`: `[B]`.
    Returns (loss sum, count, metrics: clip fraction and mean k3 per token as sums over tokens,
    `tokens` their count).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.to(logprobs.dtype)[:, None]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {"clip_fraction": masked_sum((clipped > unclipped).float(), mask).detach(), "tokens": mask.sum()}
    if ref_logprobs is not None:
        k3 = kl_estimate(logprobs, ref_logprobs, "k3")
        per_token = per_token + kl_coef * k3
        metrics["k3"] = masked_sum(k3, mask).detach()
    if loss_norm == "sequence":
        lengths = mask.sum(1)
        total = ((per_token * mask).sum(1) / lengths.clamp(min=1)).sum()
        return total, (lengths > 0).sum().to(logprobs.dtype), metrics
    if loss_norm == "token":
        return masked_sum(per_token, mask), mask.sum(), metrics
    raise ValueError(f"unknown loss normalisation '{loss_norm}'; expected sequence or token")


# ---------------------------------------------------------------------------------------------
# Contrastive: InfoNCE / multiple-negatives ranking over in-batch and hard negatives


def info_nce_loss(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor | float,
                  exclude: torch.Tensor | None = None, symmetric: bool = False
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE (multiple-negatives ranking): anchor i's positive is candidate i, every other candidate
    (the other rows' positives, then any hard negatives) is a negative.

        l_i = -log softmax_j(scale * a_i . c_j)[i]

    With `symmetric`, each positive also has to pick its own anchor out of all anchors, and a row's
    loss is the mean of both directions: (l_i + l'_i) / 2 with l'_i = -log softmax_j(scale * c_i . a_j)[i].

    `anchors`: `[B, D]`; `candidates`: `[B + M, D]` (normalise both beforehand for cosine similarity);
    `scale`: 1 / temperature; `exclude`: `[B, B + M]` bool, True where a candidate is not to be counted
    as a negative of that row (a duplicate of its positive); the diagonal is never excluded.
    Returns (loss summed over the B rows, metrics: in-batch top-1 accuracy as a per-row mean).
    With B identical embeddings and nothing excluded the loss per row is log(B + M).
    """
    batch = anchors.shape[0]
    logits = scale * anchors @ candidates.T
    diagonal = torch.eye(batch, candidates.shape[0], dtype=torch.bool, device=logits.device)
    if exclude is not None:
        logits = logits.masked_fill(exclude.to(logits.device) & ~diagonal, float("-inf"))
    target = torch.arange(batch, device=logits.device)
    per_row = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    if symmetric:
        backward = logits[:, :batch].T  # positive i against every anchor (the same exclusions, transposed)
        per_row = (per_row + torch.nn.functional.cross_entropy(backward, target, reduction="none")) / 2
    accuracy = (logits.detach().argmax(dim=1) == target).float().mean()
    return per_row.sum(), {"accuracy": accuracy}
