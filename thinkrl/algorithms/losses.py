"""Policy losses, the critic's value loss, and the one place where token losses are normalised.

Policy-loss signature::

    fn(logp [B, T], old_logp [B, T], adv [B, T], mask [B, T], hp: LossParams)
        -> (token_loss [B, T], metrics)

``old_logp`` is the log-prob under the policy that sampled the tokens (equal to
``logp.detach()`` on the first pass over a batch). The token losses are then
reduced by :func:`aggregate`. Sequence-level losses (``gspo``, ``kimi``) write each
sequence's loss so that ``seq_mean_token_mean`` yields exactly the paper's
objective; it is their default aggregation (their ``loss_agg`` trait).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from thinkrl.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")

# Each loss declares, where it is registered, the aggregation its published form needs
# (``loss_agg``, which overrides the advantage estimator's) and whether its value and gradient
# vanish wherever adv == 0 (``advantage_weighted=True``: rows with zero advantage can be skipped).


@dataclass
class LossParams:
    clip_low: float = 0.2  # ratio >= 1 - clip_low
    clip_high: float = 0.2  # ratio <= 1 + clip_high
    clip_c: float = 3.0  # dual clip: the loss of a negative-advantage token is at most -clip_c * A
    tau: float = 0.1  # kimi: strength of the relative-entropy regulariser


def tis_weights(old_logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling weights, per token: min(pi_old / pi_behaviour, cap).

    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training":
    the rollout engine samples from pi_behaviour, which differs from the trainer's pi_old (bf16,
    other kernels, another library), so the gradient estimate is reweighted toward pi_old. The
    weight is a constant of the loss (no gradient), truncated at ``cap`` to bound its variance.
    """
    return torch.exp(old_logp.detach() - behaviour_logp).clamp(max=cap)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _clip_objective(ratio: Tensor, adv: Tensor, hp: LossParams) -> tuple[Tensor, Tensor]:
    """min(ratio A, clip(ratio) A) and where the clipped branch is the smaller (taken)."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - hp.clip_low, 1.0 + hp.clip_high) * adv
    return torch.minimum(unclipped, clipped), (clipped < unclipped).float()


@POLICY_LOSSES.register("ppo_clip", advantage_weighted=True)
def ppo_clip(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, hp: LossParams = LossParams()
) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate, per token: -min(ratio * A, clip(ratio, 1-e_low, 1+e_high) * A).

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. (7), and
    GRPO's objective (Shao et al. 2024, eq. (3)) per token. ``clip_high > clip_low`` is DAPO's
    clip-higher (Yu et al. 2025). Where the ratio is clipped in the direction of the
    advantage, the gradient is 0.
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    obj, is_clipped = _clip_objective(ratio, adv, hp)
    metrics = {
        "clip_frac": _masked_mean(is_clipped, mask).item(),
        "ratio_mean": _masked_mean(ratio.detach(), mask).item(),
    }
    return -obj, metrics


@POLICY_LOSSES.register("dual_clip", advantage_weighted=True)
def dual_clip(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, hp: LossParams = LossParams()
) -> tuple[Tensor, dict]:
    """Dual-clip PPO: for A < 0 the objective is max(min(rA, clip(r)A), c A), c = ``clip_c`` > 1.

    Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning", eq. (5). With A < 0 and a huge ratio, PPO's loss -rA grows without
    bound; the second clip caps it at -c A (and the gradient there is 0).
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    obj, is_clipped = _clip_objective(ratio, adv, hp)
    lower = hp.clip_c * adv
    dual = (adv < 0) & (lower > obj)
    obj = torch.where(adv < 0, torch.maximum(obj, lower), obj)
    metrics = {
        "clip_frac": _masked_mean(is_clipped, mask).item(),
        "dual_clip_frac": _masked_mean(dual.float(), mask).item(),
        "ratio_mean": _masked_mean(ratio.detach(), mask).item(),
    }
    return -obj, metrics


@POLICY_LOSSES.register("pg", advantage_weighted=True)
def pg(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, hp: LossParams = LossParams()
) -> tuple[Tensor, dict]:
    """Plain policy gradient, no ratio: -A * logp (seed eq. 6.17 / 6.22; Williams 1992).

    Its gradient equals PPO-clip's on the first pass over fresh samples; with
    ``num_iterations > 1`` it ignores that the data came from an older policy.
    """
    return -adv * logp, {"clip_frac": 0.0}


