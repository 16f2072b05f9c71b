"""Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta.

Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html).
With log-ratio ``d = ref_logp - logp`` of a token sampled from pi_theta:

- k1 = -d                    unbiased, high variance, can be negative;
- k2 = d**2 / 2              biased, low variance, always >= 0;
- k3 = exp(d) - d - 1        unbiased, low variance, always >= 0 (GRPO's choice).

Signature: ``fn(logp [B, T], ref_logp [B, T]) -> kl [B, T]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from thinkrl.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")

# exp() of a large log-ratio overflows and one token then owns the gradient; like
# verl we clamp the log-ratio of k3 (and the value of k3) to a bounded range.
_LOG_RATIO_CLAMP = 20.0
_K3_MAX = 10.0


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    d = (ref_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(max=_K3_MAX)
