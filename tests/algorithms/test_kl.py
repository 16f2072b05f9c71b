import math

import pytest
import torch

from thinkrl.algorithms import KL_ESTIMATORS

k1, k2, k3 = (KL_ESTIMATORS.get(n) for n in ("k1", "k2", "k3"))
LN2 = math.log(2)


def test_kl_estimators_hand_worked():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    # token 0: logp - ref = ln 2;  token 1: -ln 2;  token 2: 0
    torch.testing.assert_close(k1(logp, ref), torch.tensor([LN2, -LN2, 0.0]), atol=1e-6, rtol=0)
    # k2 = (ln 2)^2 / 2 = 0.2402265 for both signs
    torch.testing.assert_close(k2(logp, ref), torch.tensor([LN2**2 / 2, LN2**2 / 2, 0.0]), atol=1e-6, rtol=0)
    # k3 = exp(d) - d - 1 with d = ref - logp:
    # token 0: d = -ln 2 -> 0.5 + ln 2 - 1 = 0.1931472;  token 1: d = ln 2 -> 2 - ln 2 - 1 = 0.3068528
    torch.testing.assert_close(k3(logp, ref), torch.tensor([LN2 - 0.5, 1 - LN2, 0.0]), atol=1e-6, rtol=0)


def test_k3_is_non_negative_and_bounded():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(1000, generator=g) * 5
    ref = torch.randn(1000, generator=g) * 5
    out = k3(logp, ref)
    assert torch.all(out >= 0)
    assert torch.all(torch.isfinite(out))
    # a huge log-ratio is clamped: exp(30) - 30 - 1 would be ~1e13; the value is capped at 10
    assert float(k3(torch.tensor([-40.0]), torch.tensor([-10.0]))) == pytest.approx(10.0, abs=1e-6)


def test_estimators_converge_to_exact_kl_of_categoricals():
    p = torch.tensor([0.5, 0.3, 0.2])  # pi_theta: tokens are sampled from p
    q = torch.tensor([0.2, 0.3, 0.5])  # pi_ref
    # KL(p || q) = 0.5 ln(2.5) + 0.3 ln(1) + 0.2 ln(0.4) = 0.3 ln(2.5) = 0.2748872
    exact = float((p * (p / q).log()).sum())
    assert exact == pytest.approx(0.3 * math.log(2.5), abs=1e-6)
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[x], q.log()[x]
    for est in (k1, k3):
        # the exact per-token values give the estimator's exact variance; 5 standard errors of the
        # sample mean (sqrt(var / n), about 4.6e-4 for k3 and 1.4e-3 for k1) bound the test's noise
        values = est(p.log(), q.log())  # [3]
        assert float((p * values).sum()) == pytest.approx(exact, abs=1e-6)  # unbiased
        var = float((p * (values - exact) ** 2).sum())
        tol = 5 * math.sqrt(var / n)
        assert abs(float(est(logp, ref).mean()) - exact) < tol
    # k2 is biased: E_p[(ln p - ln q)^2 / 2] = 0.7 * ln(2.5)^2 / 2 = 0.2938562 > KL; its per-token
    # values are 0.4198 (p=0.7) or 0 (p=0.3): var 0.0370, 5 standard errors = 2.2e-3 < 3e-3
    k2_mean = float(k2(logp, ref).mean())
    assert k2_mean == pytest.approx(0.35 * math.log(2.5) ** 2, abs=3e-3)
    assert k2_mean - exact > 0.015
