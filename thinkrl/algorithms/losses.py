"""Policy losses and the one place where token losses are normalised.

Policy-loss signature::

    fn(logp [B, T], old_logp [B, T], adv [B, T], mask [B, T], *, clip_low, clip_high)
        -> (token_loss [B, T], metrics)

The token losses are then reduced by :func:`aggregate`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from thinkrl.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
             clip_low: float = 0.2, clip_high: float = 0.2) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate, per token: -min(ratio * A, clip(ratio, 1-e_low, 1+e_high) * A).

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. (7); as used
    per token by GRPO. ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025).
    Where the ratio is clipped in the direction of the advantage, the gradient is 0.
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    with torch.no_grad():
        is_clipped = (clipped < unclipped).float()
        metrics = {
            "clip_frac": _masked_mean(is_clipped, mask).item(),
            "ratio_mean": _masked_mean(ratio, mask).item(),
        }
    return loss, metrics


# ---------------------------------------------------------------------------
# Aggregation: [B, T] token losses -> scalar. Signature: fn(x, mask, norm) -> Tensor


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Mean over all completion tokens in the batch (DAPO's token-level loss)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Mean over each sequence's tokens, then over sequences (GRPO as published)."""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_seq.mean()


@LOSS_AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Sum over each sequence's tokens, mean over sequences."""
    return (x * mask).sum(-1).mean()


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Token sum divided by a constant (the generation budget), mean over sequences (Dr. GRPO)."""
    return (x * mask).sum(-1).mean() / norm


def aggregate(x: Tensor, mask: Tensor, mode: str, norm: float = 1.0) -> Tensor:
    """Reduce token losses ``x`` [B, T] to a scalar with the named normalisation."""
    return LOSS_AGGREGATIONS.get(mode)(x, mask, norm)
