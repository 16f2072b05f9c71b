"""Pure tensor functions of RL for language models, registered by name.

Shapes: ``B`` sequences in a batch, ``T`` completion tokens (padded). ``mask`` is
1.0 on completion tokens that count and 0.0 on padding.

An algorithm is a recipe of parts selected by name in ``AlgoConfig``: an advantage
estimator, a policy loss, a KL estimator placed in the loss or in the reward, and a
loss aggregation. GRPO, Dr. GRPO, RLOO, REINFORCE(++), PPO and Kimi's mirror descent
all run in the one loop of ``thinkrl.trainer.rl``.
"""

from thinkrl.algorithms import advantages, losses
from thinkrl.algorithms.advantages import (ADVANTAGES, BATCH_STATISTICS, USES_TOKEN_REWARDS, USES_VALUES, AdvantageInput, Advantages,
                                           MovingAverage, group_stats)
from thinkrl.algorithms.kl import KL_ESTIMATORS
from thinkrl.algorithms.losses import (ADVANTAGE_WEIGHTED, LOSS_AGGREGATIONS, POLICY_LOSSES, LossParams, aggregate,
                                       tis_weights, value_loss)

DEFAULT_LOSS_AGG = advantages.DEFAULT_LOSS_AGG


def loss_agg_for(advantage: str, loss: str, configured: str | None = None) -> str:
    """The configured aggregation, else the loss's own (sequence-level losses), else the estimator's."""
    return configured or losses.DEFAULT_LOSS_AGG.get(loss) or advantages.DEFAULT_LOSS_AGG.get(advantage, "token_mean")


def kl_in_for(advantage: str, configured: str | None = None) -> str:
    """Where the KL penalty goes: the configured place, else the estimator's paper's."""
    return configured or advantages.DEFAULT_KL_IN.get(advantage, "loss")


__all__ = ["ADVANTAGES", "BATCH_STATISTICS", "ADVANTAGE_WEIGHTED", "DEFAULT_LOSS_AGG", "KL_ESTIMATORS", "LOSS_AGGREGATIONS",
           "POLICY_LOSSES", "USES_TOKEN_REWARDS", "USES_VALUES", "AdvantageInput", "Advantages", "LossParams",
           "MovingAverage", "aggregate", "group_stats", "kl_in_for", "loss_agg_for", "tis_weights", "value_loss"]
