"""Pure tensor functions of RL for language models, registered by name.

Shapes: ``B`` sequences in a batch, ``T`` completion tokens (padded). ``mask`` is
1.0 on completion tokens that count and 0.0 on padding.

An algorithm is a recipe of parts selected by name in ``AlgoConfig``: an advantage
estimator, a policy loss, a KL estimator placed in the loss or in the reward, and a
loss aggregation; :func:`policy_objective` assembles them for one micro-batch. GRPO, Dr. GRPO, RLOO, REINFORCE(++), PPO and Kimi's mirror descent
all run in the one loop of ``thinkrl.trainer.rl``.
"""

from thinkrl.algorithms.advantages import ADVANTAGES, AdvantageInput, Advantages, MovingAverage, group_stats
from thinkrl.algorithms.kl import KL_ESTIMATORS
from thinkrl.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    LossParams,
    aggregate,
    tis_weights,
    value_loss,
)
from thinkrl.algorithms.objective import Objective, aggregation_share, policy_objective


def loss_agg_for(advantage: str, loss: str, configured: str | None = None) -> str:
    """The configured aggregation, else the loss's own (sequence-level losses), else the estimator's."""
    return (
        configured
        or POLICY_LOSSES.trait(loss, "loss_agg")
        or ADVANTAGES.trait(advantage, "loss_agg", "token_mean")
    )


def kl_in_for(advantage: str, configured: str | None = None) -> str:
    """Where the KL penalty goes: the configured place, else the estimator's paper's."""
    return configured or ADVANTAGES.trait(advantage, "kl_in", "loss")


def takes_token_rewards(advantage: str) -> bool:
    """Whether the estimator builds token-level returns, so the KL penalty can go in the reward."""
    return ADVANTAGES.trait(advantage, "kl_in") == "reward"


def needs_values(advantage: str) -> bool:
    """Whether the estimator reads a critic's values (GAE)."""
    return "values" in ADVANTAGES.trait(advantage, "needs", ())


def uses_batch_statistics(advantage: str) -> bool:
    """Whether the estimator normalises over the whole batch (whitening), not within each group."""
    return bool(ADVANTAGES.trait(advantage, "batch_stats", False))


def advantage_weighted(loss: str) -> bool:
    """Whether the loss vanishes, value and gradient, wherever the advantage is 0."""
    return bool(POLICY_LOSSES.trait(loss, "advantage_weighted", False))


__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "AdvantageInput",
    "Advantages",
    "LossParams",
    "MovingAverage",
    "Objective",
    "advantage_weighted",
    "aggregate",
    "aggregation_share",
    "group_stats",
    "kl_in_for",
    "loss_agg_for",
    "needs_values",
    "policy_objective",
    "takes_token_rewards",
    "tis_weights",
    "uses_batch_statistics",
    "value_loss",
]
