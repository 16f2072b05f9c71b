"""Advantage estimators, registered by name, all with one signature::

    fn(batch: AdvantageInput) -> Advantages(adv [B, T], returns [B, T] | None)

``AdvantageInput`` carries everything any estimator may read: the outcome reward of
each completion, which completions answer the same prompt (``group_ids``), the token
mask, and, when the recipe has them, per-token KL estimates (KL placed in the reward)
and a critic's values. An estimator reads what it needs; the caller never branches on
the estimator's name. ``returns`` are the critic's regression targets (``gae``) or the
return-to-go that the advantage was built from (REINFORCE family); group estimators
leave it ``None``.

Token rewards: the outcome reward ``r`` is placed on the last completion token and,
with KL in the reward, every token also gets ``-beta * kl_t`` (Ouyang et al. 2022,
InstructGPT eq. (2); Hu 2025, REINFORCE++).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from thinkrl.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")

# Each estimator declares, where it is registered, the loss aggregation its paper uses
# (``loss_agg``, when the config does not say), where the KL penalty goes by default
# (``kl_in``: in the reward for the estimators that build token-level returns, which then
# also accept it there; in the loss for the group estimators) and what it reads beyond the
# rewards (``needs=("values",)``: a critic). ``batch_stats=True`` marks an estimator that
# normalises over the whole batch (whitening), not within a group: with many processes it
# runs on the gathered batch (thinkrl/distributed/torch_dist.py).


@dataclass
class AdvantageInput:
    rewards: Tensor  # [B] outcome reward per completion
    group_ids: Tensor  # [B] int, equal for completions of the same prompt
    mask: Tensor  # [B, T] float, 1.0 on completion tokens
    token_kl: Tensor | None = None  # [B, T] KL(pi_old || pi_ref) per token, when KL is in the reward
    kl_coef: float = 0.0  # beta of the reward shaping
    values: Tensor | None = None  # [B, T] critic values V(s_t) of the state before token t
    baseline: float = 0.0  # reinforce: a moving average of past rewards (0 without one)
    gamma: float = 1.0
    lam: float = 1.0
    eps: float = 1e-4


@dataclass
class Advantages:
    adv: Tensor  # [B, T], zero on padding
    returns: Tensor | None = None  # [B, T] targets for a critic, or the return-to-go


# ---------------------------------------------------------------------------
# Building blocks (pure, tested on their own)


def group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample mean, unbiased std and size of the sample's group.

    values: [B] float, group_ids: [B] int -> three [B] tensors.
    """
    # In float64 the mean of G equal float32 values is exactly that value, so a group of
    # equal rewards gets an advantage of exactly 0 (in float32, 0.1 * 8 / 8 != 0.1).
    out_dtype = values.dtype
    values = values.double()
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B] in 0..n_groups-1
    n_groups = int(inv.max()) + 1
    count = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inv, torch.ones_like(values)
    )  # [n_groups]
    total = torch.zeros_like(count).index_add_(0, inv, values)  # [n_groups]
    mean = total / count  # [n_groups]
    sq = torch.zeros_like(count).index_add_(0, inv, (values - mean[inv]) ** 2)  # [n_groups]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # [n_groups], Bessel-corrected like torch.std
    return mean[inv].to(out_dtype), std[inv].to(out_dtype), count[inv].to(out_dtype)