@POLICY_LOSSES.register("gspo", loss_agg="seq_mean_token_mean", advantage_weighted=True)
def gspo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, hp: LossParams = LossParams()
) -> tuple[Tensor, dict]:
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios, clipped.

    Zheng et al. 2025, "Group Sequence Policy Optimization", eqs. (5)-(7), in its
    GSPO-token form (eq. (13)): s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], whose value is
    s_i = exp(mean_t log(pi/pi_old)) and whose gradient is s_i * grad log pi(y_t). With
    one advantage per sequence and ``seq_mean_token_mean`` this is exactly GSPO. The
    paper clips s_i to a much narrower band (eps 3e-4 / 4e-4): set ``algo.clip_eps``.
    """
    n = mask.sum(-1).clamp(min=1)  # [B]
    seq_log_ratio = ((logp - old_logp) * mask).sum(-1) / n  # [B]
    s = torch.exp(seq_log_ratio.detach()[:, None] + logp - logp.detach())  # [B, T], value s_i on every token
    obj, is_clipped = _clip_objective(s, adv, hp)
    seq_mask = (mask.sum(-1) > 0).float()  # [B]
    metrics = {
        "clip_frac": _masked_mean(is_clipped, mask).item(),
        "ratio_mean": float((seq_log_ratio.detach().exp() * seq_mask).sum() / seq_mask.sum().clamp(min=1)),
    }
    return -obj, metrics


@POLICY_LOSSES.register("kimi", loss_agg="seq_mean_token_mean")
def kimi(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, hp: LossParams = LossParams()
) -> tuple[Tensor, dict]:
    """Kimi k1.5's online policy mirror descent: a squared loss per sequence,

        L_i = (r_i - mean r - tau * log(pi_theta(y_i) / pi_old(y_i)))^2 / (2 tau),

    Kimi Team 2025, "Kimi k1.5: Scaling Reinforcement Learning with LLMs", §2.3.2:
    tau log Z is estimated by the mean reward of the k samples, so pair
    this loss with ``dr_grpo`` (adv = r - mean r); ``adv`` is read per sequence as its
    mean over tokens. The log-ratio is the sequence's (the sum over its tokens).
    Departure: we divide by 2 tau so that the gradient equals the paper's surrogate
    gradient -[(r - mean r) grad log pi - tau/2 grad (log pi/pi_old)^2] at the
    policy-gradient scale; the minimiser is unchanged. Each token carries its
    sequence's L_i, so ``seq_mean_token_mean`` gives 1/k sum_i L_i.
    """
    seq_mask = (mask.sum(-1) > 0).float()  # [B]
    a = (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    log_ratio = ((logp - old_logp) * mask).sum(-1)  # [B]
    seq_loss = (a - hp.tau * log_ratio) ** 2 / (2 * hp.tau)  # [B]
    metrics = {
        "clip_frac": 0.0,
        "log_ratio_abs": float((log_ratio.detach().abs() * seq_mask).sum() / seq_mask.sum().clamp(min=1)),
    }
    return seq_loss[:, None] * mask, metrics  # [B] -> [B, T]


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict]:
    """PPO's clipped value loss per token: 0.5 * max((V - R)^2, (V_clip - R)^2),
    with V_clip = V_old + clip(V - V_old, -clip, clip). ``clip=None`` is plain 0.5 (V - R)^2.

    The value clip comes from OpenAI baselines' PPO2 (Dhariwal et al. 2017) and is used
    by InstructGPT-style PPO (verl, OpenRLHF). Returns token losses [B, T] for
    :func:`aggregate` and detached metrics.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        loss, frac = 0.5 * unclipped, torch.zeros_like(unclipped)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clip - returns) ** 2
        loss, frac = 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()
    return loss, {"vf_clip_frac": _masked_mean(frac, mask).item()}


# ---------------------------------------------------------------------------
# Aggregation: [B, T] token losses -> scalar. Signature: fn(x, mask, norm) -> Tensor. Each mode
# declares the ``unit`` it averages over (tokens or sequences), which weighs the micro-batches of
# a step (thinkrl/algorithms/objective.py: aggregation_share).


@LOSS_AGGREGATIONS.register("token_mean", unit="tokens")
def token_mean(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Mean over all completion tokens in the batch (DAPO's token-level loss)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean", unit="sequences")
def seq_mean_token_mean(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Mean over each sequence's tokens, then over sequences (GRPO as published)."""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_seq.mean()


@LOSS_AGGREGATIONS.register("seq_mean_token_sum", unit="sequences")
def seq_mean_token_sum(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Sum over each sequence's tokens, mean over sequences."""
    return (x * mask).sum(-1).mean()


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm", unit="sequences")
def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Token sum divided by a constant (the generation budget), mean over sequences (Dr. GRPO)."""
    return (x * mask).sum(-1).mean() / norm


def aggregate(x: Tensor, mask: Tensor, mode: str, norm: float = 1.0) -> Tensor:
    """Reduce token losses ``x`` [B, T] to a scalar with the named normalisation."""
    return LOSS_AGGREGATIONS.get(mode)(x, mask, norm)
