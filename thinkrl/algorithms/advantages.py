"""Advantage estimators for outcome rewards (one scalar reward per completion).

Every estimator has one signature::

    fn(rewards [B], group_ids [B], mask [B, T], *, eps) -> adv [B, T]

``group_ids`` marks which completions answer the same prompt. The per-sequence
advantage is broadcast over that sequence's completion tokens (zero on padding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from thinkrl.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")

# The loss aggregation each estimator's paper uses, when the config does not say.
DEFAULT_LOSS_AGG = {
    "grpo": "seq_mean_token_mean",  # GRPO (Shao et al. 2024): 1/G sum_i 1/|o_i| sum_t
    "dr_grpo": "seq_mean_token_sum_norm",  # Dr. GRPO (Liu et al. 2025): a constant normaliser
    "rloo": "seq_mean_token_mean",
}


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
        0, inv, torch.ones_like(values))  # [n_groups]
    total = torch.zeros_like(count).index_add_(0, inv, values)  # [n_groups]
    mean = total / count  # [n_groups]
    sq = torch.zeros_like(count).index_add_(0, inv, (values - mean[inv]) ** 2)  # [n_groups]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # [n_groups], Bessel-corrected like torch.std
    return mean[inv].to(out_dtype), std[inv].to(out_dtype), count[inv].to(out_dtype)


def _broadcast(adv: Tensor, mask: Tensor) -> Tensor:
    return adv[:, None].to(mask.dtype) * mask  # [B] -> [B, T]


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantage: A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    Shao et al. 2024, "DeepSeekMath", eq. (3) with outcome supervision. The std is
    the unbiased sample std of the group, as in TRL and verl.
    """
    mean, std, _ = group_stats(rewards.float(), group_ids)
    return _broadcast((rewards - mean) / (std + eps), mask)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, eps: float = 1e-4) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean(r_group), with no division by the group std.

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective":
    the std division up-weights groups that are nearly all right or all wrong (a
    question-difficulty bias). Pair it with the constant length normaliser
    (``seq_mean_token_sum_norm``) to remove the response-length bias as well.
    """
    mean, _, _ = group_stats(rewards.float(), group_ids)
    return _broadcast(rewards - mean, mask)


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, eps: float = 1e-4) -> Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
    for Learning from Human Feedback in LLMs". Equal to G/(G-1) * (r_i - mean).
    """
    mean, _, count = group_stats(rewards.float(), group_ids)
    return _broadcast((rewards - mean) * count / (count - 1).clamp(min=1), mask)
