"""Preference losses on sequence log-probs: DPO, length-normalised DPO and SimPO.

All share one signature::

    fn(logp_c, logp_r, ref_c, ref_r, len_c, len_r, *, beta, gamma) -> (loss, metrics)

``logp_c``/``logp_r`` [B] are the summed token log-probs of the chosen and rejected
responses under the policy, ``ref_*`` [B] the same under the reference (``None`` for
losses that use none), ``len_*`` [B] the response lengths in tokens. The loss is the
batch mean. A loss with ``needs_reference = False`` is trained without loading a
reference model.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from thinkrl.registry import Registry

PREFERENCE_LOSSES: Registry = Registry("preference loss")


def _out(margin: Tensor, logits: Tensor) -> tuple[Tensor, dict]:
    loss = -F.logsigmoid(logits).mean()
    return loss, {
        "reward_margin": float(margin.detach().mean()),
        "pref_accuracy": float((logits.detach() > 0).float().mean()),
    }


@PREFERENCE_LOSSES.register("dpo")
def dpo(
    logp_c: Tensor,
    logp_r: Tensor,
    ref_c: Tensor,
    ref_r: Tensor,
    len_c: Tensor,
    len_r: Tensor,
    *,
    beta: float,
    gamma: float = 0.0,
) -> tuple[Tensor, dict]:
    """Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:
    -log sigma(beta * [(logp_c - ref_c) - (logp_r - ref_r)]). At policy == reference
    the argument is 0 and the loss is log 2."""
    margin = (logp_c - ref_c) - (logp_r - ref_r)  # [B]
    return _out(margin, beta * margin)


@PREFERENCE_LOSSES.register("ln_dpo")
def ln_dpo(
    logp_c: Tensor,
    logp_r: Tensor,
    ref_c: Tensor,
    ref_r: Tensor,
    len_c: Tensor,
    len_r: Tensor,
    *,
    beta: float,
    gamma: float = 0.0,
) -> tuple[Tensor, dict]:
    """Length-normalised DPO: the implicit rewards use per-token mean log-ratios, so a
    longer response is not favoured (or punished) for its length alone (the
    normalisation SimPO motivates; Meng et al. 2024, section 2; used for long2short
    preference data in Kimi k1.5, Kimi Team 2025, section 2.4)."""
    margin = (logp_c - ref_c) / len_c - (logp_r - ref_r) / len_r  # [B]
    return _out(margin, beta * margin)


@PREFERENCE_LOSSES.register("simpo")
def simpo(
    logp_c: Tensor,
    logp_r: Tensor,
    ref_c: Tensor | None,
    ref_r: Tensor | None,
    len_c: Tensor,
    len_r: Tensor,
    *,
    beta: float,
    gamma: float = 0.0,
) -> tuple[Tensor, dict]:
    """Meng et al. 2024, "SimPO", eq. 6: -log sigma(beta/|c| logp_c - beta/|r| logp_r - gamma).
    The reward is the length-averaged log-prob itself: no reference model."""
    margin = logp_c / len_c - logp_r / len_r  # [B]
    return _out(margin, beta * margin - gamma)


dpo.needs_reference = True
ln_dpo.needs_reference = True
simpo.needs_reference = False
