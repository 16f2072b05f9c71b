"""The policy objective of one micro-batch: policy loss, importance correction, beta * KL and the
entropy bonus, aggregated and weighted by the micro-batch's share of its optimizer step.

Per token (all [b, T])::

    l_t = w_t * L_policy(logp, old_logp, adv)_t + beta * KL(logp, ref_logp)_t - c_H * H_t

with ``w_t = min(pi_old / pi_behaviour, tis_cap)`` (truncated importance sampling, Yao et al.
2025) when ``tis_cap`` is set, else 1. The micro-batch loss is ``aggregate(l, mask, agg)``
(:mod:`thinkrl.algorithms.losses`) times :func:`aggregation_share`, so that the micro-batch
losses of an optimizer step sum to the aggregate over the whole step: the gradient does not
depend on how the step is cut into micro-batches. The GRPO objective with a KL term in the loss
is Shao et al. 2024, "DeepSeekMath", eq. (3); the token-level aggregation is DAPO's (Yu et al.
2025, eq. (8)); the constant normaliser is Dr. GRPO's (Liu et al. 2025, "Understanding R1-Zero-Like
Training", §3.1).

A new aggregation mode is one ``@LOSS_AGGREGATIONS.register(name, unit=...)`` in ``losses.py``:
``unit`` ("tokens" or "sequences") is what the mode averages over, which fixes each part's share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from thinkrl.algorithms.losses import LOSS_AGGREGATIONS, LossParams, aggregate, tis_weights

# Keys of the metrics that policy_objective adds to the policy loss's own (which are token means)
OWN_METRICS = ("loss", "tokens", "entropy_sum", "kl_sum", "mismatch_sum", "mismatch_max", "tis_sum")


@dataclass(frozen=True)
class Objective:
    """What the per-token objective is made of. ``loss`` is a policy loss of
    :data:`~thinkrl.algorithms.losses.POLICY_LOSSES`; ``kl`` a KL estimator of
    :data:`~thinkrl.algorithms.kl.KL_ESTIMATORS`, or None when the KL is not in the loss (none,
    or in the reward); ``norm`` the constant of ``seq_mean_token_sum_norm`` (the generation
    budget); ``advantage_weighted`` whether ``loss`` vanishes, value and gradient, where adv = 0."""

    loss: Callable
    agg: str
    hp: LossParams = field(default_factory=LossParams)
    norm: float = 1.0
    kl: Callable | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    advantage_weighted: bool = False

    @property
    def needs_every_row(self) -> bool:
        """Whether rows whose advantages are all zero still move the loss (so none can be skipped)."""
        return self.kl is not None or self.entropy_coef > 0 or not self.advantage_weighted


def aggregation_share(agg: str, rows: float, tokens: float, total_rows: float, total_tokens: float) -> float:
    """The weight of a part (``rows`` sequences, ``tokens`` tokens) of a whole (``total_rows``,
    ``total_tokens``) under aggregation ``agg``: sum over parts of weight * aggregate(part) equals
    aggregate(whole). A token mean weighs a part by its tokens, a mean over sequences by its rows."""
    unit = LOSS_AGGREGATIONS.trait(agg, "unit")
    if unit == "tokens":
        return tokens / total_tokens
    if unit == "sequences":
        return rows / total_rows
    raise ValueError(
        f"loss aggregation '{agg}' declares unit={unit!r}; register it with unit='tokens' or 'sequences'"
    )


def policy_objective(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    obj: Objective,
    *,
    step_rows: float,
    step_tokens: float,
    entropy: Tensor | None = None,
    ref_logp: Tensor | None = None,
    behaviour_logp: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """One micro-batch's share of its optimizer step's loss, and detached metrics.

    ``logp`` [b, T] carries the gradient; ``old_logp``, ``ref_logp`` and ``behaviour_logp`` [b, T]
    are constants (pi_old, pi_ref, the rollout engine's pi_behaviour); ``entropy`` [b, T] is needed
    when ``obj.entropy_coef > 0`` (with its gradient) and is measured whenever given. ``step_rows``
    and ``step_tokens`` count the whole optimizer step (every rank's), see :func:`aggregation_share`.

    Metrics: the policy loss's own (means over this micro-batch's tokens); ``loss``, the returned
    loss's value; ``tokens``; sums over the tokens of the entropy and the KL (``entropy_sum``,
    ``kl_sum``, when measured); with ``behaviour_logp``, the sum and max of |log pi_old - log
    pi_behaviour| (``mismatch_sum``, ``mismatch_max``) and the sum of the TIS weights (``tis_sum``).
    """
    tok_loss, metrics = obj.loss(logp, old_logp, adv, mask, obj.hp)  # [b, T]
    metrics = dict(metrics)
    if behaviour_logp is not None:
        gap = ((old_logp - behaviour_logp) * mask).abs()  # [b, T] |log pi_old - log pi_behaviour|
        metrics.update(mismatch_sum=float(gap.sum()), mismatch_max=float(gap.max()))
        if obj.tis_cap is not None:
            w = tis_weights(old_logp, behaviour_logp, obj.tis_cap)  # [b, T]
            tok_loss = tok_loss * w
            metrics["tis_sum"] = float((w * mask).sum())
    if ref_logp is not None and obj.kl is not None:
        kl = obj.kl(logp, ref_logp)  # [b, T]
        tok_loss = tok_loss + obj.kl_coef * kl
        metrics["kl_sum"] = float((kl.detach() * mask).sum())
    if obj.entropy_coef > 0:
        tok_loss = tok_loss - obj.entropy_coef * entropy
    if entropy is not None:
        metrics["entropy_sum"] = float((entropy.detach() * mask).sum())
    loss = aggregate(tok_loss, mask, obj.agg, norm=obj.norm)  # scalar
    n_tok = float(mask.sum())
    weight = aggregation_share(obj.agg, mask.shape[0], n_tok, step_rows, step_tokens)
    metrics.update(loss=loss.item() * weight, tokens=n_tok)
    return loss * weight, metrics