def token_rewards(
    outcome: Tensor, mask: Tensor, token_kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Per-token rewards: ``outcome`` [B] on each row's last real token, ``-kl_coef * token_kl`` on every token."""
    mask = mask.float()
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # [B] index of the last real token
    r = torch.zeros_like(mask)  # [B, T]
    r[torch.arange(mask.shape[0]), last] = outcome.float() * (mask.sum(-1) > 0).float()
    if token_kl is not None and kl_coef:
        r = r - kl_coef * token_kl * mask
    return r * mask


def discounted_returns(r: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Return-to-go R_t = sum_{k >= t} gamma^(k - t) r_k over each row's real tokens (seed eq. 6.15)."""
    out = torch.zeros_like(r)  # [B, T]
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def gae_advantages(
    r: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) (Schulman et al. 2016, eq. (16)).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after the last real token
    (the episode ends there); A_t = delta_t + gamma lambda A_{t+1}. Returns (adv,
    returns = adv + V), both [B, T] and zero on padding.
    """
    values = values * mask
    adv = torch.zeros_like(r)  # [B, T]
    next_adv = torch.zeros_like(r[:, 0])  # [B]
    next_value = torch.zeros_like(r[:, 0])  # [B]
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - values[:, t]  # [B]
        a = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = a
        # a padded position passes nothing back: the next real token of a row is its end
        next_adv = a
        next_value = values[:, t]
    return adv, (adv + values) * mask


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-4) -> Tensor:
    """(x - mean) / (std + eps) over the real tokens of the whole batch (unbiased std); 0 on padding."""
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + eps) * mask


def _broadcast(adv: Tensor, mask: Tensor) -> Tensor:
    return adv[:, None].to(mask.dtype) * mask  # [B] -> [B, T]


# ---------------------------------------------------------------------------
# Group estimators: one scalar per completion, broadcast over its tokens


@ADVANTAGES.register(
    "grpo", loss_agg="seq_mean_token_mean", kl_in="loss"
)  # GRPO (Shao et al. 2024): 1/G sum_i 1/|o_i| sum_t
def grpo(b: AdvantageInput) -> Advantages:
    """GRPO outcome advantage: A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    Shao et al. 2024, "DeepSeekMath", eq. (3) with outcome supervision. The std is
    the unbiased sample std of the group, as in TRL and verl.
    """
    mean, std, _ = group_stats(b.rewards.float(), b.group_ids)
    return Advantages(_broadcast((b.rewards - mean) / (std + b.eps), b.mask))


@ADVANTAGES.register(
    "dr_grpo", loss_agg="seq_mean_token_sum_norm", kl_in="loss"
)  # Dr. GRPO (Liu et al. 2025): a constant normaliser
def dr_grpo(b: AdvantageInput) -> Advantages:
    """Dr. GRPO: A_i = r_i - mean(r_group), with no division by the group std.

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective":
    the std division up-weights groups that are nearly all right or all wrong (a
    question-difficulty bias). Pair it with the constant length normaliser
    (``seq_mean_token_sum_norm``) to remove the response-length bias as well.
    """
    mean, _, _ = group_stats(b.rewards.float(), b.group_ids)
    return Advantages(_broadcast(b.rewards - mean, b.mask))


@ADVANTAGES.register("rloo", loss_agg="seq_mean_token_mean", kl_in="loss")
def rloo(b: AdvantageInput) -> Advantages:
    """RLOO: A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline (seed eq. 6.30).

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
    for Learning from Human Feedback in LLMs". Equal to G/(G-1) * (r_i - mean).
    Departure: the paper applies it to the sequence log-prob (REINFORCE); here it
    feeds whichever policy loss is configured (PPO-clip by default).
    """
    mean, _, count = group_stats(b.rewards.float(), b.group_ids)
    return Advantages(_broadcast((b.rewards - mean) * count / (count - 1).clamp(min=1), b.mask))


# ---------------------------------------------------------------------------
# REINFORCE family: token rewards -> return-to-go


@ADVANTAGES.register(
    "reinforce", loss_agg="seq_mean_token_sum", kl_in="reward"
)  # the policy-gradient estimate averages over sequences and sums over tokens: 1/N sum_n sum_t
def reinforce(b: AdvantageInput) -> Advantages:
    """REINFORCE: A_t = R_t - b, the discounted return-to-go minus an optional baseline.

    Williams 1992, "Simple Statistical Gradient-Following Algorithms"; seed eqs.
    (6.15)-(6.20). ``b.baseline`` is a moving average of past batch rewards kept by
    the trainer (:class:`MovingAverage`, ``algo.baseline_decay``), 0 without one.
    Departure: the baseline is a scalar, not a learned V(s_t) (that is ``gae``).
    """
    r = token_rewards(b.rewards, b.mask, b.token_kl, b.kl_coef)  # [B, T]
    ret = discounted_returns(r, b.mask, b.gamma)  # [B, T]
    return Advantages((ret - b.baseline) * b.mask, ret)


@ADVANTAGES.register(
    "reinforce_pp", loss_agg="token_mean", kl_in="reward", batch_stats=True
)  # REINFORCE++ (Hu 2025), as in OpenRLHF
def reinforce_pp(b: AdvantageInput) -> Advantages:
    """REINFORCE++: token rewards with -beta*KL, return-to-go, whitened over the whole batch.

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models", §3. The batch-level normalisation replaces a critic or a per-prompt
    baseline. The KL goes in the reward when ``algo.kl_coef > 0`` (the default
    ``kl_in`` for this estimator); the paper uses the k1 estimator there.
    Departure: the whitening divides by the unbiased std plus ``eps`` (like GRPO's)
    and no advantage clipping is applied.
    """
    r = token_rewards(b.rewards, b.mask, b.token_kl, b.kl_coef)  # [B, T]
    ret = discounted_returns(r, b.mask, b.gamma)  # [B, T]
    return Advantages(masked_whiten(ret, b.mask, b.eps), ret)


@ADVANTAGES.register("reinforce_pp_baseline", loss_agg="token_mean", kl_in="reward", batch_stats=True)
def reinforce_pp_baseline(b: AdvantageInput) -> Advantages:
    """REINFORCE++-baseline: subtract the group's mean reward, then REINFORCE++.

    Hu 2025 (REINFORCE++ v3), "REINFORCE++-Baseline": the outcome reward minus the
    mean reward of its prompt's group is the token reward at the end of the
    completion (plus -beta*KL per token), the return-to-go is whitened over the batch.
    A group with equal rewards gets zero advantage when there is no KL term.
    """
    mean, _, _ = group_stats(b.rewards.float(), b.group_ids)
    r = token_rewards(b.rewards - mean, b.mask, b.token_kl, b.kl_coef)  # [B, T]
    ret = discounted_returns(r, b.mask, b.gamma)  # [B, T]
    return Advantages(masked_whiten(ret, b.mask, b.eps), ret)


@ADVANTAGES.register(
    "gae", loss_agg="token_mean", kl_in="reward", needs=("values",), batch_stats=True
)  # PPO for LMs (Ouyang et al. 2022; verl, OpenRLHF)
def gae(b: AdvantageInput) -> Advantages:
    """PPO's advantage: GAE(gamma, lambda) on KL-shaped token rewards, from a learned critic.

    Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ouyang et al. 2022
    (token reward -beta*KL plus the outcome at the end).
    ``returns`` (A + V before whitening) are the critic's targets; the advantages are
    then whitened over the batch, as in InstructGPT-style PPO.
    Departures: the episode ends at the last completion token (V = 0 after it, no
    bootstrapping past EOS or truncation); the critic is a separate copy of the
    backbone (no weights shared with the policy), see ``thinkrl.trainer.critic``.
    """
    if b.values is None:
        raise ValueError("gae needs the critic's values (AdvantageInput.values)")
    r = token_rewards(b.rewards, b.mask, b.token_kl, b.kl_coef)  # [B, T]
    adv, ret = gae_advantages(r, b.values, b.mask, b.gamma, b.lam)  # [B, T] each
    return Advantages(masked_whiten(adv, b.mask, b.eps), ret)


class MovingAverage:
    """Bias-corrected exponential moving average of the batch-mean reward (REINFORCE's baseline).

    ``value`` is the average of earlier batches only, so the baseline never depends on
    the samples it is subtracted from; it is 0 before the first update.
    """

    def __init__(self, decay: float):
        self.decay, self.ema, self.n = decay, 0.0, 0

    @property
    def value(self) -> float:
        return self.ema / (1.0 - self.decay**self.n) if self.n else 0.0

    def update(self, x: float) -> None:
        self.ema = self.decay * self.ema + (1.0 - self.decay) * x
        self.n += 1

    def state_dict(self) -> dict:
        return {"ema": self.ema, "n": self.n}

    def load_state_dict(self, s: dict) -> None:
        self.ema, self.n = s["ema"], s["n"]
