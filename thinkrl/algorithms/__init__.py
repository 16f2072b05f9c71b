"""Pure tensor functions of RL for language models, registered by name.

Shapes: ``B`` sequences in a batch, ``T`` completion tokens (padded). ``mask`` is
1.0 on completion tokens that count and 0.0 on padding.
"""

from thinkrl.algorithms.advantages import ADVANTAGES, DEFAULT_LOSS_AGG, group_stats
from thinkrl.algorithms.kl import KL_ESTIMATORS
from thinkrl.algorithms.losses import LOSS_AGGREGATIONS, POLICY_LOSSES, aggregate

__all__ = ["ADVANTAGES", "DEFAULT_LOSS_AGG", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES",
           "aggregate", "group_stats"]
